"""Policies: loading, extends, validation errors, aggregation maths, dedup, rewards, reward_fn."""
from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from safegen.policy import SCORERS, Options, PolicyError, Scorer, load_policy, shipped_policies

# Scores a table scorer gives to these texts, per label (texts not listed score 0).
TABLE = {
    "calm": {"a": 0.1, "b": 0.2},
    "rude": {"a": 0.6, "b": 0.4},
    "vile": {"a": 0.9, "b": 0.95},
    "": {"a": 0.05, "b": 0.0},
}


class TableScorer(Scorer):
    """Looks scores up in a table, and counts how it is called (the policy should batch and dedupe)."""

    name = "table"

    def __init__(self, labels, scale):
        self.labels = tuple(labels)
        self.scale = scale
        self.calls: list[list[str]] = []

    @classmethod
    def from_options(cls, options):
        opts = Options(options)
        labels = opts.string_list("labels", ["a", "b"])
        scale = float(opts.raw("scale", 1.0))
        opts.done()
        return cls(labels, scale)

    def score(self, texts):
        self.calls.append(list(texts))
        return {label: np.array([TABLE.get(t, {}).get(label, 0.0) * self.scale for t in texts])
                for label in self.labels}


@pytest.fixture(autouse=True)
def table_scorer(monkeypatch):
    monkeypatch.setitem(SCORERS, "table", TableScorer)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


TWO_TABLES = """
    classifiers:
      - {name: first, scorer: table, labels: [a, b], weight: 0.5}
      - {name: second, scorer: table, labels: [a], scale: 0.5, weight: 1.0, label_aggregate: mean}
    aggregate: %s
    threshold: 0.3
"""


# -- aggregation --------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregate, expected", [
    # first = max(a, b); second = 0.5 * a. For "rude": first 0.6, second 0.3.
    ("max", lambda f, s: np.maximum(f, s)),
    ("mean", lambda f, s: (f + s) / 2),
    ("weighted_mean", lambda f, s: (0.5 * f + 1.0 * s) / 1.5),
    ("noisy_or", lambda f, s: 1 - (1 - 0.5 * f) * (1 - 1.0 * s)),
])
def test_aggregates(tmp_path, aggregate, expected):
    policy = load_policy(write(tmp_path, "p.yaml", TWO_TABLES % aggregate))
    texts = ["calm", "rude", "vile", "unknown"]
    scores = policy.score(texts)
    first = np.array([0.2, 0.6, 0.95, 0.0])
    second = np.array([0.05, 0.3, 0.45, 0.0])
    np.testing.assert_allclose(scores.per_classifier["first"], first)
    np.testing.assert_allclose(scores.per_classifier["second"], second)
    np.testing.assert_allclose(scores.per_label["first"]["b"], [0.2, 0.4, 0.95, 0.0])
    np.testing.assert_allclose(scores.aggregate, expected(first, second))
    np.testing.assert_array_equal(scores.toxic, scores.aggregate >= 0.3)
    # Spot-check one value by hand so a wrong formula can't hide behind the lambda.
    hand = {"max": 0.6, "mean": 0.45, "weighted_mean": 0.6 / 1.5, "noisy_or": 1 - 0.7 * 0.7}[aggregate]
    assert scores.aggregate[1] == pytest.approx(hand)


