"""Adaptive refinement refines exactly what the policy calls toxic, and the reward lets it improve.

One function (`Policy.judge`) gives the verdict the report, the on_toxic action and the adaptive gate
all use. A text toxic only through a label threshold, a text exactly at the threshold and a binary
scorer's hit at threshold 1.0 are all refined; the reward drops with a label's excess over its own
threshold.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from safegen.generator import SafeGenerator
from safegen.policy import SCORERS, Options, Scorer, load_policy
from safegen.policy.scorers.detoxify import JIGSAW_2019
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.sampler import ConfigError, DiffusionSampler, SamplingConfig

SAMPLING = dict(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)


class DetoxLike(Scorer):
    """Detoxify's labels with fixed scores (class attribute SCORES), or scores by the text's length
    parity (ODD_SCORES for odd lengths); accepts detoxify's options so that it can stand in for it
    in a policy that extends a shipped one."""

    name = "detox_like"
    labels = JIGSAW_2019
    SCORES: dict = {}
    ODD_SCORES: dict | None = None

    @classmethod
    def from_options(cls, options):
        opts = Options(options)
        for key in ("variant", "device", "batch_size"):
            opts.raw(key)
        opts.done()
        return cls()

    def scores_of(self, text: str) -> dict:
        return self.ODD_SCORES if self.ODD_SCORES is not None and len(text) % 2 else self.SCORES

    def score(self, texts):
        return {label: np.array([self.scores_of(t).get(label, 0.0) for t in texts]) for label in self.labels}

    def blame(self, texts):
        return {label: [np.zeros(len(t)) for t in texts] for label in self.labels}


class Binary(Scorer):
    """A binary detector that fires on every text."""

    name = "binary"
    labels = ("hit",)

    @classmethod
    def from_options(cls, options):
        Options(options).done()
        return cls()

    def score(self, texts):
        return {"hit": np.ones(len(texts))}

    def blame(self, texts):
        return {"hit": [np.ones(len(t)) for t in texts]}


@pytest.fixture(autouse=True)
def fake_scorers(monkeypatch):
    monkeypatch.setitem(SCORERS, "detox_like", DetoxLike)
    monkeypatch.setitem(SCORERS, "binary", Binary)
    monkeypatch.setattr(DetoxLike, "SCORES", {})
    monkeypatch.setattr(DetoxLike, "ODD_SCORES", None)


def policy_file(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return load_policy(path)


LABEL_THRESHOLD_POLICY = """
    classifiers:
      - {name: detox, scorer: detox_like, label_thresholds: {threat: 0.2}}
    threshold: 0.3
