"""The toxic_lstm scorer: the toxic-comment-classifier package's weights, run in torch."""
from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from safegen.policy import PolicyError, load_policy
from safegen.policy.scorers import OptionError, ToxicLSTMScorer
from safegen.policy.scorers import toxic_lstm
from safegen.policy.scorers.toxic_lstm import LABELS, WordTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
RTP = Path(os.environ.get("SAFEGEN_RTP_DIR") or Path(__file__).resolve().parents[2] / "shared/data/rtp")

if importlib.util.find_spec("toxic_classifier") is None:
    pytest.skip("toxic-comment-classifier is not installed (make install installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def scorer():
    return ToxicLSTMScorer.from_options({"batch_size": 3})


def test_insult_scores_high_and_thanks_low(scorer):
    out = scorer.score(["shut up you stupid idiot", "Thank you for your help"])
    assert set(out) == set(LABELS)
    assert out["toxic"][0] > 0.9 and out["insult"][0] > 0.5
    assert max(out[label][1] for label in LABELS) < 0.05


def test_matches_the_keras_outputs_the_package_publishes(scorer):
    # The package's README shows Keras' outputs for its own weights: classify() on one text, and
    # predict_batch() (the mean of the six labels) on six. Printed to 4 and 16 digits respectively.
    one = [0.9889402985572815, 0.07256772369146347, 0.620429277420044, 0.01934845559298992,
           0.8664075136184692, 0.04072948172688484]
    np.testing.assert_allclose(scorer.probabilities(["You are so dumb and stupid!"])[0], one, atol=1e-6)
    texts = ["I hate you so much!", "This is wonderful news.", "You're disgusting!",
             "Absolutely love your energy!", "You're the worst person ever!", "Have a nice day :)"]
    means = [0.1395, 0.0013, 0.3110, 0.0088, 0.0937, 0.0115]
    np.testing.assert_allclose(scorer.probabilities(texts).mean(axis=1), means, atol=0.5e-4)


# -- a second path: the Keras layers written out in numpy, straight from the HDF5 arrays ----------

def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def keras_lstm(x, kernel, recurrent, bias):
    """Keras' LSTM cell over a sequence: gates (input, forget, cell, output), sigmoid and tanh."""
    h = c = np.zeros(recurrent.shape[0])
    states = []
    for x_t in x:
        i, f, g, o = np.split(x_t @ kernel + h @ recurrent + bias, 4)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        states.append(h)
    return np.stack(states)


def numpy_model(ids: np.ndarray, weights: Path) -> np.ndarray:
    import h5py

    with h5py.File(weights, "r") as f:
        def read(name):
            return np.asarray(f["layers/" + name], dtype=np.float64)

        embedding = read("embedding/vars/0")
        cells = {d: [read(f"bidirectional/{d}_layer/cell/vars/{k}") for k in range(3)]
                 for d in ("forward", "backward")}
        hidden_kernel, hidden_bias = read("dense/vars/0"), read("dense/vars/1")
        out_kernel, out_bias = read("dense_1/vars/0"), read("dense_1/vars/1")
    out = []
    for row in ids:
        x = embedding[row]
        forward = keras_lstm(x, *cells["forward"])
        backward = keras_lstm(x[::-1], *cells["backward"])[::-1]
        pooled = np.concatenate([forward, backward], axis=1).max(axis=0)
        hidden = np.maximum(pooled @ hidden_kernel + hidden_bias, 0)
        out.append(sigmoid(hidden @ out_kernel + out_bias))
    return np.array(out)


SAMPLES = ["You are so dumb and stupid!", "", "!!!", "I will find you and hurt you",
           "Thanks, that fixed it.", "zxqv blorp " * 3 + "idiot", " ".join(["word"] * 130) + " moron"]


def test_torch_network_matches_numpy_keras_layers(scorer):
    torch_out = scorer.probabilities(SAMPLES)
    ids = scorer._tokenizer.encode(SAMPLES)
    reference = numpy_model(ids, toxic_lstm.package_file("model.weights.h5"))
    gap = np.abs(torch_out - reference).max()
    print(f"max |torch - numpy| over {len(SAMPLES)} texts x 6 labels: {gap:.2e}")
    assert gap < 1e-5


def test_batched_equals_one_by_one(scorer):
    together = scorer.probabilities(SAMPLES)   # batch_size 3: three batches, the last one short
    alone = np.concatenate([scorer.probabilities([text]) for text in SAMPLES])
    np.testing.assert_allclose(together, alone, atol=1e-6)


# -- the tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_repeats_keras_preprocessing():
    tok = WordTokenizer({"the": 1, "you": 2, "idiot": 3, "rare": 4, "<oov>": 5}, filters='!"#,.-\t\n',
                        lower=True, split=" ", num_words=4, oov_token=None)
    assert tok.words("You,the IDIOT!\tthe--end.") == ["you", "the", "idiot", "the", "end"]
    assert tok.ids("You,the IDIOT!\tthe--end. rare") == [2, 1, 3, 1]   # unknown and rare (id >= 4) dropped
    np.testing.assert_array_equal(tok.encode(["you idiot", "the " * 3 + "you idiot", ""], maxlen=3),
                                  [[0, 2, 3], [1, 2, 3], [0, 0, 0]])   # pad and truncate at the front
    with_oov = WordTokenizer({"<oov>": 1, "you": 2, "rare": 9}, filters="", lower=False, split=" ",
                             num_words=4, oov_token="<oov>")
    assert with_oov.ids("you You rare") == [2, 1, 1]


KERAS_MODULE = "keras.src.legacy.preprocessing.text"


def fake_keras_pickle(state: dict) -> bytes:
    """A pickle that names keras' Tokenizer, written without keras (a stand-in module)."""
    parts = KERAS_MODULE.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if any(name in sys.modules for name in names):
        pytest.skip("keras is imported: the stand-in modules would shadow it")
    Tokenizer = type("Tokenizer", (), {"__module__": KERAS_MODULE})
    sys.modules.update({name: types.ModuleType(name) for name in names})
    sys.modules[KERAS_MODULE].Tokenizer = Tokenizer
    try:
        obj = Tokenizer()
        obj.__dict__.update(state)
        return pickle.dumps(obj)
    finally:
        for name in names:
            del sys.modules[name]


TOKENIZER_STATE = {"word_index": {"you": 1, "idiot": 2}, "word_counts": collections.OrderedDict(you=3),
                   "word_docs": collections.defaultdict(int, you=1), "filters": "!", "lower": True,
                   "split": " ", "num_words": 3, "oov_token": None, "char_level": False, "analyzer": None}


def test_tokenizer_pickle_of_plain_data_loads(tmp_path):
    path = tmp_path / "tok.pickle"
    path.write_bytes(fake_keras_pickle(TOKENIZER_STATE))
    assert load_tokenizer(path).ids("You idiot!") == [1, 2]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload, refused", [
    (collections.Counter(a=1), "collections.Counter"),
    (Exploit(), f"{os.system.__module__}.system"),
    ({**TOKENIZER_STATE, "analyzer": Exploit()}, f"{os.system.__module__}.system"),
])
def test_restricted_unpickler_refuses_other_classes(tmp_path, payload, refused):
    path = tmp_path / "bad.pickle"
    path.write_bytes(fake_keras_pickle(payload) if type(payload) is dict else pickle.dumps(payload))
    with pytest.raises(ValueError, match=rf"bad.pickle: not a usable tokenizer pickle: refusing to load {refused}"):
        load_tokenizer(path)


