"""`profanity_check`: the alt-profanity-check model (linear SVMs over TF-IDF word counts, calibrated).

No options. It ships its model inside the package, so it works with no network and needs no GPU;
it is fast (thousands of texts a second on one core) but only knows profanity, not veiled insults
or threats. Label: `profanity`.

What the package ships (alt-profanity-check 1.9): a TfidfVectorizer over lowercased words of two or
more letters (English stop words dropped, rows L2-normalised) and a CalibratedClassifierCV holding 5
LinearSVCs, each with its own sigmoid calibration; the probability is the mean of the 5 calibrated
sigmoids. Each SVM's decision function is linear in the TF-IDF vector, so it splits exactly into one
term per word occurrence plus the intercept (`contributions`). Blame weighs each word by its term in
the calibrated logit, averaged over the 5 models, and spreads the score over the words with `spread`.
"""
from __future__ import annotations

import re

import numpy as np

from .base import Options, Scorer, spread


class ProfanityCheckScorer(Scorer):
    name = "profanity_check"
    labels = ("profanity",)

    def __init__(self):
        self._predict_prob = None
        self._module = None

    @classmethod
    def from_options(cls, options) -> "ProfanityCheckScorer":
        Options(options).done()
        return cls()

    def _load(self):
        # Imported here: importing the package unpickles its model (about a second).
        from profanity_check import profanity_check
        self._module = profanity_check
        self._predict_prob = profanity_check.predict_prob

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self._predict_prob is None:
            self._load()
        if not texts:
            return {"profanity": np.zeros(0)}
        scores = np.asarray(self._predict_prob(list(texts)), dtype=np.float64).reshape(len(texts))
        return {"profanity": np.clip(scores, 0.0, 1.0)}

    def contributions(self, text: str) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
        """(spans, terms, intercepts): the character span of every word occurrence the vectorizer
        counts, terms (models, occurrences) with each occurrence's share of each SVM's decision
        function, and the SVMs' intercepts; terms.sum(1) + intercepts is their decision function."""
        if self._module is None:
            self._load()
        vectorizer, model = self._module.vectorizer, self._module.model
        x = vectorizer.transform([text]).tocsr()
        weights = np.stack([c.estimator.coef_.ravel() for c in model.calibrated_classifiers_])
        intercepts = np.array([float(c.estimator.intercept_[0]) for c in model.calibrated_classifiers_])
        # The vectorizer's own tokens, found again with their positions. Lowercasing can change a
        # string's length ("İ" becomes two characters), so positions map back character by character.
        origin = [i for i, ch in enumerate(text) for _ in ch.lower()]
        occurrences: dict[int, list[tuple[int, int]]] = {}
        for m in re.finditer(vectorizer.token_pattern, text.lower()):
            column = vectorizer.vocabulary_.get(m.group())
            if column is not None and x[0, column] != 0:
                occurrences.setdefault(column, []).append((origin[m.start()], origin[m.end() - 1] + 1))
        spans, terms = [], []
        for column, places in occurrences.items():
            # A word's TF-IDF value is its count times a constant: each occurrence carries an equal share.
            share = weights[:, column] * x[0, column] / len(places)
            spans += places
            terms += [share] * len(places)
        terms = np.array(terms).T if terms else np.zeros((len(intercepts), 0))
        return spans, terms, intercepts

    def blame(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        scores = self.score(texts)["profanity"]
        # Each model's calibrated probability is sigmoid(-(a·f + b)): a word's term t moves its
        # logit by -a·t (a < 0, so a word the SVM counts as profane raises it).
        slopes = np.array([-c.calibrators[0].a_ for c in self._module.model.calibrated_classifiers_])
        rows = []
        for text, score in zip(texts, scores):
            spans, terms, _ = self.contributions(text)
            rows.append(spread(score, slopes @ terms, spans, len(text)))
        return {"profanity": rows}
