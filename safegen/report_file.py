"""The one owner of a batch run's report file: who may write it, whether a run may resume into it, what
it already holds, writing each sample exactly once, and merging shard parts into it.

`safegen detoxify` in one process, under `accelerate launch` (one part per rank, merged by the last
to finish) and on Ray (one driver writing what the workers return) all write through a ReportFile;
batch.py only decides what to generate. What it guarantees, however the run ends and is rerun:

- one writer at a time (safegen/shards.py: flocks the kernel drops with their process, kill -9
  included), taken before a model loads, so a run that may not write is refused at once;
- a run resumes only under the configuration it started with (a sidecar `OUT.meta.json` holds its
  fingerprint; `check_fingerprint`);
- each record is one write() and each batch of them one fsync, so a killed run leaves at most an
  unfinished last line, which the next run cuts off;
- each (prompt index, sample) is written once: `write` drops a record whose sample is already in the
  file, so a batch that a scheduler ran twice (Ray's retries) or that a rerun redid adds nothing;
- the finished output is in sample order: a writer that received records out of order (Ray's workers
  finish in any order) has the file rewritten in order at the end, atomically, as a merge is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .prompts import InputError
from .records import DoneSet, iter_records, sample_key, write_records
from .shards import (OutputLock, Shard, live_writers, merge_lock, merge_parts, part_files, sign_part,
                     sort_in_place)
from .summary import RunningSummary

log = logging.getLogger(__name__)


class ReportFile:
    """`with ReportFile(output, fingerprint, prompts, samples, shard) as report:` holds the output's
    locks, has checked the configuration, and knows what is done (`report.done`, one bit per sample);
    `report.write(records)` appends the new ones; `report.finish()` merges or orders the file and
    returns the run's summary."""

    def __init__(self, output: str | os.PathLike, fingerprint: dict, prompts: int, samples: int,
                 shard: Optional[Shard] = None):
        self.output = Path(output)
        self.fingerprint = fingerprint
        self.prompts, self.samples = prompts, samples
        self.shard = shard or Shard()
        self.part = self.shard.part(self.output)
        self.lock = OutputLock(self.output, self.shard)
        self.done = DoneSet(prompts, samples)
        self.summary = RunningSummary()  # of this process's own file (its part, or the output)
        self._fd: Optional[int] = None
        self._last: Optional[tuple[int, int]] = None
        self._ordered = True

    # ------------------------------------------------------------------ opening
    def __enter__(self) -> "ReportFile":
        self.lock.__enter__()
        try:
            check_resume(self.output, self.fingerprint, self.shard)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def open(self) -> "ReportFile":
        """Read what is done (the caller's model is loaded by now) and open the file for appending."""
        for line in iter_records(self.part, writer=True):
            if self.done.add_from(self.part, line):
                self.summary.add(line.record)
            key = sample_key(self.part, line)
            self._ordered &= self._last is None or key > self._last
            self._last = key
        # Samples already in the output or in parts of other world sizes (an earlier run resumed with
        # another number of processes) are done too; the merge collects them. Parts of this world's
        # other ranks hold none of this rank's samples.
        others = [self.output] if self.part != self.output else []
        others += [p for p in part_files(self.output)
                   if self.shard.world == 1 or p.name.rsplit("-of-", 1)[1] != str(self.shard.world)]
        for path in others:
            for line in iter_records(path):
                self.done.add_from(path, line)
        self._fd = os.open(self.part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.lock.__exit__(*exc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------ writing
    def write(self, records: Iterable[dict]) -> int:
        """Append the records whose sample is not written yet (one write each, one fsync for all);
        returns how many were new. A sample seen twice, here or in the file, is written once."""
        if self._fd is None:
            self.open()
        new = []
        for r in records:
            key = (int(r["prompt_index"]), int(r["sample"]))
            if self.done.add(*key):
                new.append(r)
                self._ordered &= self._last is None or key > self._last
                self._last = key
        if new:
            write_records(self._fd, new)
            for r in new:
                self.summary.add(r)
        return len(new)

    def finish(self) -> RunningSummary:
        """The run's writing is over: merge the shard parts when this is the last rank to finish, or
        put a file written out of order in sample order. The summary of the finished output (all
        shards, when this process merged them; else its own part)."""
        self.close()
        if self.shard.world == 1 and not part_files(self.output):
            if not self._ordered:
                sort_in_place(self.output)
            return self.summary
        self.lock.release_part()
        merged, why_not = merge_parts(self.output, self.prompts, self.samples)
        if merged is None:
            log.warning("%s: rank %d of %d has written its samples; not merged yet: %s",
                        self.output, self.shard.rank, self.shard.world, why_not)
            return self.summary
        return merged


# ---------------------------------------------------------------------- the configuration
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


def _check_meta(output: Path, fingerprint: dict, shard: Shard) -> None:
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


def check_resume(output: str | os.PathLike, fingerprint: dict, shard: Optional[Shard] = None) -> None:
    """Refuse to resume `output` under another configuration (rank 0 records it for a new run; the
    other ranks wait for that record)."""
    output, shard = Path(output), shard or Shard()
    if shard.rank == 0:
        _check_meta(output, fingerprint, shard)
    else:
        _wait_for_meta(output, fingerprint, shard)


def _wait_for_meta(output: Path, fingerprint: dict, shard: Shard, timeout: float = 600.0) -> None:
    meta = output.with_name(output.name + ".meta.json")
    t0 = time.monotonic()
    while not meta.exists():
        if time.monotonic() - t0 > timeout:
            raise InputError(f"{meta}: rank 0 did not create it within {timeout:.0f} s")
        time.sleep(0.05)
    _check_meta(output, fingerprint, shard)
