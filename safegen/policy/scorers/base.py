"""The one interface every toxicity scorer implements.

A scorer turns a batch of texts into scores in [0, 1], one array per label it reports. It knows
nothing about policies, files or thresholds: the policy decides which scorers to run, how to weigh
them and what counts as toxic. Adding a scorer is one new file with a `Scorer` subclass and one
line in `scorers/__init__.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np


class OptionError(ValueError):
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

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Scorer":
        """Build the scorer from its YAML options; raise OptionError for anything invalid."""
        raise NotImplementedError

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Return {label: float array of shape (len(texts),) in [0, 1]} for every label in `labels`."""
        raise NotImplementedError


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
