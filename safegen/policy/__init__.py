"""Policies: what counts as toxic, how sure we must be, and the reward the sampler maximises.

    from safegen.policy import load_policy
    policy = load_policy("default")          # or a path to your own YAML file
    scores = policy.score(["some text", "another"])
    scores.aggregate, scores.toxic, scores.row(0)

See `policies/default.yaml` for the file format, `policy.py` for the scoring maths and
`scorers/` for the classifiers a policy can use.
"""
from .loader import load_policy, shipped_policies
from .policy import Classifier, Policy, PolicyError, PolicyReward, PolicyScores
from .scorers import SCORERS, OptionError, Options, Scorer, register_scorer

__all__ = ["load_policy", "shipped_policies", "Policy", "PolicyScores", "PolicyReward", "PolicyError",
           "Classifier", "Scorer", "Options", "OptionError", "SCORERS", "register_scorer"]
