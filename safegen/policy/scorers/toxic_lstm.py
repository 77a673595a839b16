"""`toxic_lstm`: the bidirectional-LSTM classifier of the `toxic-comment-classifier` package, in torch.

Options:
  labels:         labels that count (default: all six: toxic, severe_toxic, obscene, threat, insult,
                  identity_hate, the Jigsaw 2018 labels under their original names)
  weights_file:   the Keras weights (HDF5) instead of the package's model/model.weights.h5
  tokenizer_file: the pickled Keras Tokenizer instead of the package's model/tokenizer.pickle
  device:         cpu | cuda | cuda:N | mps | auto (default cpu)
  batch_size:     texts per forward pass (default 256)

The package (MIT) ships trained weights and a fitted tokenizer but needs TensorFlow to run them.
This scorer does not: it rebuilds the network in torch (embedding 20,000 x 50, a bidirectional LSTM
of 50 units per direction, max-pooling over time, dense 50 with ReLU, dense 6 with sigmoid), reads
the weights with h5py and repeats the tokenizer's preprocessing. Install the package without its
dependencies (`pip install --no-deps toxic-comment-classifier==0.3.0`; `make install` does); it is
located, never imported, since importing it imports TensorFlow. Nothing is downloaded at run time.

Blame (which words it objects to) is by occlusion: each word's drop in the score's logit when it is
removed, which scores the text and one variant per word, a call of (1 + words) texts.

SECURITY: the tokenizer file is a pickle. It is read by an unpickler that builds nothing but plain
data (dicts, lists, strings, numbers, OrderedDict, defaultdict) and, for the one class the file
holds, keras' Tokenizer, an inert stand-in whose attributes are then checked. Any other class is
refused with an error naming it, so a tampered file cannot run code.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from .base import (Options, OptionError, Scorer, device_option, occlusion_blame, occlusion_cost,
                   resolve_device)

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
# The package pads or truncates every text to this many word ids (its MAXLEN); the network was
# trained on that length and does not mask padding, so the length is part of the model.
MAXLEN = 100
PACKAGE = "toxic_classifier"   # the import name of the toxic-comment-classifier distribution
INSTALL = "pip install --no-deps toxic-comment-classifier==0.3.0"


class KerasTokenizerState:
    """Inert stand-in for keras' Tokenizer: unpickling only fills its __dict__."""


# (module, name) -> what the restricted unpickler returns. REDUCE can call these, which is harmless:
# each builds a container or an int, and the stand-in takes no arguments.
SAFE_GLOBALS = {
    ("keras.src.legacy.preprocessing.text", "Tokenizer"): KerasTokenizerState,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "int"): int,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a tokenizer pickle may only hold plain data "
                "and keras' Tokenizer") from None


class WordTokenizer:
    """Keras' legacy Tokenizer.texts_to_sequences plus pad_sequences(maxlen), as the package calls them.

    Only word-level tokenizers without a custom analyzer are supported (the package's is one).
    """

    def __init__(self, word_index: dict[str, int], filters: str, lower: bool, split: str,
                 num_words: int | None, oov_token: str | None):
        # Keras keeps ids below num_words and maps the others, like unknown words, to the OOV id
        # (or drops them without one), so only the kept part of the vocabulary is needed.
        self.vocab = {w: i for w, i in word_index.items() if not num_words or i < num_words}
        self.oov = word_index.get(oov_token) if oov_token is not None else None
        self.table = str.maketrans({c: split for c in filters})
        self.lower = lower
        self.split = split

    def words(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        return [w for w in text.translate(self.table).split(self.split) if w]

    def ids(self, text: str) -> list[int]:
        out = []
        for word in self.words(text):
            i = self.vocab.get(word, self.oov)
            if i is not None:
                out.append(i)
        return out

    def encode(self, texts: list[str], maxlen: int = MAXLEN) -> np.ndarray:
        """(len(texts), maxlen) ids; padding and truncation both at the front (pad_sequences' default)."""
        out = np.zeros((len(texts), maxlen), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-maxlen:]
            if ids:
                out[row, maxlen - len(ids):] = ids
        return out


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: Path) -> WordTokenizer:
    with open(path, "rb") as handle:
        try:
            state = RestrictedUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise OptionError("tokenizer_file", f"{path}: not a usable tokenizer pickle: {error}") from None
    if not isinstance(state, KerasTokenizerState):
        raise OptionError("tokenizer_file", f"{path}: holds a {type(state).__name__}, not a keras Tokenizer")
    attrs = vars(state)
    expected = {"word_index": dict, "filters": str, "lower": bool, "split": str,
                "num_words": (int, type(None)), "oov_token": (str, type(None))}
    for key, kind in expected.items():
        if not isinstance(attrs.get(key), kind):
            raise OptionError("tokenizer_file", f"{path}: tokenizer attribute {key!r} is {type(attrs.get(key)).__name__}")
    if attrs.get("char_level") or attrs.get("analyzer") is not None:
        raise OptionError("tokenizer_file", f"{path}: only word-level tokenizers without a custom analyzer are supported")
    return WordTokenizer(**{key: attrs[key] for key in expected})


