"""Batch detoxification of a prompt file, crash-safe and resumable, shardable over processes.

Output is JSONL, one report per sample, each line written with a single write() and fsynced once
per batch, so a killed run leaves at most an unfinished last line; a rerun cuts it off, skips every
finished sample, and refuses to continue if the configuration changed (a sidecar `.meta.json`
holds the fingerprint). Under `accelerate launch` (or torchrun) every process takes the samples
k ≡ rank (mod world size), writes its own part file, and the last process to finish merges the
parts into the output file.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad input file; the message names the file and line."""


@dataclass(frozen=True)
class PromptLine:
    index: int  # ordinal among the prompts read
    line: int  # 1-based line (or CSV record) number in the input file
    text: str


# ---------------------------------------------------------------------------------- reading input
def read_prompts(path: str | os.PathLike, field: Optional[str] = None, skip_bad: bool = False) -> list[PromptLine]:
    """Prompts from .txt (one per line), .jsonl (a `prompt` string, RealToxicityPrompts'
    `prompt.text`, or the dotted `field`), or .csv (a `prompt` column, or `field`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InputError(f"{path}: unsupported input type {suffix or '(none)'!r}; use .txt, .jsonl or .csv")
    raw = path.read_bytes()
    lines = _decode_lines(path, raw, skip_bad)
    prompts: list[PromptLine] = []

    def bad(line_no: int, problem: str):
        if not skip_bad:
            raise InputError(f"{path}:{line_no}: {problem} (use --skip-bad to skip such lines)")
        log.warning("%s:%d: %s; skipped", path, line_no, problem)

    if suffix == ".txt":
        for no, text in lines:
            if text.strip():
                prompts.append(PromptLine(len(prompts), no, text.strip()))
    elif suffix == ".jsonl":
        for no, text in lines:
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                bad(no, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            value, problem = _field(record, field)
            if problem:
                bad(no, problem)
            elif not value.strip():
                bad(no, "empty prompt")
            else:
                prompts.append(PromptLine(len(prompts), no, value))
    else:
        reader = csv.DictReader(io.StringIO("\n".join(t for _, t in lines)))
        column = field or "prompt"
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise InputError(f"{path}:1: no column {column!r} (columns: {reader.fieldnames or []}); "
                             "use --field to name the prompt column")
        for record in reader:
            value = record.get(column)
            if value is None or not value.strip():
                bad(reader.line_num, f"empty or missing {column!r}")
            else:
                prompts.append(PromptLine(len(prompts), reader.line_num, value.strip()))
    if not prompts:
        raise InputError(f"{path}: no prompts found" + (" (file is empty)" if not raw.strip() else ""))
    return prompts


def _decode_lines(path: Path, raw: bytes, skip_bad: bool) -> list[tuple[int, str]]:
    out = []
    for no, line in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append((no, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            problem = f"{path}:{no}: bytes that are not UTF-8 at column {e.start + 1}"
            if not skip_bad:
                raise InputError(problem + " (re-encode the file as UTF-8, or use --skip-bad)") from None
            log.warning("%s; skipped", problem)
    return out


def _field(record, field: Optional[str]) -> tuple[str, Optional[str]]:
    """(value, problem) for the prompt of one JSON record."""
    if not isinstance(record, dict):
        return "", f"expected a JSON object, got {type(record).__name__}"
    if field:
        value = record
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                return "", f"no field {field!r}"
            value = value[part]
    else:
        value = record.get("prompt")
        if isinstance(value, dict):  # RealToxicityPrompts: {"prompt": {"text": ..., scores}}
            value = value.get("text")
        if value is None:
            return "", f"no 'prompt' field (keys: {sorted(record)}); use --field"
    if not isinstance(value, str):
        return "", f"field {field or 'prompt'!r} is {type(value).__name__}, not a string"
    return value, None


# ---------------------------------------------------------------------------------- output file
def read_records(path: Path, key: Callable[[dict], tuple], what: str = "safegen report line") -> dict[tuple, dict]:
    """The records of a JSONL file written line by line, keyed by `key(record)`. Each record is
    written with its newline in one write(), so only an unterminated tail can be unfinished: it is
    cut off in place. A broken line with records after it is not ours to repair: that is an error
    naming the line."""
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    pos, line_no = 0, 0
    while (nl := data.find(b"\n", pos)) != -1:
        line_no += 1
        try:
            record = json.loads(data[pos:nl])
            done[key(record)] = record
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{line_no}: not a {what} ({e}); "
                             "refusing to resume into a damaged file") from None
        pos = nl + 1
    if pos < len(data):
        log.warning("%s: cut off an unfinished last line (%d bytes) left by an interrupted run",
                    path, len(data) - pos)
        with open(path, "r+b") as f:
            f.truncate(pos)
    return done


def _read_done(path: Path) -> dict[tuple[int, int], dict]:
    return read_records(path, key=lambda r: (r["prompt_index"], r["sample"]))


def check_fingerprint(meta: Path, data: Path, fingerprint: dict, writer: str = "`safegen detoxify`") -> None:
    """Resume only into the same configuration: compare with the fingerprint saved in `meta` (or
    save it, for a new run). `data` is the file the run appends to."""
    if meta.exists():
        old = json.loads(meta.read_text())
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise InputError(f"{data} was started with another configuration ({details}); "
                             "rerun with the same options to resume, or write elsewhere")
    elif data.exists() and data.stat().st_size > 0:
        raise InputError(f"{data} exists but was not written by {writer} (no {meta.name}); write elsewhere")
    else:
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        os.replace(tmp, meta)


def _check_meta(output: Path, fingerprint: dict) -> None:
    check_fingerprint(output.with_name(output.name + ".meta.json"), output, fingerprint)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Shard":
        """The process's place under accelerate launch / torchrun (RANK, WORLD_SIZE)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        if not 0 <= rank < world:
            raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world)

    def part(self, output: Path) -> Path:
        return output if self.world == 1 else output.with_name(f"{output.name}.part{self.rank}-of-{self.world}")

    def owns(self, k: int) -> bool:
        return k % self.world == self.rank


