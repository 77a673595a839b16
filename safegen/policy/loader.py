"""Reading policy YAML files: `extends`, merging, validation, and building the Policy.

Where policies are found: `load_policy` takes a path to a YAML file, or the bare name of a shipped
policy (`default`, `strict`, `offline`), which is looked up in the repository's `policies/` folder
(found relative to this package, so it works from a checkout and after `pip install -e .`) and then
in `safegen/policies/`, where a packager may copy the folder for a non-editable install. There is
one copy in the repository: `policies/` at its root.

`extends: <path or shipped name>` starts from another policy (a path is relative to the extending
file) and overrides it: mappings are merged key by key, lists and scalars are replaced, and
`classifiers` are merged by their `name`, so an override can change one option of one classifier.
Paths inside a file (word lists, checkpoints, local models) are relative to the file that writes
them, even when another file extends it.

Every problem is a PolicyError naming the file that set the offending value, its key path
(`classifiers[detoxify].variant`) and what is wrong. Model weights are not loaded here: scorers load
them at their first `score` call, so loading a policy is cheap and works offline, while the local
files it names, and the packages each scorer needs (`Scorer.requires`), are checked now.
"""
from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ..refine.config import DEFAULT_ALPHA
from .policy import (AGGREGATES, DEFAULT_REFUSAL, LABEL_AGGREGATES, ON_TOXIC, TRANSFORMS, Classifier,
                     Policy, PolicyError)
from .scorers import SCORERS, OptionError

_PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED_DIRS = (_PACKAGE.parent / "policies", _PACKAGE / "policies")

POLICY_KEYS = ("description", "extends", "classifiers", "aggregate", "threshold", "label_thresholds",
               "reward", "on_toxic", "refusal_text")
CLASSIFIER_KEYS = ("name", "scorer", "weight", "label_aggregate", "hard", "label_thresholds")
REWARD_KEYS = ("transform", "alpha", "clip")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")   # no dots: `label_thresholds` keys are "classifier.label"

KeyPath = tuple  # of str (mapping keys, classifier names) and int (list indexes)


def shipped_policies() -> dict[str, Path]:
    """Shipped policy names and their files (the first folder in SHIPPED_DIRS wins)."""
    found: dict[str, Path] = {}
    for folder in SHIPPED_DIRS:
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def load_policy(name_or_path: str | os.PathLike | Policy) -> Policy:
    """Load and validate a policy from a YAML file or a shipped policy name (a Policy is returned
    as it is)."""
    if isinstance(name_or_path, Policy):
        return name_or_path
    path = _find_policy(name_or_path)
    data, origins = _read_chain(path, [])
    return _Builder(data, origins, path).build()


def format_key(key: KeyPath) -> str:
    out = ""
    for i, part in enumerate(key):
        if isinstance(part, int) or (i > 0 and key[i - 1] == "classifiers"):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _fail(file: Path, key: KeyPath, problem: str) -> PolicyError:
    return PolicyError(f"{file}: {format_key(key)}: {problem}")


# -- finding files -----------------------------------------------------------------------------

def _is_bare_name(value: str) -> bool:
    return bool(NAME.match(value))


