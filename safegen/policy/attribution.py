"""From characters to token positions: which generated tokens produced which characters of a text.

A policy blames characters of the decoded answer; the sampler re-masks token positions. The bridge
decodes the tokens themselves, never re-encodes the text: a sampled sequence is often not the
tokenizer's own encoding of its text ("hel" + "lo" where the tokenizer writes "hello"), so offsets
from re-encoding would describe other tokens.

Token j's characters are those that appear when it is appended: the decoded prefixes ids[:j] and
ids[:j+1] differ there. Decoding every prefix costs O(G²); most tokenizers decode locally (a token's
text depends only on a few neighbours), so each token's text is first taken from a short window and
the prefixes are decoded only when those pieces do not add up to the whole text.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Tokens of context on the left of each token when decoding it in a window: enough for the
# joining rules of word-level decoders and for a character split over up to 4 byte-level tokens.
WINDOW = 4


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _spans_from_prefixes(text: str, prefixes: Sequence[str]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for prefix in prefixes:
        common = _common_prefix(prefix, text)
        end = max(start, common)
        # A token that leaves a character incomplete (one byte of "é" in a byte-level BPE) shows as a
        # replacement character that is not in the text: it is part of the text's next character.
        spans.append((start, min(end + 1, len(text)) if len(prefix) > common else end))
        start = end
    return spans


def _align(pieces: Sequence[str], text: str) -> list[tuple[int, int]] | None:
    """Spans of `pieces` in `text`, where `text` is the concatenated pieces less some whitespace
    (transformers' clean-up turns "don ' t" into "don't"); None when it is not."""
    spans, t = [], 0
    for piece in pieces:
        start = t
        for ch in piece:
            if t < len(text) and text[t] == ch:
                t += 1
            elif not ch.isspace():
                return None
        spans.append((start, t))
    return spans if t == len(text) else None


def token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` (special tokens skipped, as the reward decodes it) and each token's
    character span (start, end) in it; a token that shows no characters has an empty span."""
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    windows = []
    for j in range(len(ids)):
        lo = max(0, j - WINDOW)
        windows += [ids[lo:j + 1], ids[lo:j]]
    # A fast tokenizer's own decoder, without transformers' per-call overhead and string clean-up
    # (which _align accounts for): a tenth of the time.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoded = backend.decode_batch(windows, skip_special_tokens=True) if windows else []
    else:
        decoded = tokenizer.batch_decode(windows, skip_special_tokens=True) if windows else []
    pieces = []
    for j in range(len(ids)):
        with_token, before = decoded[2 * j], decoded[2 * j + 1]
        if not with_token.startswith(before) or "\ufffd" in with_token:
            break  # this decoder is not local here, or a character is split over tokens
        pieces.append(with_token[len(before):])
    spans = _align(pieces, text) if len(pieces) == len(ids) else None
    if spans is None:
        prefixes = tokenizer.batch_decode([ids[:j + 1] for j in range(len(ids))], skip_special_tokens=True)
        spans = _spans_from_prefixes(text, prefixes)
    return text, spans


def token_blame(char_blame: np.ndarray, spans: Sequence[tuple[int, int]], width: int) -> np.ndarray:
    """(width,) blame of token positions: each token takes the highest blame among its characters;
    tokens with no characters, and positions past the spans (after the answer ended), get 0."""
    out = np.zeros(width)
    for j, (start, end) in enumerate(spans):
        if end > start:
            out[j] = float(np.max(char_blame[start:end]))
    return out