def run_batch(prompts: Sequence[PromptLine], output: str | os.PathLike, generate: Callable,
              samples: int, seed: int, batch_size: int, fingerprint: dict,
              shard: Optional[Shard] = None, progress: bool = True) -> list[dict]:
    """Generate `samples` per prompt and append one JSON line per sample to `output`.

    generate(prompts: list[str], seeds: list[int]) -> list of report dicts. Returns every record
    of the finished output (all shards, when this process merged them; else its own part).
    """
    output = Path(output)
    shard = shard or Shard()
    output.parent.mkdir(parents=True, exist_ok=True)
    if shard.rank == 0 or shard.world == 1:
        _check_meta(output, fingerprint)
    else:
        _wait_for_meta(output, fingerprint)
    part = shard.part(output)
    done = _read_done(output)
    if part != output:
        done.update(_read_done(part))
    # Seeds depend only on the prompt's position and the sample number: stable across resumes/shards.
    work = [(p, s, seed + p.index * samples + s) for p in prompts for s in range(samples)]
    todo = [w for k, w in enumerate(work) if shard.owns(k) and (w[0].index, w[1]) not in done]
    from tqdm import tqdm
    bar = tqdm(total=sum(shard.owns(k) for k in range(len(work))), initial=sum(
        shard.owns(k) for k, w in enumerate(work) if (w[0].index, w[1]) in done),
        desc=f"detoxify{'' if shard.world == 1 else f' [{shard.rank}/{shard.world}]'}",
        unit="sample", file=sys.stderr, disable=not progress)
    fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            reports = generate([p.text for p, _, _ in chunk], [sd for _, _, sd in chunk])
            lines = []
            for (p, s, _), report in zip(chunk, reports):
                record = {"prompt_index": p.index, "line": p.line, "sample": s, **report}
                done[(p.index, s)] = record
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            for line in lines:  # one write() per line: a kill leaves whole lines or one cut-off tail
                os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
            bar.update(len(chunk))
    finally:
        os.close(fd)
        bar.close()
    if shard.world > 1:
        Path(f"{part}.done").touch()
        merged = _merge_if_last(output, shard)
        return merged if merged is not None else list(_read_done(part).values())
    return sorted(done.values(), key=lambda r: (r["prompt_index"], r["sample"]))