def test_label_aggregate_mean_and_threshold_boundary(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", """
        classifiers:
          - {name: t, scorer: table, label_aggregate: mean}
        threshold: 0.5
    """))
    scores = policy.score(["rude", "vile", "calm"])
    np.testing.assert_allclose(scores.aggregate, [0.5, 0.925, 0.15])
    assert scores.toxic.tolist() == [True, True, False]   # >= threshold is toxic


def test_hard_classifier_overrides_aggregation(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", """
        classifiers:
          - {name: soft, scorer: table, labels: [b]}
          - {name: words, scorer: lexicon, words: [rude], hard: true}
        aggregate: mean
        threshold: 0.5
    """))
    scores = policy.score(["calm", "rude", "R.U.D.E", "vile"])
    # The hard lexicon is not averaged in (it would halve "vile"); a match sets the aggregate to 1.
    np.testing.assert_allclose(scores.aggregate, [0.2, 1.0, 1.0, 0.95])
    assert scores.toxic.tolist() == [False, True, True, True]
    np.testing.assert_allclose(scores.per_classifier["words"], [0, 1, 1, 0])


def test_label_thresholds_policy_and_classifier_level(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", """
        classifiers:
          - name: t
            scorer: table
            label_thresholds: {b: 0.4}
          - {name: u, scorer: table, labels: [a], scale: 0.1}
        threshold: 0.95
        label_thresholds:
          t.a: 0.85
          u.a: 0.01
    """))
    assert policy.classifiers[0].label_thresholds == {"b": 0.4, "a": 0.85}
    scores = policy.score(["calm", "rude", "vile", "unknown"])
    # calm: u.a = 0.01 >= 0.01; rude: t.b = 0.4 >= 0.4; vile: aggregate 0.95; unknown: nothing.
    assert scores.toxic.tolist() == [True, True, True, False]
    np.testing.assert_allclose(scores.aggregate, [0.2, 0.6, 0.95, 0.0])


def test_row_is_json_serialisable(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", TWO_TABLES % "max"))
    row = policy.score(["calm", "rude"]).row(1)
    assert json.loads(json.dumps(row)) == row
    assert row == {"aggregate": pytest.approx(0.6), "toxic": True, "effective": pytest.approx(0.6),
                   "per_classifier": {"first": pytest.approx(0.6), "second": pytest.approx(0.3)},
                   "per_label": {"first": {"a": pytest.approx(0.6), "b": pytest.approx(0.4)},
                                 "second": {"a": pytest.approx(0.3)}}}
    assert type(row["toxic"]) is bool and type(row["aggregate"]) is float


# -- batching and dedup -------------------------------------------------------------------------

def test_duplicates_are_scored_once_and_scattered_back(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", TWO_TABLES % "max"))
    texts = ["rude", "calm", "rude", "", "rude", "calm", ""]
    scores = policy.score(texts)
    for c in policy.classifiers:
        assert c.scorer.calls == [["rude", "calm", ""]]   # one call per classifier, unique texts
    np.testing.assert_allclose(scores.per_label["first"]["a"], [0.6, 0.1, 0.6, 0.05, 0.6, 0.1, 0.05])
    assert scores.aggregate.shape == (7,) and scores.toxic.dtype == bool

    empty = policy.score([])
    assert empty.aggregate.shape == (0,) and empty.toxic.shape == (0,)
    assert len(policy.classifiers[0].scorer.calls) == 1   # no scorer call for an empty batch


def test_empty_text_is_scored_by_real_scorers():
    scores = load_policy("offline").score(["", "", "hello"])
    assert scores.aggregate.shape == (3,) and np.all((scores.aggregate >= 0) & (scores.aggregate < 0.5))


# -- rewards ------------------------------------------------------------------------------------

def test_reward_transforms(tmp_path):
    tox = np.array([0.0, 0.25, 0.5, 1.0])
    neg = load_policy(write(tmp_path, "neg.yaml", """
        classifiers: [{name: t, scorer: table}]
        threshold: 0.4
    """))
    np.testing.assert_allclose(neg.reward_from_toxicity(tox), -tox)
    assert neg.reward_threshold == pytest.approx(-0.4)
    assert neg.alpha == 0.1 and neg.threshold == 0.4 and neg.transform == "neg_toxicity"

    log = load_policy(write(tmp_path, "log.yaml", """
        classifiers: [{name: t, scorer: table}]
        reward: {transform: log_nontoxic, alpha: 0.5, clip: 1e-3}
    """))   # `1e-3` is a string to PyYAML (YAML 1.1); accepted as a number
    np.testing.assert_allclose(log.reward_from_toxicity(tox),
                               [0.0, math.log(0.75), math.log(0.5), math.log(1e-3)])
    assert log.reward_threshold == pytest.approx(math.log(0.5))
    assert log.alpha == 0.5 and log.clip == pytest.approx(1e-3)


class FakeTokenizer:
    """Decodes ids to words; ids below 3 are special tokens."""

    vocab = {0: "<pad>", 1: "<eos>", 2: "<eot>", 3: "calm", 4: "rude", 5: "vile"}

    def __init__(self):
        self.decoded = []

    def decode(self, ids, skip_special_tokens=False):
        self.decoded.append(list(ids))
        return " ".join(self.vocab[i] for i in ids if not (skip_special_tokens and i < 3))


def test_reward_fn_decodes_generated_tokens_and_counts(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", """
        classifiers: [{name: t, scorer: table, labels: [a]}]
    """))
    tokenizer = FakeTokenizer()
    reward = policy.reward_fn(tokenizer, stop_ids=(1, 2))
    ids = torch.tensor([[4, 1, 5, 5],    # "rude", cut at eos: the "vile" after it is not the answer
                        [0, 3, 0, 0],    # padding is a special token: "calm"
                        [5, 2, 1, 4],    # "vile"
                        [4, 1, 5, 5]])   # same as row 0: scored once
    r = reward(ids)
    assert r.dtype == torch.float32 and r.shape == (4,)
    np.testing.assert_allclose(r.numpy(), [-0.6, -0.1, -0.9, -0.6], rtol=1e-6)
    assert tokenizer.decoded[0] == [4] and tokenizer.decoded[2] == [5]
    assert policy.classifiers[0].scorer.calls == [["rude", "calm", "vile"]]
    reward(ids[:2])
    assert policy.classifiers[0].scorer.calls[1:] == [["rude", "calm"]]
    with pytest.raises(ValueError, match="shape"):
        reward(ids[0])


# -- shipped policies ---------------------------------------------------------------------------

def test_shipped_policies_load_lazily_without_network():
    assert {"default", "strict", "offline"} <= set(shipped_policies())
    default = load_policy("default")
    assert [c.name for c in default.classifiers] == ["detoxify"]
    detoxify = default.classifiers[0].scorer
    assert detoxify.variant == "original" and detoxify._model is None   # nothing downloaded
    assert (default.threshold, default.alpha, default.on_toxic) == (0.5, 0.1, "flag")
    assert default.source == shipped_policies()["default"].resolve()

    strict = load_policy("strict")   # extends default
    assert [(c.name, c.hard) for c in strict.classifiers] == [("detoxify", False), ("lexicon", True)]
    assert strict.classifiers[0].scorer.variant == "unbiased"
    assert strict.classifiers[0].scorer.device == "auto"    # inherited from default.yaml
    assert strict.classifiers[0].label_thresholds == {"threat": 0.2, "identity_attack": 0.2}
    assert strict.threshold == 0.3 and strict.on_toxic == "refuse" and strict.refusal_text

    offline = load_policy("offline")
    scores = offline.score(["Have a lovely day.", "Shut the f*ck up, you stupid b1tch."])
    assert scores.toxic.tolist() == [False, True]


def test_unknown_policy_name_lists_shipped():
    with pytest.raises(PolicyError, match=r"no-such-policy: no such policy file.*default.*offline.*strict"):
        load_policy("no-such-policy")


# -- extends ------------------------------------------------------------------------------------

def test_extends_merges_and_overrides(tmp_path):
    write(tmp_path, "base/words.txt", "rude\n")
    write(tmp_path, "base/base.yaml", """
        description: base
        classifiers:
          - {name: t, scorer: table, labels: [a, b], weight: 0.2}
          - {name: words, scorer: lexicon, words_file: words.txt, hard: true}
        aggregate: weighted_mean
        threshold: 0.4
        reward: {transform: log_nontoxic, alpha: 0.2}
    """)
    child = write(tmp_path, "child/child.yaml", """
        extends: ../base/base.yaml
        classifiers:
          - {name: t, labels: [b]}          # merged by name: only `labels` (a list: replaced)
          - {name: extra, scorer: table, labels: [a], weight: 0.8}
        reward: {alpha: 0.05}               # merged key by key: transform stays log_nontoxic
    """)
    policy = load_policy(child)
    assert policy.source == child.resolve()
    assert [c.name for c in policy.classifiers] == ["t", "words", "extra"]
    t, words, extra = policy.classifiers
    assert t.labels == ("b",) and t.weight == 0.2
    assert words.hard and words.scorer.words == ["rude"]   # words.txt found next to base.yaml
    assert (policy.transform, policy.alpha, policy.threshold, policy.aggregate) == \
        ("log_nontoxic", 0.05, 0.4, "weighted_mean")
    scores = policy.score(["vile", "rude"])
    np.testing.assert_allclose(scores.aggregate, [(0.2 * 0.95 + 0.8 * 0.9) / 1.0, 1.0])


def test_extends_shipped_name(tmp_path):
    policy = load_policy(write(tmp_path, "mine.yaml", """
        extends: offline
        threshold: 0.9
        classifiers:
          - table              # a bare scorer name is a classifier with no options
    """))
    assert [c.name for c in policy.classifiers] == ["profanity_check", "lexicon", "table"]
    assert policy.threshold == 0.9 and policy.classifiers[2].labels == ("a", "b")


def test_extends_cycle_lists_the_chain(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nclassifiers: [{name: t, scorer: table}]\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\n")
    write(tmp_path, "c.yaml", "extends: a.yaml\n")
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "a.yaml")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'c.yaml'}: extends: extends cycle: ")
    assert message.endswith(" -> ".join(str(tmp_path / n) for n in ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]))

    write(tmp_path, "self.yaml", "extends: self.yaml\n")
    with pytest.raises(PolicyError, match="extends cycle"):
        load_policy(tmp_path / "self.yaml")


def test_error_blames_the_file_that_set_the_value(tmp_path):
    write(tmp_path, "parent.yaml", """
        classifiers: [{name: t, scorer: table}]
        on_toxic: shout
    """)
    write(tmp_path, "child.yaml", "extends: parent.yaml\nthreshold: 0.2\n")
    with pytest.raises(PolicyError, match="^" + re.escape(f"{tmp_path / 'parent.yaml'}: on_toxic: must be one of")):
        load_policy(tmp_path / "child.yaml")
    write(tmp_path, "child2.yaml", "extends: parent.yaml\non_toxic: best\nthreshold: 2\n")
    with pytest.raises(PolicyError, match="^" + re.escape(f"{tmp_path / 'child2.yaml'}: threshold: must be in")):
        load_policy(tmp_path / "child2.yaml")


# -- invalid policies ---------------------------------------------------------------------------

OK_CLASSIFIER = "classifiers: [{name: t, scorer: table}]\n"


@pytest.mark.parametrize("text, key, problem", [
    (OK_CLASSIFIER + "treshold: 0.5", "treshold", "unknown key; known keys: description, extends"),
    (OK_CLASSIFIER + "threshold: high", "threshold", "must be a number, got 'high'"),
    (OK_CLASSIFIER + "threshold: 1.5", "threshold", "must be in [0.0, 1.0], got 1.5"),
    (OK_CLASSIFIER + "threshold: -0.1", "threshold", "must be in [0.0, 1.0]"),
    (OK_CLASSIFIER + "aggregate: median", "aggregate", "must be one of max, mean, weighted_mean, noisy_or"),
    (OK_CLASSIFIER + "reward: {transform: exp}", "reward.transform", "must be one of neg_toxicity, log_nontoxic"),
    (OK_CLASSIFIER + "reward: {alpha: 0}", "reward.alpha", "must be in (0.0, inf]"),
    (OK_CLASSIFIER + "reward: {alpha: -1}", "reward.alpha", "must be in (0.0, inf]"),
    (OK_CLASSIFIER + "reward: {clip: 0}", "reward.clip", "must be in (0.0, 1.0)"),
    (OK_CLASSIFIER + "reward: {alpah: 1}", "reward.alpah", "unknown key; known keys: transform, alpha, clip"),
    (OK_CLASSIFIER + "reward: fast", "reward", "must be a mapping"),
    (OK_CLASSIFIER + "on_toxic: ignore", "on_toxic", "must be one of flag, refuse, best"),
    (OK_CLASSIFIER + "on_toxic: refuse\nrefusal_text: ' '", "refusal_text", "non-empty refusal_text"),
    (OK_CLASSIFIER + "refusal_text: 3", "refusal_text", "must be a string"),
    (OK_CLASSIFIER + "extends: 3", "extends", "must be a policy path or shipped name"),
    (OK_CLASSIFIER + "extends: nothing-like-it", "extends", "no shipped policy 'nothing-like-it'"),
    ("classifiers: []", "classifiers", "at least one classifier"),
    ("threshold: 0.5", "classifiers", "at least one classifier"),
    ("classifiers: {t: {}}", "classifiers", "must be a list of classifiers"),
    ("classifiers: [3]", "classifiers[0]", "must be a mapping"),
    ("classifiers: [{weight: 1}]", "classifiers[0]", "needs a `name` or a `scorer`"),
    ("classifiers: [{name: a.b, scorer: table}]", "classifiers[0].name", "no dots"),
    ("classifiers: [{name: t, scorer: table}, {name: t, scorer: table}]", "classifiers[1].name",
     "two classifiers are named 't'"),
    ("classifiers: [{name: t, scorer: perspective}]", "classifiers[t].scorer",
     "unknown scorer 'perspective'; known scorers: detoxify, hf, lexicon, profanity_check, table, toxic_lstm"),
    ("classifiers: [{name: toxigen}]", "classifiers[toxigen].scorer", "unknown scorer 'toxigen'"),
    ("classifiers: [{name: detoxify, varient: original}]", "classifiers[detoxify].varient",
     "unknown option; known options:"),
    ("classifiers: [{name: detoxify, variant: original, labels: [male]}]", "classifiers[detoxify].labels[0]",
     "'original' has no label 'male'"),
    ("classifiers: [{name: detoxify, checkpoint: missing.ckpt}]", "classifiers[detoxify].checkpoint",
     "file not found"),
    ("classifiers: [{name: lexicon, words_file: lists/missing.txt}]", "classifiers[lexicon].words_file",
     "file not found"),
    ("classifiers: [{name: lexicon, patterns: ['(']}]", "classifiers[lexicon].patterns[0]",
     "invalid regular expression"),
    ("classifiers: [{name: hf, labels: toxic}]", "classifiers[hf].model", "is required"),
    ("classifiers: [{name: t, scorer: table, weight: -1}]", "classifiers[t].weight", "must be in [0.0, inf]"),
    ("classifiers: [{name: t, scorer: table, weight: 2}]\naggregate: noisy_or", "classifiers[t].weight",
     "noisy_or needs weights in [0, 1]"),
    ("classifiers: [{name: t, scorer: table, weight: 0}]\naggregate: weighted_mean", "classifiers",
     "weighted_mean needs a classifier with weight > 0"),
    ("classifiers: [{name: t, scorer: table, hard: yes please}]", "classifiers[t].hard", "must be true or false"),
    ("classifiers: [{name: t, scorer: table, label_aggregate: sum}]", "classifiers[t].label_aggregate",
     "must be one of max, mean"),
    ("classifiers: [{name: t, scorer: table, label_thresholds: {c: 0.5}}]", "classifiers[t].label_thresholds.c",
     "classifier 't' has no label 'c'; its labels: a, b"),
    ("classifiers: [{name: t, scorer: table, label_thresholds: {a: 2}}]", "classifiers[t].label_thresholds.a",
     "must be in [0.0, 1.0]"),
    (OK_CLASSIFIER + "label_thresholds: {x.a: 0.5}", "label_thresholds.x.a",
     "keys are `classifier.label` with a classifier of this policy (t)"),
    (OK_CLASSIFIER + "label_thresholds: {t: 0.5}", "label_thresholds.t", "keys are `classifier.label`"),
    (OK_CLASSIFIER + "label_thresholds: {t.a: -1}", "label_thresholds.t.a", "must be in [0.0, 1.0]"),
    ("classifiers: [{name: t, scorer: table, label_thresholds: {a: 0.5}}]\nlabel_thresholds: {t.a: 0.4}",
     "label_thresholds.t.a", "set twice"),
    ("- just\n- a list", "(top level)", "a policy must be a mapping of keys, got list"),
])
def test_invalid_policy_names_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message, message
    assert isinstance(err.value, ValueError)


def test_invalid_yaml_syntax(tmp_path):
    path = write(tmp_path, "broken.yaml", "classifiers: [{name: t\n")
    with pytest.raises(PolicyError, match="^" + re.escape(f"{path}: invalid YAML")):
        load_policy(path)


def test_yaml_tags_are_not_executed(tmp_path):
    """A Python tag in a policy is refused, and its payload never runs: an unsafe loader would
    create the marker file (and then fail on the value os.system returns)."""
    marker = tmp_path / "ran"
    path = write(tmp_path, "evil.yaml", f"classifiers: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    assert not marker.exists()
    assert "invalid YAML" in str(refused.value)
