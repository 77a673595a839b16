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
    requires = (("profanity_check", "alt-profanity-check", "pip install alt-profanity-check"),)
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
        models = profanity_check.model.calibrated_classifiers_
        self._weights = np.stack([m.estimator.coef_.ravel() for m in models])        # (models, vocabulary)
        self._intercepts = np.array([float(m.estimator.intercept_[0]) for m in models])
        # Each model's calibrated probability is sigmoid(-(a·f + b)): a term t of its decision
        # function f moves its logit by -a·t (a < 0, so what the SVM counts as profane raises it).
        self._slopes = np.array([-float(m.calibrators[0].a_) for m in models])

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
        spans, terms = self._terms(text, self._module.vectorizer.transform([text]).tocsr())
        return spans, terms, self._intercepts

    def _terms(self, text: str, row) -> tuple[list[tuple[int, int]], np.ndarray]:
        vectorizer = self._module.vectorizer
        values = dict(zip(row.indices.tolist(), row.data.tolist()))
        # The vectorizer's own tokens, found again with their positions. Lowercasing can change a
        # string's length ("İ" becomes two characters), so positions map back character by character.
        origin = [i for i, ch in enumerate(text) for _ in ch.lower()]
        occurrences: dict[int, list[tuple[int, int]]] = {}
        for m in re.finditer(vectorizer.token_pattern, text.lower()):
            column = vectorizer.vocabulary_.get(m.group())
            if values.get(column):
                occurrences.setdefault(column, []).append((origin[m.start()], origin[m.end() - 1] + 1))
        spans, terms = [], []
        for column, places in occurrences.items():
            # A word's TF-IDF value is its count times a constant: each occurrence carries an equal share.
            share = self._weights[:, column] * values[column] / len(places)
            spans += places
            terms += [share] * len(places)
        return spans, np.array(terms).T if terms else np.zeros((len(self._intercepts), 0))

    def blame(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        scores = self.score(texts)["profanity"]
        if not texts:
            return {"profanity": []}
        X = self._module.vectorizer.transform(list(texts)).tocsr()
        rows = []
        for i, (text, score) in enumerate(zip(texts, scores)):
            spans, terms = self._terms(text, X[i])
            rows.append(spread(score, self._slopes @ terms, spans, len(text)))
        return {"profanity": rows}
