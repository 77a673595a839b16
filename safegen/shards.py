"""Who may write a batch output, and the merge of shard parts into it: the locking and merging under
safegen/report_file.py, the report file's one owner (nothing else calls this module).

Every lock is an flock, which the kernel drops when its process ends however it ends (kill -9
included), so a crash never leaves a lock that blocks a rerun; the files named `.lock` and
`.merge-lock` only carry the holder's PID for messages, and their existence means nothing.

- `OUT.lock`: a world-1 run holds it exclusively; every rank of a sharded run holds it shared. So a
  world-1 run and any rank never write at once, and the output has one writer whatever the world size.
- `OUT.partR-of-W.lock`: rank R of a world-W run holds it exclusively while it writes its part, and
  signs it with a digest of its configuration once it has checked it (sign_part), so that a rank of a
  run with another configuration can tell it is still writing (live_writers: batch._check_meta).
- `OUT.merge-lock`: taken by a merge, and briefly by a rank taking its part lock or checking the
  configuration, so that a merge sees a fixed set of writers and ranks check one at a time.

A merge runs when a rank (or a world-1 run) finishes: under the merge lock it takes the lock of
every part on disk, of any world size, and gives up if one is held (that rank is still writing and
will merge when it finishes). It merges only if the output and the parts hold every sample of the
run; no `.done` marker is trusted. It writes the merged file beside the output, fsyncs it, renames
it over the output, and only then deletes the parts: a kill at any point leaves either the old
output and the parts, or the merged output and (some of) the parts, and a rerun merges again,
keeping the first copy of each sample.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .prompts import InputError
from .records import DoneSet, Line, fsync_dir, iter_records, sample_key
from .summary import RunningSummary

log = logging.getLogger(__name__)


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


def part_files(output: Path) -> list[Path]:
    """Every shard part of `output` on disk, of any world size: parts themselves, or their lock or
    (older versions') `.done` files, whose part may be gone."""
    pattern = re.compile(re.escape(output.name) + r"\.part(\d+)-of-(\d+)(?:\.lock|\.done)?")
    found = set()
    if output.parent.is_dir():
        for p in output.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) < int(m.group(2)):
                found.add((int(m.group(2)), int(m.group(1))))
    return [Shard(rank, world).part(output) for world, rank in sorted(found)]


def _with_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


class Flock:
    """An flock on `path` (created if missing), exclusive or shared. A lock file is removed when its
    last holder releases it, so a finished run leaves none behind."""

    def __init__(self, path: Path, shared: bool = False):
        self.path, self.shared = path, shared
        self.fd: Optional[int] = None

    def acquire(self, blocking: bool = False, patience: float = 1.0) -> Optional[str]:
        """None once held; else (not blocking) the holder's PID as written in the file. A holder that
        is releasing holds the lock exclusively for an instant (see release): retry for `patience` s."""
        import fcntl

        deadline = time.monotonic() + patience
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                # The holder's PID, first in the file (a rank's part lock adds its configuration).
                holder = (os.pread(fd, 64, 0).decode("ascii", "replace").split() or ["unknown"])[0]
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                return holder
            # The file is removed on release: if that happened between our open and our flock, we
            # hold a lock on a file nobody else will see. Retry on the one that is there now.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        if not self.shared:
            os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        import fcntl

        if self.fd is None:
            return
        try:
            if self.shared:  # remove the file only if no one else holds it: take it exclusively first
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path.unlink(missing_ok=True)  # before the unlock: see the retry in acquire
        except BlockingIOError:
            pass
        os.close(self.fd)
        self.fd = None


class OutputLock:
    """The locks a batch run holds on `output` for its whole run (see the module's docstring); taken
    before the model loads, so that a run that may not write is refused at once. Opening the lock
    files is also the check that the output can be written at all."""

    def __init__(self, output: str | os.PathLike, shard: Optional[Shard] = None):
        self.output = Path(output)
        self.shard = shard or Shard()
        self.path = _with_suffix(self.output, ".lock")
        self.main = Flock(self.path, shared=self.shard.world > 1)
        self.part: Optional[Flock] = None

    def __enter__(self) -> "OutputLock":
        if self.output.is_dir():
            raise InputError(f"{self.output} is a folder; name a file to write the reports to")
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if self.output.exists() and not os.access(self.output, os.W_OK):
                raise PermissionError(13, "Permission denied")
            holder = self.main.acquire()
        except OSError as e:
            raise InputError(f"{self.output}: cannot write there ({e.strerror or e})") from None
        if holder is not None:
            raise InputError(f"{self.output} is being written by another run (process {holder}); "
                             "wait for it to finish, or write elsewhere")
        if self.shard.world > 1:
            part = self.shard.part(self.output)
            self.part = Flock(_with_suffix(part, ".lock"))
            merge = Flock(_with_suffix(self.output, ".merge-lock"))
            merge.acquire(blocking=True)  # a merge in progress finishes before this rank starts
            try:
                holder = self.part.acquire()
            finally:
                merge.release()
            if holder is not None:
                self.part = None
                self.main.release()
                raise InputError(f"{part} is being written by another run (process {holder}, rank "
                                 f"{self.shard.rank} of {self.shard.world}); wait for it to finish")
        return self

    def release_part(self) -> None:
        """This rank has written its part (fsynced): a merge may take it."""
        if self.part is not None:
            self.part.release()
            self.part = None

    def __exit__(self, *exc) -> None:
        self.release_part()
        self.main.release()


def sign_part(output: Path, shard: Shard, configuration: str) -> None:
    """Write the digest of this rank's configuration into its part lock, which it holds (the file
    otherwise carries only its PID): ranks of one run know each other by it (live_writers)."""
    path = _with_suffix(shard.part(output), ".lock")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {configuration}\n".encode(), 0)
    finally:
        os.close(fd)