"""


def generate(tiny_generator_parts, policy, prompts=("Go away, you", "The weather is"), **refinement):
    model, tokenizer, profile = tiny_generator_parts
    g = SafeGenerator(model, tokenizer, policy=policy, profile=profile, sampling=SAMPLING,
                      refinement=dict(iterations=2, **refinement))
    assert g.refinement.adaptive  # the middleware's default, which these tests are about
    return g.generate_text(list(prompts), seed=0)


def plain_rows() -> float:
    return float(SAMPLING["steps"])


def assert_refined(reports):
    for r in reports:
        assert r.toxic_before  # the plain sample is toxic by the policy's verdict ...
        assert r.acceptance_rate is not None and r.rows > plain_rows()  # ... so proposals happen
        assert r.reward_calls > 1


# ---------------------------------------------------------------- the gate, through SafeGenerator
def test_a_label_over_its_own_threshold_is_refined(tmp_path, tiny_generator_parts):
    DetoxLike.SCORES = {"toxicity": 0.1, "threat": 0.25}
    policy = policy_file(tmp_path, LABEL_THRESHOLD_POLICY)
    assert policy.score(["anything"]).toxic.tolist() == [True]  # threat 0.25 >= 0.2, aggregate 0.25 < 0.3
    assert_refined(generate(tiny_generator_parts, policy))


def test_a_text_exactly_at_the_threshold_is_refined(tmp_path, tiny_generator_parts):
    DetoxLike.SCORES = {"toxicity": 0.5}
    policy = policy_file(tmp_path, "classifiers: [{name: detox, scorer: detox_like}]\nthreshold: 0.5\n")
    assert policy.score(["anything"]).toxic.tolist() == [True]
    assert_refined(generate(tiny_generator_parts, policy))


def test_a_binary_scorer_at_threshold_one_is_refined(tmp_path, tiny_generator_parts):
    policy = policy_file(tmp_path, "classifiers: [{name: b, scorer: binary}]\nthreshold: 1.0\n")
    assert_refined(generate(tiny_generator_parts, policy))


def test_strict_policy_refines_before_it_refuses(tmp_path, tiny_generator_parts):
    """strict.yaml's own label thresholds (threat, identity_attack at 0.2; threshold 0.3; refuse),
    with a stand-in for Detoxify: a threat of 0.25 is refined, then refused as still toxic."""
    DetoxLike.SCORES = {"toxicity": 0.05, "threat": 0.25}
    policy = policy_file(tmp_path, """
        extends: strict
        classifiers:
          - {name: detoxify, scorer: detox_like}
    """)
    assert policy.classifiers[0].label_thresholds == {"threat": 0.2, "identity_attack": 0.2}
    reports = generate(tiny_generator_parts, policy)
    assert_refined(reports)
    assert all(r.action == "refuse" and r.text == policy.refusal_text for r in reports)


def test_the_gate_is_the_verdict_row_by_row(tmp_path, tiny_generator_parts):
    """Texts of odd length carry a threat over its label threshold, the others are clean: exactly
    the rows whose plain sample the policy calls toxic are refined."""
    DetoxLike.SCORES = {"toxicity": 0.05}
    DetoxLike.ODD_SCORES = {"toxicity": 0.05, "threat": 0.25}
    policy = policy_file(tmp_path, LABEL_THRESHOLD_POLICY)
    prompts = ["Go away, you", "The weather is", "People say", "I think that", "You are a", "Why do"]
    reports = generate(tiny_generator_parts, policy, prompts=prompts)
    toxic = [bool(policy.score([r.text_before]).toxic[0]) for r in reports]
    assert any(toxic) and not all(toxic)
    for r, t in zip(reports, toxic):
        assert r.toxic_before == t
        assert (r.acceptance_rate is not None) == t
        assert (r.rows > plain_rows()) == t
        assert r.reward_calls >= 1


# ---------------------------------------------------------------- the reward
def scores_for(policy, **labels):
    DetoxLike.SCORES = labels
    return policy.score(["x"])


def test_a_label_over_its_threshold_lowers_the_reward(tmp_path):
    """Toxicity 0.28 is the aggregate either way; a threat of 0.25 (over its 0.2) must cost reward
    that a threat of 0.1 does not, so that the chain can improve such a text."""
    policy = policy_file(tmp_path, LABEL_THRESHOLD_POLICY)
    over = scores_for(policy, toxicity=0.28, threat=0.25)
    under = scores_for(policy, toxicity=0.28, threat=0.1)
    assert over.aggregate[0] == under.aggregate[0] == pytest.approx(0.28)
    assert over.toxic[0] and not under.toxic[0]
    assert policy.reward(over)[0] < policy.reward(under)[0]
    assert policy.reward(under)[0] == policy.reward_from_toxicity(under.aggregate)[0]  # far below: no effect


@pytest.mark.parametrize("transform", ["neg_toxicity", "log_nontoxic"])
def test_reward_is_continuous_and_monotone_in_a_labels_excess(tmp_path, transform):
    policy = policy_file(tmp_path, textwrap.dedent(LABEL_THRESHOLD_POLICY) + f"reward: {{transform: {transform}}}\n")
    threats = np.linspace(0.0, 1.0, 2001)
    scored = [scores_for(policy, toxicity=0.1, threat=t) for t in threats]
    effective = np.array([s.effective[0] for s in scored])
    rewards = np.array([policy.reward(s)[0] for s in scored])
    assert np.abs(np.diff(effective)).max() <= 0.0005 + 1e-12  # continuous: no jump at the label's threshold
    steps = np.diff(rewards)
    assert (steps <= 1e-12).all()  # the reward never rises with the threat
    binding = (threats[1:] > 0.2) & (threats[1:] < 0.89)  # over its threshold, 1 - t above the clip
    assert (steps[binding] < 0).all()  # strictly falling with the label's excess


def test_without_label_thresholds_the_reward_is_the_transformed_aggregate(tmp_path):
    policy = policy_file(tmp_path, "classifiers: [{name: detox, scorer: detox_like}]\nthreshold: 0.3\n")
    scores = scores_for(policy, toxicity=0.1, threat=0.25)
    np.testing.assert_array_equal(policy.reward(scores), policy.reward_from_toxicity(scores.aggregate))


def test_policy_reward_judges_with_the_verdict(tmp_path):
    from test_policy import FakeTokenizer

    from safegen.refine.iterref import Judged

    DetoxLike.SCORES = {"toxicity": 0.1, "threat": 0.25}
    policy = policy_file(tmp_path, LABEL_THRESHOLD_POLICY)
    reward = policy.reward_fn(FakeTokenizer(), stop_ids=(1, 2))
    judged = reward.judge(torch.tensor([[3, 4], [5, 1]]))
    assert isinstance(judged, Judged)
    assert judged.toxic.tolist() == [True, True]
    torch.testing.assert_close(judged.reward, reward(torch.tensor([[3, 4], [5, 1]])))


# ---------------------------------------------------------------- IterRef alone
def test_iterref_gates_on_a_verdict_not_on_the_bar():
    """A reward that returns a verdict decides the gate, whatever its value says."""
    from oracles import ScriptedModel

    from safegen.refine.iterref import Judged

    m = ScriptedModel(input_weight=1.0, seed=4)
    ids = torch.randint(0, 5, (8, 3), generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)
    sampler = DiffusionSampler(m, m.mask_id, cfg)

    def verdict(tokens):
        return (tokens.sum(1) % 2 == 0).cpu()

    def judge(tokens):  # the same reward for every text: only the verdict can tell them apart
        return Judged(torch.zeros(tokens.shape[0], dtype=torch.float64), verdict(tokens))

    toxic = verdict(sampler.run(ids, seeds=0).sequences[:, 3:])
    assert toxic.any() and not toxic.all()
    k = 6
    rc = RefineConfig(schedule="final", iterations=k, adaptive=True)
    res = sampler.run(ids, seeds=0, hook=IterRef(rc, judge))
    assert (res.proposed[toxic] > 0).all() and (res.proposed[~toxic] == 0).all()
    # Equal rewards: every proposal is accepted, so a row stops at its first non-toxic draft.
    stopped = toxic & (res.proposed < k)
    assert stopped.any() and not verdict(res.sequences[stopped, 3:]).any()
    # A reward without a verdict needs the bar.
    with pytest.raises(ConfigError, match="accept_reward"):
        sampler.run(ids, seeds=0, hook=IterRef(rc, lambda t: torch.zeros(t.shape[0])))