def _wait_for_meta(output: Path, fingerprint: dict, timeout: float = 600.0) -> None:
    import time
    meta = output.with_name(output.name + ".meta.json")
    t0 = time.monotonic()
    while not meta.exists():
        if time.monotonic() - t0 > timeout:
            raise InputError(f"{meta}: rank 0 did not create it within {timeout:.0f} s")
        time.sleep(0.05)
    _check_meta(output, fingerprint)


def _merge_if_last(output: Path, shard: Shard) -> Optional[list[dict]]:
    """Merge every part into `output` if all parts are finished and nobody merged yet."""
    parts = [Shard(r, shard.world).part(output) for r in range(shard.world)]
    if not all(Path(f"{p}.done").exists() for p in parts):
        return None
    lock = output.with_name(output.name + ".merge-lock")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None  # another process is merging
    records = _read_done(output)
    for p in parts:
        records.update(_read_done(p))
    ordered = sorted(records.values(), key=lambda r: (r["prompt_index"], r["sample"]))
    tmp = output.with_name(output.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in ordered:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)  # atomic: the output is either the old file or the merged one
    for p in parts:
        p.unlink(missing_ok=True)
        Path(f"{p}.done").unlink(missing_ok=True)
    lock.unlink(missing_ok=True)
    return ordered


def summarize(records: Iterable[dict]) -> dict:
    records = list(records)
    n = len(records)
    if n == 0:
        return {"samples": 0}

    def mean(key):
        return sum(key(r) for r in records) / n

    return {
        "samples": n,
        "prompts": len({r["prompt_index"] for r in records}),
        "toxic_rate_before": mean(lambda r: float(r["toxic_before"])),
        "toxic_rate_after": mean(lambda r: float(r["toxic_after"])),
        "mean_toxicity_before": mean(lambda r: r["toxicity_before"]["aggregate"]),
        "mean_toxicity_after": mean(lambda r: r["toxicity_after"]["aggregate"]),
        "refined": sum(bool(r["refined"]) for r in records),
        "nfe_per_sample": mean(lambda r: r["nfe"]),
        "nfe_before_per_sample": mean(lambda r: r["nfe_before"]),
        "reward_calls_per_sample": mean(lambda r: r["reward_calls"]),
        "seconds": sum(r["seconds"] for r in records),
    }


def format_summary(summary: dict) -> str:
    if not summary.get("samples"):
        return "no samples"
    s = summary
    rows = [
        ("samples (prompts)", f"{s['samples']} ({s['prompts']})"),
        ("toxic rate", f"{s['toxic_rate_before']:.3f} -> {s['toxic_rate_after']:.3f}"),
        ("mean toxicity", f"{s['mean_toxicity_before']:.4f} -> {s['mean_toxicity_after']:.4f}"),
        ("refined samples", f"{s['refined']}"),
        ("denoiser rows (NFE) / sample", f"{s['nfe_per_sample']:.1f} (+{s['nfe_before_per_sample']:.1f} for 'before')"),
        ("reward texts / sample", f"{s['reward_calls_per_sample']:.1f}"),
        ("time", f"{s['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    header = f"{'':<{width}}  before -> after"
    return "\n".join([header] + [f"{k:<{width}}  {v}" for k, v in rows])
