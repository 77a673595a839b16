"""Reading prompt files: .txt, .jsonl and .csv, every problem named by file and line."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import SafegenError

log = logging.getLogger(__name__)


class InputError(SafegenError):
    """Bad input file; the message names the file and line."""


@dataclass(frozen=True)
class PromptLine:
    index: int  # ordinal among the prompts read
    line: int  # 1-based line (or CSV record) number in the input file
    text: str


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
            if not problem and not _encodable(value):
                problem = "the prompt holds a lone surrogate (an escape like \\ud800 that is not a character)"
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


def _encodable(text: str) -> bool:
    """JSON can escape half a UTF-16 pair ("\\ud800"); no tokenizer can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