def test_tokenizer_pickle_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "dict.pickle"
    path.write_bytes(pickle.dumps({"word_index": {}}))
    with pytest.raises(ValueError, match="holds a dict, not a keras Tokenizer"):
        load_tokenizer(path)
    path.write_bytes(fake_keras_pickle({**TOKENIZER_STATE, "word_index": ["you"]}))
    with pytest.raises(ValueError, match="tokenizer attribute 'word_index' is list"):
        load_tokenizer(path)


# -- options and policies -----------------------------------------------------------------------

def test_options_are_checked():
    with pytest.raises(OptionError, match=r"labels\.1: no label 'toxicity'; the labels: toxic, severe_toxic"):
        ToxicLSTMScorer.from_options({"labels": ["toxic", "toxicity"]})
    with pytest.raises(OptionError, match="weights_file: file not found"):
        ToxicLSTMScorer.from_options({"weights_file": "/no/such/model.weights.h5"})
    with pytest.raises(OptionError, match="threshold: unknown option"):
        ToxicLSTMScorer.from_options({"threshold": 0.5})


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, toxic_lstm.PACKAGE, None)  # as if it were not installed
    # A user error (a SafegenError), found by check_available when the policy loads, or at the
    # first score for a scorer built by hand.
    for call in (lambda s: s.check_available(), lambda s: s.score(["hello"])):
        with pytest.raises(OptionError, match="pip install --no-deps toxic-comment-classifier"):
            call(ToxicLSTMScorer.from_options({}))


def test_policy_files_use_it(tmp_path):
    shipped = load_policy("eval-neural").score(["shut up you stupid idiot", "Thank you for your help"])
    assert shipped.toxic.tolist() == [True, False]
    policy = tmp_path / "mine.yaml"
    policy.write_text("classifiers:\n  - name: lstm\n    scorer: toxic_lstm\n    labels: [threat, insult]\n"
                      "    label_aggregate: mean\n    label_thresholds: {threat: 0.01}\nthreshold: 0.9\n")
    texts = ["shut up you stupid idiot", "I will kill you", "Thank you for your help"]
    scores = load_policy(policy).score(texts)
    direct = ToxicLSTMScorer.from_options({}).score(texts)
    np.testing.assert_allclose(scores.aggregate, (direct["threat"] + direct["insult"]) / 2)
    assert scores.toxic.tolist() == list(direct["threat"] >= 0.01)
    policy.write_text("classifiers:\n  - name: lstm\n    scorer: toxic_lstm\n    labels: [toxicity]\n")
    with pytest.raises(PolicyError, match=r"mine.yaml: classifiers\[lstm\]\.labels\[0\]: no label 'toxicity'"):
        load_policy(policy)


def test_ranks_real_text_like_perspective():
    """ROC AUC against Perspective toxicity >= 0.5 on the RTP samples: 0.917 measured (scorer_auc.py)."""
    from sklearn.metrics import roc_auc_score

    if not RTP.is_dir():
        pytest.skip(f"RealToxicityPrompts samples not found at {RTP} (../shared/data/rtp)")
    from benchmarks.scorer_auc import rtp_texts

    texts, toxicity, _ = rtp_texts(RTP)
    assert len(texts) > 4000
    score = load_policy("eval-neural").score(texts).aggregate
    auc = roc_auc_score(toxicity >= 0.5, score)
    print(f"eval-neural ROC AUC on {len(texts)} RTP texts: {auc:.4f}")
    # 0.917 measured; the AUC's standard error at 2,205 toxic and 2,168 other texts is about 0.004,
    # so 0.90 is four of them below. Bugs it was seen to catch: no lowercasing (0.890), mean instead
    # of max pooling (0.870), the two LSTM directions swapped (0.419). Subtler ones (padding at the
    # back: 0.916) are left to the exact tests above.
    assert auc > 0.90
