"""Batch detoxification of a prompt file, crash-safe and resumable, shardable over processes.

Output is JSONL, one report per sample, each line written with a single write() and fsynced once
per batch, so a killed run leaves at most an unfinished last line; a rerun cuts it off, skips every
finished sample, and refuses to continue if the configuration changed (a sidecar `.meta.json`
holds the fingerprint). Each file has one writer at a time (OutputLock). Under `accelerate launch`
(or torchrun) every process takes the samples k ≡ rank (mod world size), writes (and locks) its own
part file, and the last process to finish merges the parts into the output file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

# Re-exported: a batch run starts from a prompt file, and raises InputError for its own files too.
from .prompts import InputError, PromptLine, read_prompts  # noqa: F401

log = logging.getLogger(__name__)


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


def write_records(fd: int, records: Iterable[dict]) -> None:
    """Append records to the open file `fd` as JSON lines, each line in one write(), then fsync
    once: a kill leaves whole lines and at most one cut-off tail, which read_records cuts off."""
    for record in records:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    os.fsync(fd)


def append_records(path: Path, records: Iterable[dict]) -> None:
    """write_records to `path`, created if missing."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        write_records(fd, records)
    finally:
        os.close(fd)


def _read_done(path: Path) -> dict[tuple[int, int], dict]:
    return read_records(path, key=lambda r: (r["prompt_index"], r["sample"]))


class OutputLock:
    """One writer per output file, enforced by the operating system: an flock on `<file>.lock`, which
    holds the writer's PID for the message a second writer gets. The kernel drops the lock when its
    process ends, however it ends, so a killed run never leaves a stale lock behind.

    Opening the lock file is also the check that the output can be written at all, which is why
    callers take it before loading a model."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + ".lock")
        self.fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        if self.output.is_dir():
            raise InputError(f"{self.output} is a folder; name a file to write the reports to")
        while True:
            try:
                self.output.parent.mkdir(parents=True, exist_ok=True)
                if self.output.exists() and not os.access(self.output, os.W_OK):
                    raise PermissionError(13, "Permission denied")
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InputError(f"{self.output}: cannot write there ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise InputError(f"{self.output} is being written by another run (process {holder}); "
                                 "wait for it to finish, or write elsewhere") from None
            # The lock file is removed on release: if that happened between our open and our flock,
            # we hold a lock on a file nobody else will see. Retry on the one that is there now.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: see the retry in __enter__
            os.close(self.fd)
            self.fd = None


def check_fingerprint(meta: Path, data: Path, fingerprint: dict, writer: str = "`safegen detoxify`",
                      others: Sequence[Path] = ()) -> None:
    """Resume only into the same configuration: compare with the fingerprint saved in `meta` (or
    save it, for a new run). `data` is the file the run appends to; `others` hold records of the
    same run too (shard parts). With no record written yet there is nothing to protect, and a new
    configuration replaces the old one."""
    if meta.exists():
        old = json.loads(meta.read_text())
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if changed and not any(p.exists() and p.stat().st_size > 0 for p in (data, *others)):
            log.info("%s: no record written yet; starting over with the new configuration", data)
            _save_fingerprint(meta, fingerprint)
        elif changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise InputError(f"{data} was started with another configuration ({details}); "
                             "rerun with the same options to resume, or write elsewhere")
    elif data.exists() and data.stat().st_size > 0:
        raise InputError(f"{data} exists but was not written by {writer} (no {meta.name}); write elsewhere")
    else:
        _save_fingerprint(meta, fingerprint)


def _save_fingerprint(meta: Path, fingerprint: dict) -> None:
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(tmp, meta)


def _check_meta(output: Path, fingerprint: dict, shard: "Shard") -> None:
    parts = [Shard(r, shard.world).part(output) for r in range(shard.world)] if shard.world > 1 else []
    check_fingerprint(output.with_name(output.name + ".meta.json"), output, fingerprint, others=parts)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_identity(folder: str | os.PathLike, edge: int = 1 << 20) -> str:
    """A cheap fingerprint of the weights in a model folder: for each weights file its name, size
    and a SHA-256 of its first and last `edge` bytes, plus config.json whole. The first MiB holds a
    safetensors file's header (every tensor's name, shape and offsets) and the first weights; a
    retrained, re-quantized or re-saved model differs there or in its size. A rewrite that keeps the
    size and changes only the middle of a file goes unseen: hashing all 16 GB would cost minutes."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES:
            size = p.stat().st_size
            h.update(f"{p.name}\0{size}\0".encode())
            with open(p, "rb") as f:
                h.update(f.read(edge))
                if size > edge:
                    f.seek(max(edge, size - edge))
                    h.update(f.read(edge))
    return h.hexdigest()[:16]


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
              shard: Optional[Shard] = None, progress: bool = True, lock: Optional[OutputLock] = None) -> list[dict]:
    """Generate `samples` per prompt and append one JSON line per sample to `output`.

    generate(prompts: list[PromptLine], seeds: list[int]) -> list of report dicts. Returns every
    record of the finished output (all shards, when this process merged them; else its own part).
    lock: the caller's OutputLock on this process's file (`shard.part(output)`), taken before it
    loaded its model; when None, run_batch takes it for the run.
    """
    output = Path(output)
    shard = shard or Shard()
    if lock is None:
        with OutputLock(shard.part(output)) as lock:
            return run_batch(prompts, output, generate, samples, seed, batch_size, fingerprint, shard,
                             progress, lock)
    check_resume(output, fingerprint, shard)
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
            reports = generate([p for p, _, _ in chunk], [sd for _, _, sd in chunk])
            records = [{"prompt_index": p.index, "line": p.line, "sample": s, **report}
                       for (p, s, _), report in zip(chunk, reports)]
            write_records(fd, records)
            done.update(((r["prompt_index"], r["sample"]), r) for r in records)
            bar.update(len(chunk))
    finally:
        os.close(fd)
        bar.close()
    if shard.world > 1:
        Path(f"{part}.done").touch()
        merged = _merge_if_last(output, shard)
        return merged if merged is not None else list(_read_done(part).values())
    return sorted(done.values(), key=lambda r: (r["prompt_index"], r["sample"]))


def check_resume(output: str | os.PathLike, fingerprint: dict, shard: Optional[Shard] = None) -> None:
    """Refuse to resume `output` under another configuration (rank 0 records it for a new run; the
    other ranks wait for that record)."""
    output, shard = Path(output), shard or Shard()
    if shard.rank == 0:
        _check_meta(output, fingerprint, shard)
    else:
        _wait_for_meta(output, fingerprint, shard)


def _wait_for_meta(output: Path, fingerprint: dict, shard: Shard, timeout: float = 600.0) -> None:
    import time
    meta = output.with_name(output.name + ".meta.json")
    t0 = time.monotonic()
    while not meta.exists():
        if time.monotonic() - t0 > timeout:
            raise InputError(f"{meta}: rank 0 did not create it within {timeout:.0f} s")
        time.sleep(0.05)
    _check_meta(output, fingerprint, shard)


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
        "rows_per_sample": mean(lambda r: r["rows"]),
        "rows_before_per_sample": mean(lambda r: r["rows_before"]),
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
        ("denoiser rows / sample", f"{s['rows_per_sample']:.1f} (+{s['rows_before_per_sample']:.1f} for 'before')"),
        ("reward texts / sample", f"{s['reward_calls_per_sample']:.1f}"),
        ("time", f"{s['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    header = f"{'':<{width}}  before -> after"
    return "\n".join([header] + [f"{k:<{width}}  {v}" for k, v in rows])
