"""Bearer keys: read from a file once, compared in constant time, never logged."""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Optional

from ..errors import SafegenError


class KeyFileError(SafegenError):
    """An API key file that cannot serve: missing, unreadable or without a key."""


def read_keys(path: str) -> list[bytes]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"--api-key-file {path}: cannot read it ({type(e).__name__})") from None
    keys = [line.strip().encode() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise KeyFileError(f"--api-key-file {path}: holds no key (one key per line)")
    return keys


class Gate:
    """Lets a request through if no keys are set, or if its `Authorization: Bearer` key is one of
    them. Every key is compared (hmac.compare_digest, constant time per key, no early exit), so the
    time taken says nothing about which key nearly matched."""

    def __init__(self, keys: Optional[list[bytes]] = None):
        self.keys = keys

    def allows(self, scope) -> bool:
        if not self.keys:
            return True
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, given = header.partition(b" ")
        given = given.strip()
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == b"bearer"
