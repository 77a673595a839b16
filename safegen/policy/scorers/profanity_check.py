"""`profanity_check`: the alt-profanity-check model (a linear SVM over word n-grams, calibrated).

No options. It ships its model inside the package, so it works with no network and needs no GPU;
it is fast (thousands of texts a second on one core) but only knows profanity, not veiled insults
or threats. Label: `profanity`.
"""
from __future__ import annotations

import numpy as np

from .base import Options, Scorer


class ProfanityCheckScorer(Scorer):
    name = "profanity_check"
    labels = ("profanity",)

    def __init__(self):
        self._predict_prob = None

    @classmethod
    def from_options(cls, options) -> "ProfanityCheckScorer":
        Options(options).done()
        return cls()

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self._predict_prob is None:
            # Imported here: importing the package unpickles its model (about a second).
            from profanity_check import predict_prob
            self._predict_prob = predict_prob
        if not texts:
            return {"profanity": np.zeros(0)}
        scores = np.asarray(self._predict_prob(list(texts)), dtype=np.float64).reshape(len(texts))
        return {"profanity": np.clip(scores, 0.0, 1.0)}
