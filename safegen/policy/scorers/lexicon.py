"""`lexicon`: word lists and regular expressions; 1 where any entry matches, else 0.

Options:
  words:       [list of words or phrases]
  words_file:  path to a word list, one entry a line, `#` starts a comment (relative to the policy file)
  patterns:    [list of regular expressions, searched case-insensitively as written]

Word entries match whole words only, case-insensitively, and tolerate the usual evasions:
leetspeak digits and symbols (0->o, 1->i/l, 3->e, 4->a, 5->s, 7->t, 8->b, 9->g, @->a, $->s, !->i),
repeated letters ("fuuuck") and one separator between letters ("f.u.c.k", "f-u-c-k", "f u c k").
An entry ending in `*` also matches any continuation of the word ("fuck*" matches "fucking").
Whole-word matching is what keeps "ass" out of "classic" and "cunt" out of "Scunthorpe".

The score is binary, so a lexicon is most useful as a hard constraint (`hard: true` in the policy).
Its blame is exact: 1 on the characters of every match, 0 elsewhere.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np

from .base import Options, OptionError, Scorer

# Characters commonly typed in place of a letter. Digits count as letters in whole-word checks, so
# "1diot" is one word and "b1tch" is not split at the 1.
LEET = {
    "a": "4@", "b": "8", "e": "3", "g": "9", "i": "1!", "l": "1",
    "o": "0", "s": "5$", "t": "7+",
}

# Separators people put between letters to dodge filters. Spaces are handled separately (see
# _word_regex) because "an al" must not match "anal".
INNER_SEPARATORS = r"[._\-*~]"

# Not preceded / followed by a letter or digit: the whole-word condition, Unicode aware.
WORD_START = r"(?<![^\W_])"
WORD_END = r"(?![^\W_])"


def _letter(ch: str) -> str:
    """One letter of an entry: itself or its leetspeak stand-ins, repeated any number of times."""
    if ch in LEET:
        return "[" + re.escape(ch + LEET[ch]) + "]+"
    return re.escape(ch) + "+"


def _word_regex(word: str) -> str:
    letters = [_letter(ch) for ch in word]
    # Either letters run together with at most one punctuation separator between each pair, or
    # every pair is separated by exactly one space ("f u c k"). Mixing the two is not allowed,
    # since that would join separate real words ("an al" -> "anal").
    tight = (INNER_SEPARATORS + "?").join(letters)
    if len(letters) > 1:
        spaced = " ".join(letters)
        return f"(?:{tight}|{spaced})"
    return tight


def entry_regex(entry: str) -> str:
    """Regex for one word-list entry: a word or a phrase, optionally ending in `*`."""
    entry = _normalise(entry).strip()
    prefix = entry.endswith("*")
    if prefix:
        entry = entry[:-1].rstrip()
    words = entry.split()
    body = r"[\W_]+".join(_word_regex(w) for w in words)
    tail = r"[^\W_]*" if prefix else ""
    return WORD_START + body + tail + WORD_END


def _normalise(text: str) -> str:
    # NFKC folds full-width and stylised letters ("ｆｕｃｋ", "𝐟𝐮𝐜𝐤") to plain ones; casefold is the
    # Unicode-correct lowercase.
    return unicodedata.normalize("NFKC", text).casefold()


def _normalise_with_origin(text: str) -> tuple[str, list[int]]:
    """The normalised text and, for each of its characters, the index of the character of `text` it
    comes from (normalisation can change the length: "ﬁ" -> "fi", "ß" -> "ss")."""
    normal = _normalise(text)
    pieces = [_normalise(ch) for ch in text]
    if "".join(pieces) == normal:
        return normal, [i for i, piece in enumerate(pieces) for _ in piece]
    # Characters that compose with their neighbours (a letter and a combining accent): the prefix
    # lengths say where each normalised character first appears.
    origin, done = [], 0
    for i in range(len(text)):
        grown = len(_normalise(text[:i + 1]))
        origin += [i] * max(grown - done, 0)
        done = max(done, grown)
    return normal, origin[:len(normal)]


def read_word_file(path: Path) -> list[str]:
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(line)
    return entries


class LexiconScorer(Scorer):
    name = "lexicon"
    path_options = ("words_file",)
    labels = ("match",)

    def __init__(self, words: list[str] = (), patterns: list[str] = ()):
        self.words = list(words)
        self.patterns = list(patterns)
        regexes = []
        if self.words:
            # One alternation for all words, so a text is scanned once however long the list.
            regexes.append(re.compile("|".join(entry_regex(w) for w in self.words), re.IGNORECASE))
        # User patterns stay separate: inline flags and group numbers must mean what they wrote.
        regexes += [re.compile(p, re.IGNORECASE) for p in self.patterns]
        self._regexes = regexes

    @classmethod
    def from_options(cls, options) -> "LexiconScorer":
        opts = Options(options)
        words = opts.string_list("words", []) or []
        words_file = opts.path("words_file")
        patterns = opts.string_list("patterns", []) or []
        opts.done()
        for i, word in enumerate(words):
            if not word.strip(" *"):
                raise OptionError(("words", i), "empty word")
        if words_file is not None:
            try:
                words = words + read_word_file(words_file)
            except (OSError, UnicodeDecodeError) as e:
                raise OptionError("words_file", f"cannot read {words_file}: {e}") from None
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as e:
                raise OptionError(("patterns", i), f"invalid regular expression {pattern!r}: {e}") from None
        if not words and not patterns:
            raise OptionError(None, "a lexicon needs `words`, a non-empty `words_file` or `patterns`")
        return cls(words, patterns)

    def matches(self, text: str) -> bool:
        text = _normalise(text)
        return any(regex.search(text) for regex in self._regexes)

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"match": np.array([float(self.matches(t)) for t in texts], dtype=np.float64)}

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of `text` (start, end) that some entry matches, as `matches` scans it."""
        normal, origin = _normalise_with_origin(text)
        out = []
        for regex in self._regexes:
            for m in regex.finditer(normal):
                # An empty match (a pattern such as "^") still makes the text toxic: blame one character.
                last = min(max(m.end(), m.start() + 1), len(normal)) - 1
                if last >= 0:
                    out.append((origin[min(m.start(), last)], origin[last] + 1))
        return out

    def blame(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        rows = []
        for text in texts:
            blame = np.zeros(len(text))
            for start, end in self.spans(text):
                blame[start:end] = 1.0
            rows.append(blame)
        return {"match": rows}
