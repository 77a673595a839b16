"""The one interface every toxicity scorer implements.

A scorer turns a batch of texts into scores in [0, 1], one array per label it reports. It knows
nothing about policies, files or thresholds: the policy decides which scorers to run, how to weigh
them and what counts as toxic. Adding a scorer is one new file with a `Scorer` subclass and one
line in `scorers/__init__.py`.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from ...errors import SafegenError


class OptionError(SafegenError):
    """A scorer option is invalid.

    Scorers don't know which policy file the option came from, so they raise this with the option's
    key and the problem; the policy loader re-raises it as a PolicyError naming the file and the
    full key path.
    """

    def __init__(self, key: str | Sequence[str | int] | None, problem: str):
        if key is None:
            self.key: tuple = ()
        elif isinstance(key, (str, int)):
            self.key = (key,)
        else:
            self.key = tuple(key)
        self.problem = problem
        super().__init__(f"{'.'.join(map(str, self.key)) or '(options)'}: {problem}")


class Scorer:
    """Scores texts for toxicity.

    Subclasses set `name` (the registry name) and `labels` (the labels `score` returns, known before
    any model is loaded so that a policy can be validated cheaply), implement `from_options` and
    `score`, and load models lazily, at the first `score` call.
    """

    name: ClassVar[str] = ""
    # Options that name local files: the policy loader resolves them relative to the policy file
    # that sets them, before `from_options` sees them.
    path_options: ClassVar[tuple[str, ...]] = ()
    # Options that are either a local path or a model hub id: resolved like `path_options` only
    # when they look like a path or exist next to the policy file.
    path_or_hub_options: ClassVar[tuple[str, ...]] = ()

    labels: tuple[str, ...] = ()
    # The packages `score` imports, as (import name, distribution, install command): checked when
    # the policy loads (`check_available`), not when the first text is scored after a model load.
    requires: ClassVar[tuple[tuple[str, str, str], ...]] = ()

    def check_available(self) -> None:
        """Raise OptionError naming the first required package that is not installed. Packages are
        looked for, not imported, so loading a policy stays cheap."""
        for module, distribution, install in self.requires:
            if not installed(module):
                raise OptionError(None, f"the {self.name} scorer needs the {distribution} package "
                                        f"(import {module}), which is not installed: {install}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Scorer":
        """Build the scorer from its YAML options; raise OptionError for anything invalid."""
        raise NotImplementedError

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Return {label: float array of shape (len(texts),) in [0, 1]} for every label in `labels`."""
        raise NotImplementedError

    def blame(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        """Which characters each label's score objects to: {label: one float array of len(text) in
        [0, 1] per text}. A character's blame is at most the text's score for that label, so a text
        the scorer finds harmless blames nothing much; see `spread` for the rule the soft scorers share."""
        raise NotImplementedError(f"scorer {self.name!r} cannot say which characters it objects to")

    def blame_cost(self, texts: list[str]) -> int:
        """Texts `blame(texts)` scores with the model: 0 for an exact attribution, more for occlusion."""
        return 0


class Options:
    """Reads a scorer's option mapping, checking types, and rejects keys nobody read.

    Usage: read every option with the typed getters, then call `done()`, which raises OptionError
    for an unknown key and lists the known ones (typos are the commonest policy mistake).
    """

    def __init__(self, options: Mapping[str, Any] | None):
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise OptionError(None, f"options must be a mapping, got {type(options).__name__}")
        self._options = dict(options)
        self._known: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._options

    def _take(self, key: str, default: Any) -> Any:
        self._known.append(key)
        return self._options.get(key, default)

    def string(self, key: str, default: str | None = None, choices: Iterable[str] | None = None,
               required: bool = False) -> str | None:
        value = self._take(key, default)
        if value is None:
            if required:
                raise OptionError(key, "is required")
            return None
        if not isinstance(value, str):
            raise OptionError(key, f"must be a string, got {type(value).__name__} {value!r}")
        if choices is not None:
            choices = tuple(choices)
            if value not in choices:
                raise OptionError(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(key, f"must be an integer, got {type(value).__name__} {value!r}")
        if value < minimum:
            raise OptionError(key, f"must be >= {minimum}, got {value}")
        return value

    def string_list(self, key: str, default: Sequence[str] | None = None) -> list[str] | None:
        value = self._take(key, default)
        if value is None:
            return None
        if isinstance(value, str):
            # A single string is the commonest way to mean a one-item list.
            value = [value]
        if not isinstance(value, list):
            raise OptionError(key, f"must be a list of strings, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise OptionError((key, i), f"must be a string, got {type(item).__name__} {item!r}")
        return list(value)

    def path(self, key: str, kind: str = "file") -> Path | None:
        """A local path (already resolved by the loader) that must exist now, not at first use."""
        value = self._take(key, None)
        if value is None:
            return None
        if not isinstance(value, (str, Path)):
            raise OptionError(key, f"must be a path string, got {type(value).__name__} {value!r}")
        path = Path(value).expanduser()
        if kind == "file" and not path.is_file():
            raise OptionError(key, f"file not found: {path}")
        if kind == "dir" and not path.is_dir():
            raise OptionError(key, f"folder not found: {path}")
        return path

    def raw(self, key: str, default: Any = None) -> Any:
        return self._take(key, default)

    def done(self) -> None:
        unknown = [k for k in self._options if k not in self._known]
        if unknown:
            raise OptionError(unknown[0], "unknown option; known options: "
                              + (", ".join(sorted(self._known)) or "none"))


def installed(module: str) -> bool:
    """Whether `module` (a top-level name) can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken entry in sys.modules
        return False


def device_option(options: Options, key: str = "device") -> str:
    """`cpu`, `cuda`, `cuda:N`, `mps` or `auto` (cuda when available), checked without importing torch."""
    value = options.string(key, "cpu")
    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda", "mps", "auto") or (index and not (kind == "cuda" and index.isdigit())):
        raise OptionError(key, f"must be cpu, cuda, cuda:N, mps or auto; got {value!r}")
    return value


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# A word, for attribution: a run of non-space characters (punctuation stays with its word).
WORD = re.compile(r"\S+")


def spread(score: float, contributions: Sequence[float], spans: Sequence[tuple[int, int]],
           length: int) -> np.ndarray:
    """Per-character blame of a text with `score`, from each word's contribution to it.

    The word that pushes the score up the most gets the whole score; another word gets the score
    times its contribution relative to that one; words that pull the score down, and characters
    outside words, get 0. Relative shares keep blame where it is when a classifier saturates (two
    slurs: removing either leaves the score near 1, yet both are to blame), and scaling by the score
    leaves a harmless text's blame near 0, so a blame-weighted re-masking falls back to uniform.
    """
    blame = np.zeros(length)
    push = np.maximum(np.asarray(contributions, dtype=np.float64), 0.0)
    if push.size and push.max() > 0:
        for (start, end), share in zip(spans, push / push.max()):
            blame[start:end] = np.maximum(blame[start:end], score * share)
    return blame


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def without_word(text: str, span: tuple[int, int]) -> str:
    """`text` with the word at `span` and the whitespace before it removed."""
    left, right = text[:span[0]].rstrip(), text[span[1]:]
    return left + right if left and right else left or right.lstrip()


def occlusion_blame(scorer: Scorer, texts: list[str]) -> dict[str, list[np.ndarray]]:
    """Blame for any classifier by occlusion: a word's contribution is how much the score's logit
    drops when the word is removed (in logits, so that a drop near a score of 1 still counts).
    Every text and each of its one-word-shorter variants are scored in one `score` call."""
    spans = [[m.span() for m in WORD.finditer(t)] for t in texts]
    batch = []
    for text, words in zip(texts, spans):
        batch += [text] + [without_word(text, w) for w in words]
    scores = scorer.score(batch) if batch else {label: np.zeros(0) for label in scorer.labels}
    out = {}
    for label in scorer.labels:
        s = np.asarray(scores[label], dtype=np.float64)
        rows, at = [], 0
        for text, words in zip(texts, spans):
            full, occluded = s[at], s[at + 1:at + 1 + len(words)]
            rows.append(spread(full, _logit(full) - _logit(occluded), words, len(text)))
            at += 1 + len(words)
        out[label] = rows
    return out


def occlusion_cost(texts: list[str]) -> int:
    return sum(1 + len(WORD.findall(t)) for t in texts)
