"""Toxicity scorers, registered by the name a policy file uses for them.

Adding a scorer: write a `Scorer` subclass in its own file here, then add it to SCORERS below
(or call `register_scorer` from your own code). Scorer modules import their models lazily, so
importing this package stays cheap.
"""
from __future__ import annotations

from ...errors import ArgumentError
from .base import Options, OptionError, Scorer
from .detoxify import DetoxifyScorer
from .hf import HFScorer
from .lexicon import LexiconScorer
from .profanity_check import ProfanityCheckScorer
from .toxic_lstm import ToxicLSTMScorer

SCORERS: dict[str, type[Scorer]] = {
    "detoxify": DetoxifyScorer,
    "hf": HFScorer,
    "profanity_check": ProfanityCheckScorer,
    "lexicon": LexiconScorer,
    "toxic_lstm": ToxicLSTMScorer,
}


def register_scorer(name: str, scorer: type[Scorer], replace: bool = False) -> None:
    """Make `scorer` available to policy files as `scorer: <name>`."""
    if name in SCORERS and not replace and SCORERS[name] is not scorer:
        raise ArgumentError(f"a scorer named {name!r} is already registered ({SCORERS[name].__name__}); "
                         "pass replace=True to override it")
    SCORERS[name] = scorer


__all__ = ["SCORERS", "register_scorer", "Scorer", "Options", "OptionError",
           "DetoxifyScorer", "HFScorer", "LexiconScorer", "ProfanityCheckScorer",
           "ToxicLSTMScorer"]
