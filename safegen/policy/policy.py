"""A policy: what "toxic" means for one deployment, and the reward the sampler maximises.

A policy runs its classifiers (each a scorer plus how to weigh it) over a batch of texts and
combines their scores in three steps:

  1. labels -> classifier:  s_c = max or mean over the classifier's counted labels
  2. classifiers -> aggregate, over the soft (non-hard) classifiers, with weights w_c:
       max            max_c s_c                      (weights unused: one confident detector is enough)
       mean           (1/k) sum_c s_c                (weights unused)
       weighted_mean  sum_c w_c s_c / sum_c w_c
       noisy_or       1 - prod_c (1 - w_c s_c),  w_c in [0, 1]
                      (the chance that at least one independent detector fires; all w_c = 1 is
                      the plain noisy-or, a smaller w_c discounts a detector)
     then every hard classifier whose score reaches `threshold` sets the aggregate to 1 (a hard
     constraint: a lexicon match is toxic whatever the other classifiers say).
  3. verdict (`Policy.judge`, the one place that decides): toxic = aggregate >= threshold, or any
     label score >= its own label threshold. The report, the on_toxic action and adaptive
     refinement's gate all read this verdict.

Blame (which characters a policy objects to, for targeted re-masking) is combined like the scores:
each classifier's per-character blame is the max or mean over its labels' blame, the soft
classifiers' blame goes through the same aggregate, per character, with the same weights, and a
hard classifier that fires (score >= threshold) raises the characters it matched to its own blame
(1 for a lexicon match), as its score raises the aggregate to 1. See `Scorer.blame` for each
scorer's attribution.

The reward for the sampler is a decreasing function of the effective toxicity t, the aggregate
raised by every label that has its own threshold t_l, shifted so that reaching t_l counts like
the aggregate reaching `threshold` (theta):
  t = max(s, max_l (s_l - t_l + theta))      (t = s for a policy without label thresholds)
  neg_toxicity   r = -t
  log_nontoxic   r = log(max(1 - t, clip))   (the log-probability of "non-toxic"; clip bounds it)
t is continuous and non-decreasing in each label's excess s_l - t_l, strictly increasing in it
where that label is the binding one, and t >= theta exactly when the verdict is toxic (up to
rounding at the boundary; the verdict itself compares the scores). `alpha` is the reward's
temperature for the sampler (the refined distribution is proportional to p(x) exp(r(x) / alpha)):
the policy only carries it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ArgumentError, ArgumentTypeError, SafegenError
from ..refine.config import DEFAULT_ALPHA
from .attribution import token_blame, token_spans
from .scorers import OptionError, Scorer


class PolicyError(SafegenError):
    """An invalid policy; the message names the file, the key path and the problem."""


def _max(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return scores.max(axis=0)


def _mean(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return scores.mean(axis=0)


def _weighted_mean(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weights @ scores / weights.sum()


def _noisy_or(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return 1.0 - np.prod(1.0 - weights[:, None] * scores, axis=0)


# scores: (classifiers, texts); weights: (classifiers,)
AGGREGATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "max": _max, "mean": _mean, "weighted_mean": _weighted_mean, "noisy_or": _noisy_or,
}
LABEL_AGGREGATES = ("max", "mean")
TRANSFORMS = ("neg_toxicity", "log_nontoxic")
ON_TOXIC = ("flag", "refuse", "best")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class Classifier:
    """One scorer inside a policy, with how the policy uses its scores."""

    name: str
    scorer: Scorer
    weight: float = 1.0
    label_aggregate: str = "max"
    # A hard classifier is left out of the aggregation; reaching the threshold makes a text toxic.
    hard: bool = False
    label_thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.scorer.labels)


@dataclass
class PolicyScores:
    """Scores of a batch of n texts."""

    aggregate: np.ndarray                          # (n,) in [0, 1]
    per_classifier: dict[str, np.ndarray]          # classifier -> (n,) its label-aggregated score
    per_label: dict[str, dict[str, np.ndarray]]    # classifier -> label -> (n,)
    toxic: np.ndarray                              # (n,) bool: the policy's verdict
    effective: np.ndarray                          # (n,) the effective toxicity t the reward transforms

    def __len__(self) -> int:
        return len(self.aggregate)

    def row(self, i: int) -> dict:
        """The i-th text's breakdown, as plain Python types (JSON-serialisable)."""
        return {
            "aggregate": float(self.aggregate[i]),
            "toxic": bool(self.toxic[i]),
            "effective": float(self.effective[i]),
            "per_classifier": {c: float(s[i]) for c, s in self.per_classifier.items()},
            "per_label": {c: {label: float(s[i]) for label, s in labels.items()}
                          for c, labels in self.per_label.items()},
        }