def live_writers(output: Path, own: Shard, configuration: str) -> list[str]:
    """The shard parts of `output` (any world size) whose lock another live process holds and has
    signed with another configuration than `configuration` (sign_part), as "partR-of-W (process
    PID)": ranks of another run still writing. A rank that has not signed yet has not checked the
    configuration yet; it will, after this one, and find this one signed."""
    busy = []
    for part in part_files(output):
        if part == own.part(output):
            continue
        path = _with_suffix(part, ".lock")
        lock = Flock(path)
        if lock.acquire(patience=0.0) is None:
            lock.release()
            continue
        try:
            pid, _, signed = path.read_text().strip().partition(" ")
        except FileNotFoundError:  # released meanwhile: no longer writing
            continue
        if signed and signed != configuration:
            busy.append(f"{part.name} (process {pid})")
    return busy


def merge_lock(output: Path) -> "_Held":
    """The merge lock, held (blocking) for a `with` block."""
    return _Held(Flock(_with_suffix(output, ".merge-lock")), blocking=True)


def merge_parts(output: Path, prompts: int, samples: int) -> tuple[Optional[RunningSummary], str]:
    """Merge every part of `output` into it if none is being written and together they hold every
    sample of the run (prompts x samples). Returns (the summary of the merged output, "") or
    (None, why not). The caller holds `OUT.lock` (shared or exclusive) and no part lock."""
    with _Held(Flock(_with_suffix(output, ".merge-lock")), blocking=True):
        parts = part_files(output)
        held = []
        try:
            for part in parts:
                lock = Flock(_with_suffix(part, ".lock"))
                holder = lock.acquire()
                if holder is not None:
                    return None, f"{part.name} is still being written (process {holder}); its rank merges when it finishes"
                held.append(lock)
            streams = [output, *parts]
            done, summary = DoneSet(prompts, samples), RunningSummary()
            ordered = True
            for path in streams:
                last = None
                for line in iter_records(path):
                    key = sample_key(path, line)
                    if done.add_from(path, line):  # the first copy of a sample is the one merged
                        summary.add(line.record)
                    ordered &= last is None or key > last
                    last = key
            if not done.complete():
                return None, (f"{done.total - done.count} of {done.total} samples are not written yet; the last "
                              "rank to finish merges (rerun any rank that stopped, with the same command)")
            if not parts:
                return summary, ""  # another rank merged while this one waited for the merge lock
            _write_merged(output, streams, ordered)
            for part in parts:
                part.unlink(missing_ok=True)
                _with_suffix(part, ".done").unlink(missing_ok=True)  # left by older versions
            fsync_dir(output.parent)
            return summary, ""
        finally:
            for lock in held:
                lock.release()


def sort_in_place(output: Path) -> None:
    """Rewrite `output` in sample order (a writer that received its records out of order: Ray's
    workers), atomically, as a merge writes. The caller holds its exclusive lock."""
    _write_merged(output, [output], ordered=False)


class _Held:
    def __init__(self, lock: Flock, blocking: bool):
        self.lock, self.blocking = lock, blocking

    def __enter__(self):
        self.lock.acquire(blocking=self.blocking)
        return self.lock

    def __exit__(self, *exc):
        self.lock.release()


def _pause(stage: str) -> None:
    """Test hook: SAFEGEN_TEST_MERGE_PAUSE=STAGE:SECONDS sleeps at that stage of a merge ("written":
    the merged file is written, "replaced": it replaced the output, the parts are not deleted yet),
    so that a test can kill the process there."""
    hook = os.environ.get("SAFEGEN_TEST_MERGE_PAUSE", "")
    if hook.partition(":")[0] == stage:
        log.warning("merge: paused at %r for %s s (SAFEGEN_TEST_MERGE_PAUSE)", stage, hook.partition(":")[2])
        time.sleep(float(hook.partition(":")[2]))


def _write_merged(output: Path, streams: list[Path], ordered: bool) -> None:
    tmp = _with_suffix(output, ".merging")
    with open(tmp, "wb") as f:
        last = None
        for path, line in _in_sample_order(streams, ordered):
            key = sample_key(path, line)
            if key == last:  # the same sample in two files (a merge killed before it deleted the parts)
                continue
            last = key
            f.write(line.raw)
        f.flush()
        os.fsync(f.fileno())
    _pause("written")
    os.replace(tmp, output)  # atomic: the output is the old file or the merged one
    fsync_dir(output.parent)
    _pause("replaced")


def _in_sample_order(streams: list[Path], ordered: bool) -> Iterator[tuple[Path, Line]]:
    """Every line of the streams by (prompt index, sample), the earlier stream first among equals.
    Each file is in sample order when our writers wrote it: a k-way merge holds one line per file.
    Otherwise (a file edited by hand) sort an index of (key, file, offset), some 100 bytes a line."""
    def keyed(i, path):
        for line in iter_records(path):
            yield sample_key(path, line), i, line

    if ordered:
        for _, i, line in heapq.merge(*(keyed(i, p) for i, p in enumerate(streams)), key=lambda t: t[:2]):
            yield streams[i], line
        return
    index = sorted((sample_key(p, line), i, line.offset) for i, p in enumerate(streams) for line in iter_records(p))
    handles = [open(p, "rb") for p in streams]
    try:
        for _, i, offset in index:
            handles[i].seek(offset)
            raw = handles[i].readline()
            yield streams[i], Line(0, offset, raw, json.loads(raw))
    finally:
        for h in handles:
            h.close()