def _find_policy(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = shipped_policies()
    if _is_bare_name(str(name_or_path)) and str(name_or_path) in shipped:
        return shipped[str(name_or_path)].resolve()
    raise PolicyError(f"{name_or_path}: no such policy file, and no shipped policy of that name; "
                      f"shipped policies: {', '.join(shipped) or 'none found'}")


def _find_parent(value: Any, file: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(file, ("extends",), f"must be a policy path or shipped name, got {value!r}")
    relative = (file.parent / value).expanduser()
    if relative.is_file():
        return relative.resolve()
    shipped = shipped_policies()
    if _is_bare_name(value) and value in shipped:
        return shipped[value].resolve()
    raise _fail(file, ("extends",), f"no policy file {relative} and no shipped policy {value!r}; "
                f"shipped policies: {', '.join(shipped) or 'none found'}")


# -- reading, extends and merging --------------------------------------------------------------

def _read_chain(path: Path, chain: list[Path]) -> tuple[dict, dict[KeyPath, Path]]:
    """The merged data of `path` and everything it extends, and which file set each key."""
    data = _read_file(path)
    extends = data.pop("extends", None)
    if extends is None:
        origins: dict[KeyPath, Path] = {}
        _mark(origins, (), data, path)
        return data, origins
    parent = _find_parent(extends, path)
    if parent in chain or parent == path:
        names = " -> ".join(str(p) for p in [*chain, path, parent])
        raise _fail(path, ("extends",), f"extends cycle: {names}")
    base, origins = _read_chain(parent, [*chain, path])
    _merge(base, data, (), origins, path)
    return base, origins


def _read_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: invalid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(path, (), f"a policy must be a mapping of keys, got {type(data).__name__}")
    _check_keys(data, POLICY_KEYS, (), path)
    if "classifiers" in data:
        data["classifiers"] = _classifiers_by_name(data["classifiers"], path)
    return data


def _classifiers_by_name(entries: Any, file: Path) -> dict[str, dict]:
    """The `classifiers` list as {name: options}: merging by name across `extends` is then a plain
    mapping merge. `name` defaults to the scorer's name, and `scorer` to the name."""
    if not isinstance(entries, list):
        raise _fail(file, ("classifiers",), f"must be a list of classifiers, got {type(entries).__name__}")
    out: dict[str, dict] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"scorer": entry}   # `- profanity_check` is a classifier with no options
        if not isinstance(entry, dict):
            raise _fail(file, ("classifiers", i), f"must be a mapping, got {type(entry).__name__}")
        entry = dict(entry)
        name = entry.pop("name", None) or entry.get("scorer")
        if name is None:
            raise _fail(file, ("classifiers", i), "needs a `name` or a `scorer`")
        if not isinstance(name, str) or not NAME.match(name):
            raise _fail(file, ("classifiers", i, "name"),
                        f"must be letters, digits, '_' or '-' (no dots), got {name!r}")
        if name in out:
            raise _fail(file, ("classifiers", i, "name"), f"two classifiers are named {name!r}")
        _resolve_paths(entry, file.parent)
        out[name] = entry
    return out


def _resolve_paths(entry: dict, folder: Path) -> None:
    """Make the file options of one classifier absolute, relative to the file that writes them."""
    path_keys = {k for cls in SCORERS.values() for k in cls.path_options}
    maybe_path_keys = {k for cls in SCORERS.values() for k in cls.path_or_hub_options}
    for key, value in entry.items():
        if not isinstance(value, str) or not value:
            continue
        candidate = folder / Path(value).expanduser()
        if key in path_keys:
            entry[key] = str(candidate)
        elif key in maybe_path_keys and (value.startswith(("/", "./", "../", "~")) or candidate.exists()):
            # `org/model` is a hub id unless such a folder exists next to the policy file.
            entry[key] = str(candidate)


def _merge(base: dict, override: dict, prefix: KeyPath, origins: dict, file: Path) -> None:
    for key, value in override.items():
        here = (*prefix, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, here, origins, file)
        else:
            base[key] = copy.deepcopy(value)
            _mark(origins, here, value, file)


def _mark(origins: dict, key: KeyPath, value: Any, file: Path) -> None:
    origins[key] = file
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(origins, (*key, k), v, file)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _mark(origins, (*key, i), v, file)


def _check_keys(mapping: dict, known: tuple[str, ...], key: KeyPath, file: Path) -> None:
    for k in mapping:
        if k not in known:
            raise _fail(file, (*key, k), f"unknown key; known keys: {', '.join(known)}")


# -- validation and building -------------------------------------------------------------------

class _Builder:
    """Validates the merged data and builds the Policy, blaming the file that set each value."""

    def __init__(self, data: dict, origins: dict[KeyPath, Path], source: Path):
        self.data, self.origins, self.source = data, origins, source

    def fail(self, key: KeyPath, problem: str) -> PolicyError:
        for n in range(len(key), -1, -1):
            if key[:n] in self.origins:
                return _fail(self.origins[key[:n]], key, problem)
        return _fail(self.source, key, problem)

    def number(self, value: Any, key: KeyPath, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
        # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string; accept numeric strings
        # so that the natural spelling works.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"must be a number, got {value!r}")
        value = float(value)
        if (low is not None and (value < low or (low_open and value == low))) or \
                (high is not None and (value > high or (high_open and value == high))):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise self.fail(key, f"must be in {lo}{low if low is not None else '-inf'}, "
                            f"{high if high is not None else 'inf'}{hi}, got {value}")
        return value

    def choice(self, value: Any, choices, key: KeyPath) -> str:
        if value not in tuple(choices):
            raise self.fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def string(self, value: Any, key: KeyPath) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {type(value).__name__} {value!r}")
        return value

    def mapping(self, value: Any, key: KeyPath) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__} {value!r}")
        return value

    def build(self) -> Policy:
        d = self.data
        classifiers_data = d.get("classifiers")
        if not classifiers_data:
            raise self.fail(("classifiers",), "a policy needs at least one classifier")
        classifiers = [self.classifier(name, dict(entry)) for name, entry in classifiers_data.items()]
        aggregate = self.choice(d.get("aggregate", "max"), AGGREGATES, ("aggregate",))
        threshold = self.number(d.get("threshold", 0.5), ("threshold",), 0.0, 1.0)
        self.policy_label_thresholds(d.get("label_thresholds", {}), classifiers)

        soft = [c for c in classifiers if not c.hard]
        if aggregate == "noisy_or":
            for c in soft:
                if c.weight > 1:
                    raise self.fail(("classifiers", c.name, "weight"),
                                    f"noisy_or needs weights in [0, 1] (w * s is a probability), got {c.weight}")
        if aggregate == "weighted_mean" and soft and sum(c.weight for c in soft) == 0:
            raise self.fail(("classifiers",), "weighted_mean needs a classifier with weight > 0")

        reward = self.mapping(d.get("reward") or {}, ("reward",))
        for k in reward:
            if k not in REWARD_KEYS:
                raise self.fail(("reward", k), f"unknown key; known keys: {', '.join(REWARD_KEYS)}")
        transform = self.choice(reward.get("transform", "neg_toxicity"), TRANSFORMS, ("reward", "transform"))
        alpha = self.number(reward.get("alpha", DEFAULT_ALPHA), ("reward", "alpha"), 0.0, low_open=True)
        clip = self.number(reward.get("clip", 1e-4), ("reward", "clip"), 0.0, 1.0, low_open=True,
                           high_open=True)
        on_toxic = self.choice(d.get("on_toxic", "flag"), ON_TOXIC, ("on_toxic",))
        refusal_text = self.string(d.get("refusal_text", DEFAULT_REFUSAL), ("refusal_text",))
        if on_toxic == "refuse" and not refusal_text.strip():
            raise self.fail(("refusal_text",), "on_toxic: refuse needs a non-empty refusal_text")
        self.string(d.get("description", ""), ("description",))  # for the reader of the file only
        return Policy(classifiers, aggregate=aggregate, threshold=threshold, transform=transform,
                      alpha=alpha, clip=clip, on_toxic=on_toxic, refusal_text=refusal_text,
                      source=self.source)

    def classifier(self, name: str, entry: dict) -> Classifier:
        key: KeyPath = ("classifiers", name)
        scorer_name = entry.pop("scorer", name)
        if scorer_name not in SCORERS:
            raise self.fail((*key, "scorer"), f"unknown scorer {scorer_name!r}; known scorers: "
                            f"{', '.join(sorted(SCORERS))}")
        weight = self.number(entry.pop("weight", 1.0), (*key, "weight"), 0.0)
        label_aggregate = self.choice(entry.pop("label_aggregate", "max"), LABEL_AGGREGATES,
                                      (*key, "label_aggregate"))
        hard = entry.pop("hard", False)
        if not isinstance(hard, bool):
            raise self.fail((*key, "hard"), f"must be true or false, got {hard!r}")
        thresholds = self.mapping(entry.pop("label_thresholds", {}) or {}, (*key, "label_thresholds"))
        try:
            scorer = SCORERS[scorer_name].from_options(entry)
            scorer.check_available()  # a missing package fails now, not after a model has loaded
        except OptionError as e:
            problem = e.problem
            if problem.startswith("unknown option"):
                problem += f"; classifier keys: {', '.join(CLASSIFIER_KEYS)}"
            raise self.fail((*key, *e.key), problem) from None
        classifier = Classifier(name=name, scorer=scorer, weight=weight, label_aggregate=label_aggregate,
                                hard=hard)
        for label, t in thresholds.items():
            self.set_label_threshold(classifier, label, t, (*key, "label_thresholds", label))
        return classifier

    def set_label_threshold(self, classifier: Classifier, label: Any, value: Any, key: KeyPath) -> None:
        if label not in classifier.labels:
            raise self.fail(key, f"classifier {classifier.name!r} has no label {label!r}; "
                            f"its labels: {', '.join(classifier.labels)}")
        if label in classifier.label_thresholds:
            raise self.fail(key, f"the threshold of {classifier.name}.{label} is set twice "
                            "(here and in the classifier's own label_thresholds)")
        classifier.label_thresholds[label] = self.number(value, key, 0.0, 1.0)

    def policy_label_thresholds(self, thresholds: Any, classifiers: list[Classifier]) -> None:
        thresholds = self.mapping(thresholds or {}, ("label_thresholds",))
        by_name = {c.name: c for c in classifiers}
        for qualified, value in thresholds.items():
            key = ("label_thresholds", qualified)
            name, dot, label = str(qualified).partition(".")
            if not dot or name not in by_name:
                raise self.fail(key, "keys are `classifier.label` with a classifier of this policy "
                                f"({', '.join(by_name)}); got {qualified!r}")
            self.set_label_threshold(by_name[name], label, value, key)