def read_keras_weights(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a Keras 3 `.weights.h5` file of the package's model, by layer role."""
    import h5py

    where = {
        "embedding": "layers/embedding/vars/0",
        "forward_kernel": "layers/bidirectional/forward_layer/cell/vars/0",
        "forward_recurrent": "layers/bidirectional/forward_layer/cell/vars/1",
        "forward_bias": "layers/bidirectional/forward_layer/cell/vars/2",
        "backward_kernel": "layers/bidirectional/backward_layer/cell/vars/0",
        "backward_recurrent": "layers/bidirectional/backward_layer/cell/vars/1",
        "backward_bias": "layers/bidirectional/backward_layer/cell/vars/2",
        "hidden_kernel": "layers/dense/vars/0",
        "hidden_bias": "layers/dense/vars/1",
        "out_kernel": "layers/dense_1/vars/0",
        "out_bias": "layers/dense_1/vars/1",
    }
    with h5py.File(path, "r") as f:
        missing = [name for name in where.values() if name not in f]
        if missing:
            raise OptionError("weights_file", f"{path}: not the toxic-comment-classifier model: no dataset {missing[0]}")
        return {role: np.asarray(f[name], dtype=np.float32) for role, name in where.items()}


def build_network(arrays: dict[str, np.ndarray]):
    """The torch module computing the Keras model, with its weights copied in."""
    import torch
    from torch import nn

    class BiLSTMClassifier(nn.Module):
        def __init__(self, vocab: int, dim: int, units: int, hidden: int, labels: int):
            super().__init__()
            self.embedding = nn.Embedding(vocab, dim)
            self.lstm = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
            self.hidden = nn.Linear(2 * units, hidden)
            self.out = nn.Linear(hidden, labels)

        def forward(self, ids):
            states, _ = self.lstm(self.embedding(ids))
            pooled = states.amax(dim=1)
            return torch.sigmoid(self.out(torch.relu(self.hidden(pooled))))

    vocab, dim = arrays["embedding"].shape
    units = arrays["forward_recurrent"].shape[0]
    net = BiLSTMClassifier(vocab, dim, units, arrays["hidden_kernel"].shape[1], arrays["out_kernel"].shape[1])
    t = torch.from_numpy
    with torch.no_grad():
        net.embedding.weight.copy_(t(arrays["embedding"]))
        # Keras stores x @ kernel with gates (input, forget, cell, output) along the last axis, the
        # order torch uses along the first; Keras has one bias, so torch's second one stays zero.
        for direction, suffix in (("forward", ""), ("backward", "_reverse")):
            getattr(net.lstm, "weight_ih_l0" + suffix).copy_(t(arrays[direction + "_kernel"].T))
            getattr(net.lstm, "weight_hh_l0" + suffix).copy_(t(arrays[direction + "_recurrent"].T))
            getattr(net.lstm, "bias_ih_l0" + suffix).copy_(t(arrays[direction + "_bias"]))
            getattr(net.lstm, "bias_hh_l0" + suffix).zero_()
        net.hidden.weight.copy_(t(arrays["hidden_kernel"].T))
        net.hidden.bias.copy_(t(arrays["hidden_bias"]))
        net.out.weight.copy_(t(arrays["out_kernel"].T))
        net.out.bias.copy_(t(arrays["out_bias"]))
    return net.eval()


def package_file(name: str) -> Path:
    spec = importlib.util.find_spec(PACKAGE)   # finds the package without running its TensorFlow imports
    if spec is None or not spec.submodule_search_locations:
        raise OptionError(None, f"the toxic_lstm scorer needs the toxic-comment-classifier package (import "
                                f"{PACKAGE}), which is not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / name
    if not path.is_file():
        raise OptionError(None, f"toxic-comment-classifier is installed but has no {path}: reinstall it ({INSTALL})")
    return path


class ToxicLSTMScorer(Scorer):
    name = "toxic_lstm"
    path_options = ("weights_file", "tokenizer_file")
    requires = (("h5py", "h5py", "pip install h5py"), ("torch", "torch", "pip install torch"))

    def __init__(self, labels=None, weights_file: Path | None = None, tokenizer_file: Path | None = None,
                 device: str = "cpu", batch_size: int = 256):
        self.labels = tuple(labels) if labels else LABELS
        self.weights_file = weights_file
        self.tokenizer_file = tokenizer_file
        self.device = device
        self.batch_size = batch_size
        self._tokenizer = None
        self._net = None

    @classmethod
    def from_options(cls, options) -> "ToxicLSTMScorer":
        opts = Options(options)
        labels = opts.string_list("labels")
        weights_file = opts.path("weights_file", kind="file")
        tokenizer_file = opts.path("tokenizer_file", kind="file")
        device = device_option(opts)
        batch_size = opts.integer("batch_size", 256)
        opts.done()
        if labels is not None and not labels:
            raise OptionError("labels", "must list at least one label")
        for i, label in enumerate(labels or ()):
            if label not in LABELS:
                raise OptionError(("labels", i), f"no label {label!r}; the labels: {', '.join(LABELS)}")
        return cls(labels=labels, weights_file=weights_file, tokenizer_file=tokenizer_file,
                   device=device, batch_size=batch_size)

    def check_available(self) -> None:
        """h5py and torch, and the package's files for those not given as options: found now, read
        at the first score."""
        super().check_available()
        for given, name in ((self.weights_file, "model.weights.h5"), (self.tokenizer_file, "tokenizer.pickle")):
            if given is None:
                package_file(name)

    def _load(self) -> None:
        self._tokenizer = load_tokenizer(self.tokenizer_file or package_file("tokenizer.pickle"))
        arrays = read_keras_weights(self.weights_file or package_file("model.weights.h5"))
        if arrays["out_kernel"].shape[1] != len(LABELS):
            raise OptionError("weights_file", f"the weights have {arrays['out_kernel'].shape[1]} outputs, not {len(LABELS)}")
        self._net = build_network(arrays).to(resolve_device(self.device))

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 6) sigmoid outputs in LABELS order."""
        import torch

        if self._net is None:
            self._load()
        device = next(self._net.parameters()).device
        out = np.zeros((len(texts), len(LABELS)))
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                ids = self._tokenizer.encode(list(texts[start:start + self.batch_size]))
                out[start:start + len(ids)] = self._net(torch.from_numpy(ids).to(device)).double().cpu().numpy()
        return out

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        probs = self.probabilities(texts)
        return {label: probs[:, LABELS.index(label)] for label in self.labels}

    def blame(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        return occlusion_blame(self, texts)

    def blame_cost(self, texts: list[str]) -> int:
        return occlusion_cost(texts)