class Policy:
    """Scores texts, decides toxic or not, and turns toxicity into the sampler's reward.

    Build one with `load_policy` (which validates every value); the constructor trusts its inputs.
    """

    def __init__(self, classifiers: Sequence[Classifier], aggregate: str = "max", threshold: float = 0.5,
                 transform: str = "neg_toxicity", alpha: float = DEFAULT_ALPHA, clip: float = 1e-4,
                 on_toxic: str = "flag", refusal_text: str = DEFAULT_REFUSAL,
                 source: Path | None = None):
        self.classifiers = list(classifiers)
        self.aggregate = aggregate
        self.threshold = float(threshold)
        self.transform = transform
        self.alpha = float(alpha)
        self.clip = float(clip)
        self.on_toxic = on_toxic
        self.refusal_text = refusal_text
        self.source = source

    def __repr__(self) -> str:
        names = ", ".join(f"{c.name}{' (hard)' if c.hard else ''}" for c in self.classifiers)
        return (f"Policy({self.source or '<unsaved>'}: [{names}], aggregate={self.aggregate}, "
                f"threshold={self.threshold}, reward={self.transform}, alpha={self.alpha}, "
                f"on_toxic={self.on_toxic})")

    # -- scoring -------------------------------------------------------------------------------

    def score(self, texts: Sequence[str]) -> PolicyScores:
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ArgumentTypeError(f"texts[{i}] is {type(text).__name__}, not str")
        # Refinement proposals often coincide; score each distinct text once and scatter back.
        first_index: dict[str, int] = {}
        inverse = np.array([first_index.setdefault(t, len(first_index)) for t in texts], dtype=np.int64)
        unique = list(first_index)

        per_label: dict[str, dict[str, np.ndarray]] = {}
        per_classifier: dict[str, np.ndarray] = {}
        for c in self.classifiers:
            scores = self._run_scorer(c, unique)
            per_label[c.name] = {label: scores[label][inverse] for label in c.labels}
            per_classifier[c.name] = self._classifier_score(c, per_label[c.name])

        aggregate = self._aggregate(per_classifier, len(texts))
        toxic, effective = self.judge(aggregate, per_label)
        return PolicyScores(aggregate=aggregate, per_classifier=per_classifier,
                            per_label=per_label, toxic=toxic, effective=effective)

    def judge(self, aggregate: np.ndarray, per_label: dict[str, dict[str, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray]:
        """(verdict, effective toxicity) per text, from the aggregate and the label scores: the one
        function that decides "toxic" (module docstring, step 3 and the reward)."""
        toxic = aggregate >= self.threshold
        effective = np.array(aggregate, dtype=np.float64)
        for c in self.classifiers:
            for label, t in c.label_thresholds.items():
                s = per_label[c.name][label]
                toxic = toxic | (s >= t)
                # Reaching t counts like the aggregate reaching the threshold, so a label over its own
                # threshold costs reward in proportion to its excess, whatever the aggregate says.
                effective = np.maximum(effective, s - t + self.threshold)
        return toxic, effective

    @staticmethod
    def _classifier_score(c: Classifier, per_label: dict[str, np.ndarray]) -> np.ndarray:
        stacked = np.stack([per_label[label] for label in c.labels])
        return stacked.max(0) if c.label_aggregate == "max" else stacked.mean(0)

    def _run_scorer(self, c: Classifier, texts: list[str]) -> dict[str, np.ndarray]:
        if not texts:
            return {label: np.zeros(0) for label in c.labels}
        try:
            raw = c.scorer.score(texts)
        except OptionError as e:
            # Raised by scorers that can only check some options once the model is loaded.
            key = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in e.key)
            raise PolicyError(f"{self.source}: classifiers[{c.name}]{key}: {e.problem}") from None
        except (OSError, ImportError) as e:
            # The scorer's model or a package it imports is missing (a download offline, say): the
            # user's environment, not a bug, so one line that names the classifier.
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PolicyError(f"{self.source}: classifiers[{c.name}]: the {c.scorer.name} scorer cannot load its "
                              f"model ({type(e).__name__}: {first})") from None
        out = {}
        for label in c.labels:
            if label not in raw:
                raise RuntimeError(f"scorer {c.scorer.name!r} (classifier {c.name!r}) returned no "
                                   f"scores for its label {label!r}")
            s = np.asarray(raw[label], dtype=np.float64).reshape(-1)
            if s.shape != (len(texts),) or not np.all((s >= -1e-6) & (s <= 1 + 1e-6)):
                raise RuntimeError(f"scorer {c.scorer.name!r} (classifier {c.name!r}) label {label!r}: "
                                   f"expected {len(texts)} scores in [0, 1], got shape {s.shape}, "
                                   f"range [{np.nanmin(s) if s.size else 'n/a'}, "
                                   f"{np.nanmax(s) if s.size else 'n/a'}]")
            out[label] = np.clip(s, 0.0, 1.0)
        return out

    def _aggregate(self, per_classifier: dict[str, np.ndarray], n: int) -> np.ndarray:
        soft = [c for c in self.classifiers if not c.hard]
        if soft:
            scores = np.stack([per_classifier[c.name] for c in soft])
            weights = np.array([c.weight for c in soft], dtype=np.float64)
            aggregate = np.clip(AGGREGATES[self.aggregate](scores, weights), 0.0, 1.0)
        else:
            aggregate = np.zeros(n)
        for c in self.classifiers:
            if c.hard:
                aggregate = np.where(per_classifier[c.name] >= self.threshold, 1.0, aggregate)
        return aggregate

    def blame(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Per text, a float array of len(text) in [0, 1]: how much each character is to blame for
        the text's toxicity, combined over the classifiers as the module docstring says; and per
        text, how many texts the classifiers scored to find out (occlusion costs reward calls; a
        repeated text is attributed once, and its cost charged to its first occurrence)."""
        texts = list(texts)
        first_index: dict[str, int] = {}  # text -> its index among the unique texts
        first_row: list[int] = []  # unique text -> the row of its first occurrence, charged its cost
        inverse = []
        for k, t in enumerate(texts):
            if t not in first_index:
                first_index[t] = len(first_row)
                first_row.append(k)
            inverse.append(first_index[t])
        unique = list(first_index)
        per_classifier, cost = {}, np.zeros(len(unique))
        for c in self.classifiers:
            by_label = c.scorer.blame(unique)
            spent = np.array([c.scorer.blame_cost([t]) for t in unique], dtype=np.float64)
            # A hard classifier is scored once more below, to see whether it fires.
            cost += spent + (spent > 0) * c.hard
            reduce = np.max if c.label_aggregate == "max" else np.mean
            rows = []
            for i, text in enumerate(unique):
                stacked = np.stack([np.asarray(by_label[label][i], dtype=np.float64) for label in c.labels])
                if stacked.shape[1] != len(text):
                    raise RuntimeError(f"scorer {c.scorer.name!r} (classifier {c.name!r}) blamed "
                                       f"{stacked.shape[1]} characters of a text of {len(text)}")
                rows.append(np.clip(reduce(stacked, axis=0), 0.0, 1.0))
            per_classifier[c.name] = rows
        fires = {c.name: self._classifier_score(c, self._run_scorer(c, unique))
                 for c in self.classifiers if c.hard}
        soft = [c for c in self.classifiers if not c.hard]
        weights = np.array([c.weight for c in soft], dtype=np.float64)
        combined = []
        for i, text in enumerate(unique):
            blame = np.zeros(len(text))
            if soft:
                stacked = np.stack([per_classifier[c.name][i] for c in soft])
                blame = np.clip(AGGREGATES[self.aggregate](stacked, weights), 0.0, 1.0)
            for c in self.classifiers:
                if c.hard and fires[c.name][i] >= self.threshold:
                    blame = np.maximum(blame, per_classifier[c.name][i])
            combined.append(blame)
        charged = np.zeros(len(texts))
        charged[first_row] = cost
        return [combined[k] for k in inverse], charged

    # -- reward --------------------------------------------------------------------------------

    def reward(self, scores: PolicyScores) -> np.ndarray:
        """The sampler's reward of scored texts: the transform of their effective toxicity."""
        return self.reward_from_toxicity(scores.effective)

    def reward_from_toxicity(self, tox: np.ndarray) -> np.ndarray:
        tox = np.asarray(tox, dtype=np.float64)
        if self.transform == "neg_toxicity":
            return -tox
        return np.log(np.maximum(1.0 - tox, self.clip))

    @property
    def reward_threshold(self) -> float:
        """The reward at effective toxicity == threshold, for reading rewards. It decides nothing:
        the verdict compares the scores themselves (`judge`), and adaptive refinement gates on it."""
        return float(self.reward_from_toxicity(np.array([self.threshold]))[0])

    def reward_fn(self, tokenizer, stop_ids: Sequence[int] = ()) -> "PolicyReward":
        return PolicyReward(self, tokenizer, stop_ids)


class PolicyReward:
    """The bridge from token ids to reward: decode the generated region, score, transform.

    `reward(token_ids)` takes a LongTensor (B, G) holding only the generated tokens and returns a
    FloatTensor (B,) on the same device. `blame_texts` counts the texts the classifiers scored for
    `blame` (the sampler counts the reward calls itself).
    """

    def __init__(self, policy: Policy, tokenizer, stop_ids: Sequence[int] = ()):
        self.policy = policy
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.blame_texts = 0

    def decode(self, token_ids) -> list[str]:
        return [self.tokenizer.decode(self._answer(row), skip_special_tokens=True) for row in token_ids.tolist()]

    def _answer(self, row: list[int]) -> list[int]:
        # The answer ends at the first stop token; whatever the sampler put after it is not shown.
        return row[:next((j for j, t in enumerate(row) if t in self.stop_ids), len(row))]

    def blame(self, token_ids):
        """The blame callable of targeted re-masking: (n, G) generated token ids -> a BlameResult
        holding the (n, G) float tensor in [0, 1] of each position's blame for its text's toxicity
        (`Policy.blame`, carried from characters to the tokens that produced them by
        `attribution.token_spans`) and the (n,) texts the classifiers scored for it, per row.

        The stop token and every position after it get 0, the floor's share: they are not shown or
        scored, so re-drawing them cannot lower the toxicity (the kernel's floor still lets it re-mask
        them, which its target needs). `blame_texts` counts the texts the classifiers scored for it.
        """
        import torch

        from ..refine.iterref import BlameResult

        if token_ids.dim() != 2:
            raise ArgumentError(f"blame expects token ids of shape (n, G), got {tuple(token_ids.shape)}")
        G = token_ids.shape[1]
        answers = [tuple(self._answer(row)) for row in token_ids.tolist()]
        decoded = {a: token_spans(self.tokenizer, a) for a in dict.fromkeys(answers)}  # text, spans
        char_blame, cost = self.policy.blame([decoded[a][0] for a in answers])
        self.blame_texts += int(cost.sum())
        out = np.stack([token_blame(b, decoded[a][1], G) for a, b in zip(answers, char_blame)]) if answers \
            else np.zeros((0, G))
        return BlameResult(torch.as_tensor(out, dtype=torch.float32, device=token_ids.device),
                           torch.as_tensor(cost, dtype=torch.float64))

    def judge(self, token_ids):
        """A `refine.Judged`: the (B,) reward as `__call__` gives it and the (B,) bool verdict of the
        same scores, which adaptive refinement gates on (one scoring for both)."""
        import torch

        from ..refine.iterref import Judged

        if token_ids.dim() != 2:
            raise ArgumentError(f"reward_fn expects token ids of shape (B, G), got {tuple(token_ids.shape)}")
        scores = self.policy.score(self.decode(token_ids))
        return Judged(torch.as_tensor(self.policy.reward(scores), dtype=torch.float32, device=token_ids.device),
                      torch.as_tensor(scores.toxic, dtype=torch.bool))

    def __call__(self, token_ids):
        return self.judge(token_ids).reward
