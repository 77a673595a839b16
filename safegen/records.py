"""JSONL report files read as a stream, and the set of finished samples as a bitmap.

A batch output can hold millions of reports (RealToxicityPrompts' protocol: 2.5 million); resuming
it must not hold them. Files are read line by line, and what resume needs, which samples are
finished, is one bit per sample of the run.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from .prompts import InputError

log = logging.getLogger(__name__)


class Line(NamedTuple):
    number: int  # 1-based
    offset: int  # byte offset of the line in its file
    raw: bytes  # the line with its newline
    record: dict


def iter_records(path: Path, writer: bool = False, what: str = "safegen report line") -> Iterator[Line]:
    """The whole lines of a JSONL file, parsed, one at a time. Each record is written with its newline
    in one write(), so only an unterminated tail can be unfinished. `writer`: the caller holds the
    file's lock, so the tail was left by a killed run and is cut off in place; anyone else skips it
    (its writer may be finishing it). A broken line with lines after it is not ours to repair: that
    is an error naming the line."""
    if not path.exists():
        return
    offset, number = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            number += 1
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise TypeError("not a JSON object")
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
                raise InputError(f"{path}:{number}: not a {what} ({e}); "
                                 "refusing to resume into a damaged file") from None
            yield Line(number, offset, raw, record)
            offset += len(raw)
    size = path.stat().st_size
    if writer and size > offset:
        log.warning("%s: cut off an unfinished last line (%d bytes) left by an interrupted run", path, size - offset)
        with open(path, "r+b") as f:
            f.truncate(offset)


def sample_key(path: Path, line: Line) -> tuple[int, int]:
    try:
        return int(line.record["prompt_index"]), int(line.record["sample"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}:{line.number}: not a safegen report line (no {e}); "
                         "refusing to resume into a damaged file") from None


class DoneSet:
    """Which samples (prompt index, sample number) of a run are finished: one bit each, so resuming
    100,000 prompts x 25 samples takes 312 KB."""

    def __init__(self, prompts: int, samples: int):
        self.prompts, self.samples = prompts, samples
        self.bits = bytearray((prompts * samples + 7) // 8)
        self.count = 0

    @property
    def total(self) -> int:
        return self.prompts * self.samples

    def _bit(self, prompt_index: int, sample: int) -> int:
        return prompt_index * self.samples + sample

    def add_from(self, path: Path, line: Line) -> bool:
        """Mark the sample of `line` finished; False if it already was. A sample outside the run is
        an error naming the line."""
        prompt_index, sample = sample_key(path, line)
        if not (0 <= prompt_index < self.prompts and 0 <= sample < self.samples):
            raise InputError(f"{path}:{line.number}: sample {sample} of prompt {prompt_index} is not part of "
                             f"this run ({self.prompts} prompts x {self.samples} samples); write elsewhere")
        return self.add(prompt_index, sample)

    def add(self, prompt_index: int, sample: int) -> bool:
        bit = self._bit(prompt_index, sample)
        mask = 1 << (bit & 7)
        if self.bits[bit >> 3] & mask:
            return False
        self.bits[bit >> 3] |= mask
        self.count += 1
        return True

    def __contains__(self, key: tuple[int, int]) -> bool:
        bit = self._bit(*key)
        return bool(self.bits[bit >> 3] & (1 << (bit & 7)))

    def complete(self) -> bool:
        return self.count == self.total


def write_records(fd: int, records: Iterable[dict]) -> None:
    """Append records to the open file `fd` as JSON lines, each line in one write(), then fsync
    once: a kill leaves whole lines and at most one cut-off tail, which iter_records cuts off."""
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


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
