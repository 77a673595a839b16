"""Batch detoxification of a prompt file, crash-safe and resumable, shardable over processes.

Each prompt's samples are one generation on the step-level engine (safegen/engine.py), up to
`--batch-size` samples side by side, their forwards merged; a prompt that is done frees its rows at
once for the next. Output is JSONL, one report per sample in input order, each line written with a
single write() and fsynced once per engine round that finished a prompt, so a killed run leaves
at most an unfinished last line; a rerun cuts it off, skips every finished sample, and refuses to continue if the configuration changed (a sidecar `.meta.json`
holds the fingerprint). Under `accelerate launch` (or torchrun) every process takes the samples
k ≡ rank (mod world size) and writes its own part file; the last to finish merges the parts into
the output (safegen/shards.py: the locks and the merge). Nothing grows with the number of reports
but the output: resume keeps one bit per sample, the summary is summed as reports stream past.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

# Re-exported: a batch run starts from a prompt file, and raises InputError for its own files too.
from . import engine
from .prompts import InputError, PromptLine, read_prompts  # noqa: F401
from .records import DoneSet, append_records, iter_records, write_records  # noqa: F401
from .shards import OutputLock, Shard, live_writers, merge_lock, merge_parts, part_files, sign_part
from .summary import RunningSummary, format_summary, summarize  # noqa: F401

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- output file
def read_records(path: Path, key: Callable[[dict], tuple], what: str = "safegen report line") -> dict[tuple, dict]:
    """The records of a small JSONL file written line by line (benchmark cells), keyed by
    `key(record)`, in memory; an unfinished last line is cut off (see records.iter_records). Batch
    outputs are never read whole: they are streamed."""
    done: dict[tuple, dict] = {}
    for line in iter_records(Path(path), writer=True, what=what):
        try:
            done[key(line.record)] = line.record
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}:{line.number}: not a {what} ({e}); "
                             "refusing to resume into a damaged file") from None
    return done


def check_fingerprint(meta: Path, data: Path, fingerprint: dict, writer: str = "`safegen detoxify`",
                      others: Sequence[Path] = (), live: Sequence[str] = ()) -> None:
    """Resume only into the same configuration: compare with the fingerprint saved in `meta` (or
    save it, for a new run). `data` is the file the run appends to; `others` hold records of the
    same run too (shard parts). With no record written yet there is nothing to protect, and a new
    configuration replaces the old one, unless a run is still writing there (`live`: ranks holding
    their part locks), whose records would then be merged under the new configuration."""
    if meta.exists():
        old = json.loads(meta.read_text())
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if changed and live:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise InputError(f"{data} is being written by another run with another configuration "
                             f"({details}), whose ranks still write {', '.join(live)}; wait for it to "
                             "finish, rerun with its options, or write elsewhere")
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
    meta = output.with_name(output.name + ".meta.json")
    if shard.world == 1:  # its exclusive output lock keeps every other run out
        check_fingerprint(meta, output, fingerprint, others=part_files(output))
        return
    # Ranks of two runs can hold the shared output lock together: the check and the write of the
    # configuration happen under the merge lock, one rank at a time, and a configuration is never
    # replaced while a rank of another run (signed with another configuration) holds its part lock.
    configuration = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    with merge_lock(output):
        sign_part(output, shard, configuration)
        check_fingerprint(meta, output, fingerprint, others=part_files(output),
                          live=live_writers(output, shard, configuration))


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


def run_batch(prompts: Sequence[PromptLine], output: str | os.PathLike, generate: Callable,
              samples: int, seed: int, batch_size: int, fingerprint: dict,
              shard: Optional[Shard] = None, progress: bool = True,
              lock: Optional[OutputLock] = None) -> RunningSummary:
    """Generate `samples` per prompt and append one JSON line per sample to `output`.

    generate(prompts: list[PromptLine], seeds: list[int]) -> list of report dicts, or a step generator
    that returns them (SafeGenerator.generate_text_steps): the samples of one prompt at a time, up to
    batch_size samples running side by side on the step-level engine. Returns the summary of the finished output (all shards, when this process merged them; else its own part).
    lock: the caller's OutputLock(output, shard), taken before it loaded its model; when None,
    run_batch takes it for the run.
    """
    output = Path(output)
    shard = shard or Shard()
    if lock is None:
        with OutputLock(output, shard) as lock:
            return run_batch(prompts, output, generate, samples, seed, batch_size, fingerprint, shard,
                             progress, lock)
    check_resume(output, fingerprint, shard)
    part = shard.part(output)
    n_prompts = max((p.index for p in prompts), default=-1) + 1
    done = DoneSet(n_prompts, samples)
    summary = RunningSummary()  # of this process's own file
    for line in iter_records(part, writer=True):
        if done.add_from(part, line):
            summary.add(line.record)
    # Samples already in the output or in parts of other world sizes (an earlier run resumed with
    # another number of processes) are done too; the merge collects them. Parts of this world's
    # other ranks hold none of this rank's samples.
    others = [output] if part != output else []
    others += [p for p in part_files(output) if shard.world == 1 or p.name.rsplit("-of-", 1)[1] != str(shard.world)]
    for path in others:
        for line in iter_records(path):
            done.add_from(path, line)
    from tqdm import tqdm
    owned = range(shard.rank, done.total, shard.world)  # k = prompt index * samples + sample
    bar = tqdm(total=len(owned), initial=sum(divmod(k, samples) in done for k in owned),
               desc=f"detoxify{'' if shard.world == 1 else f' [{shard.rank}/{shard.world}]'}",
               unit="sample", file=sys.stderr, disable=not progress)
    groups = _by_prompt(_todo(prompts, samples, seed, shard, done), batch_size)
    fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(finished):
        records = [{"prompt_index": p.index, "line": p.line, "sample": s, **report}
                   for chunk, generation in finished
                   for (p, s, _), report in zip(chunk, generation.result)]
        write_records(fd, records)  # one write and one fsync a round
        for r in records:
            done.add(r["prompt_index"], r["sample"])
            summary.add(r)
        bar.update(len(records))

    # The step-level engine (safegen/engine.py): each prompt's samples are a generation; up to
    # batch_size samples run at once, their forwards merged, and a generation that is done frees its
    # rows at once for the next prompt's. Records are written in input order.
    running: list = []  # (chunk, generation), in the order they started
    try:
        chunk = next(groups, None)
        while chunk is not None or running:
            rows = sum(len(c) for c, g in running if not g.done)
            while chunk is not None and (not rows or rows + len(chunk) <= batch_size):
                running.append((chunk, engine.Generation(
                    lambda c=chunk: generate([p for p, _, _ in c], [sd for _, _, sd in c]))))
                rows += len(chunk)
                chunk = next(groups, None)
            engine.advance([g for _, g in running if not g.done])
            ready = 0
            while ready < len(running) and running[ready][1].done:
                ready += 1
            failed = next((g.result for _, g in running if g.done and isinstance(g.result, BaseException)), None)
            if failed is not None:
                # Keep what is done (a rerun skips it), then stop with the first failure.
                write([(c, g) for c, g in running if g.done and not isinstance(g.result, BaseException)])
                raise failed
            if ready:
                write(running[:ready])
                del running[:ready]
    finally:
        for _, generation in running:
            generation.close()
        os.close(fd)
        bar.close()
    if shard.world == 1 and not part_files(output):
        return summary
    lock.release_part()
    merged, why_not = merge_parts(output, n_prompts, samples)
    if merged is None:
        log.warning("%s: rank %d of %d has written its samples; not merged yet: %s",
                    output, shard.rank, shard.world, why_not)
        return summary
    return merged


def _by_prompt(todo: Iterator[tuple[PromptLine, int, int]], most: int) -> Iterator[list]:
    """The work list in runs of the same prompt's samples, at most `most` long."""
    chunk: list = []
    for item in todo:
        if chunk and (item[0] is not chunk[-1][0] or len(chunk) == most):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _todo(prompts: Sequence[PromptLine], samples: int, seed: int, shard: Shard,
          done: DoneSet) -> Iterator[tuple[PromptLine, int, int]]:
    """(prompt, sample, seed) of each sample this process still has to write, in input order;
    generated lazily, so the work list takes no memory."""
    for p in prompts:
        for s in range(samples):
            k = p.index * samples + s  # the sample's place in the run
            if shard.owns(k) and (p.index, s) not in done:
                # Seeds depend only on the prompt's position and the sample number: stable across
                # resumes and shards.
                yield p, s, seed + k


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
