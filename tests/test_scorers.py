"""The scorers on their real code paths, with tiny models built here (no network, no downloads)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from safegen.policy import PolicyError, load_policy
from safegen.policy.scorers import DetoxifyScorer, HFScorer, LexiconScorer, OptionError, ProfanityCheckScorer

REPO = Path(__file__).resolve().parents[1]
RTP = Path(__file__).resolve().parents[2] / "shared/data/rtp"

WORDS = ("the a you are is an idiot hello world good bad day what ok".split())
# Jigsaw 2018 class names as Detoxify's `original` checkpoint stores them; Detoxify renames three.
JIGSAW_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
# With the classifier head's weights zeroed, each label's score is sigmoid(bias): known values
# that tell us whether labels reach the right output column.
LABEL_PROBS = [0.9, 0.1, 0.2, 0.3, 0.4, 0.6]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def build_base_folder(folder: Path, num_labels: int, id2label: dict | None = None):
    """A tiny BERT config plus a WordPiece tokenizer over a made-up vocabulary."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5's BertTokenizer takes the vocabulary itself (`vocab`); given `vocab_file=` it
    # ignores it and keeps only the special tokens, so every word would be [UNK].
    tokenizer = transformers.BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    reloaded = transformers.AutoTokenizer.from_pretrained(folder)
    words = reloaded(" ".join(WORDS), add_special_tokens=False)["input_ids"]
    assert words == [vocab.index(w) for w in WORDS]  # every word its own id: no [UNK]
    kwargs = dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}) if id2label else {}
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=64, num_labels=num_labels, **kwargs)
    config.save_pretrained(folder)
    return config


def set_head(model, biases):
    import torch

    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(biases))


@pytest.fixture(scope="module")
def detoxify_checkpoint(tmp_path_factory):
    """A Detoxify checkpoint in the released format, whose base model is a local folder."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("detoxify")
    base = root / "base"
    config = build_base_folder(base, num_labels=len(JIGSAW_CLASSES))
    model = transformers.BertForSequenceClassification(config)
    set_head(model, [logit(p) for p in LABEL_PROBS])
    checkpoint = {
        "config": {
            # model_type is a local folder, so Detoxify builds the base config with no network.
            "arch": {"type": "BERT", "args": {"model_type": str(base),
                                              "model_name": "BertForSequenceClassification",
                                              "tokenizer_name": "BertTokenizer",
                                              "num_classes": len(JIGSAW_CLASSES)}},
            "dataset": {"type": "JigsawDataOriginal", "args": {"classes": JIGSAW_CLASSES}},
        },
        "state_dict": model.state_dict(),
    }
    torch.save(checkpoint, root / "toxic_tiny.ckpt")
    return root


def test_detoxify_checkpoint_scores_named_labels(detoxify_checkpoint):
    scorer = DetoxifyScorer.from_options({
        "checkpoint": str(detoxify_checkpoint / "toxic_tiny.ckpt"),
        "huggingface_config_path": str(detoxify_checkpoint / "base"),
        "labels": ["toxicity", "threat", "identity_attack"],
        "batch_size": 2,
    })
    assert scorer._model is None  # lazy: nothing loaded before the first score call
    texts = ["hello world", "", "you are an idiot", "a good day", "what"]
    out = scorer.score(texts)
    assert scorer.labels == ("toxicity", "threat", "identity_attack")
    assert set(out) == set(scorer.labels)
    expected = {"toxicity": 0.9, "threat": 0.3, "identity_attack": 0.6}  # renamed from toxic/identity_hate
    for label, p in expected.items():
        assert out[label].shape == (len(texts),)
        np.testing.assert_allclose(out[label], p, atol=1e-5)
    # A one-text batch: Detoxify's predict() returns a bare float there.
    np.testing.assert_allclose(scorer.score(["idiot"])["toxicity"], [0.9], atol=1e-5)


def test_detoxify_checkpoint_default_label_and_missing_label(detoxify_checkpoint, tmp_path):
    scorer = DetoxifyScorer.from_options({"checkpoint": str(detoxify_checkpoint / "toxic_tiny.ckpt"),
                                          "huggingface_config_path": str(detoxify_checkpoint / "base")})
    assert scorer.labels == ("toxicity",)
    np.testing.assert_allclose(scorer.score(["hello"])["toxicity"], [0.9], atol=1e-5)

    # A label the checkpoint lacks can only be found once it is loaded: a PolicyError naming it.
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(textwrap.dedent(f"""
        classifiers:
          - name: detoxify
            checkpoint: {detoxify_checkpoint / 'toxic_tiny.ckpt'}
            huggingface_config_path: {detoxify_checkpoint / 'base'}
            labels: [toxicity, sexual_explicit]
    """))
    policy = load_policy(policy_file)
    with pytest.raises(PolicyError, match=r"p\.yaml: classifiers\[detoxify\]\.labels: .*no label 'sexual_explicit'"):
        policy.score(["hello"])


def test_detoxify_checkpoint_loads_with_hub_offline(detoxify_checkpoint, tmp_path):
    """The whole path through load_policy and Detoxify, in a fresh process with the hub off."""
    policy_file = detoxify_checkpoint / "offline_detoxify.yaml"
    # Relative paths: resolved against the policy file's folder.
    policy_file.write_text(textwrap.dedent("""
        classifiers:
          - name: detoxify
            checkpoint: toxic_tiny.ckpt
            huggingface_config_path: base
            labels: [toxicity, severe_toxicity, obscene, threat, insult, identity_attack]
    """))
    script = textwrap.dedent(f"""
        import json
        from safegen.policy import load_policy
        scores = load_policy({str(policy_file)!r}).score(["hello world", "", "you idiot", "hello world"])
        print(json.dumps({{"rows": [scores.row(i) for i in range(4)]}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TORCH_HOME=str(tmp_path / "torch"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    renamed = ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
    for row in rows:
        for label, p in zip(renamed, LABEL_PROBS):
            assert row["per_label"]["detoxify"][label] == pytest.approx(p, abs=1e-5)
        assert row["aggregate"] == pytest.approx(0.9, abs=1e-5)   # max over labels
        assert row["toxic"] is True


def test_detoxify_options_are_validated_without_loading(detoxify_checkpoint):
    assert DetoxifyScorer.from_options({"variant": "unbiased"}).labels[-1] == "sexual_explicit"
    assert DetoxifyScorer.from_options({}).labels == (
        "toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
    for variant in ("original", "unbiased", "multilingual", "original-small", "unbiased-small"):
        assert "toxicity" in DetoxifyScorer.from_options({"variant": variant}).labels
    with pytest.raises(OptionError, match=r"labels.*'original' has no label 'sexual_explicit'"):
        DetoxifyScorer.from_options({"labels": ["sexual_explicit"]})
    with pytest.raises(OptionError, match="variant.*must be one of"):
        DetoxifyScorer.from_options({"variant": "huge"})
    with pytest.raises(OptionError, match="either `variant` or `checkpoint`"):
        DetoxifyScorer.from_options({"variant": "original",
                                     "checkpoint": str(detoxify_checkpoint / "toxic_tiny.ckpt")})
    with pytest.raises(OptionError, match="huggingface_config_path: folder not found"):
        DetoxifyScorer.from_options({"checkpoint": str(detoxify_checkpoint / "toxic_tiny.ckpt"),
                                     "huggingface_config_path": str(detoxify_checkpoint / "nope")})
    with pytest.raises(OptionError, match="device"):
        DetoxifyScorer.from_options({"device": "gpu"})


# -- hf ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("hf") / "tiny-toxicity"
    config = build_base_folder(folder, num_labels=2, id2label={0: "non-toxic", 1: "toxic"})
    model = transformers.BertForSequenceClassification(config)
    set_head(model, [0.5, 1.5])
    model.save_pretrained(folder)
    return folder


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_hf_softmax_and_sigmoid(hf_classifier):
    texts = ["hello world", "", "you are an idiot " * 40, "hello world"]   # the long one must be truncated
    softmax = HFScorer.from_options({"model": str(hf_classifier), "labels": "toxic",
                                     "activation": "softmax", "batch_size": 3, "max_length": 16})
    out = softmax.score(texts)
    assert softmax.labels == ("toxic",)
    np.testing.assert_allclose(out["toxic"], [sigmoid(1.0)] * 4, atol=1e-5)   # e^1.5 / (e^0.5 + e^1.5)

    both = HFScorer.from_options({"model": str(hf_classifier), "labels": ["toxic", 0],
                                  "activation": "sigmoid", "max_length": 16})
    out = both.score(texts)
    assert both.labels == ("toxic", "0")
    np.testing.assert_allclose(out["toxic"], [sigmoid(1.5)] * 4, atol=1e-5)
    np.testing.assert_allclose(out["0"], [sigmoid(0.5)] * 4, atol=1e-5)

    # Single-label (cross-entropy) heads default to softmax.
    default = HFScorer.from_options({"model": str(hf_classifier), "labels": [1]})
    assert default.activation == "softmax"
    np.testing.assert_allclose(default.score(["idiot"])["1"], [sigmoid(1.0)], atol=1e-5)


def test_hf_through_policy_with_relative_path(hf_classifier):
    policy_file = hf_classifier.parent / "hf_policy.yaml"
    policy_file.write_text("classifiers:\n  - {name: tiny, scorer: hf, model: ./tiny-toxicity, labels: toxic}\n"
                           "threshold: 0.8\n")
    policy = load_policy(policy_file)
    scores = policy.score(["hello", "idiot"])
    np.testing.assert_allclose(scores.aggregate, [sigmoid(1.0)] * 2, atol=1e-5)
    assert not scores.toxic.any()   # 0.73 < 0.8


def test_hf_labels_checked_against_local_config(hf_classifier):
    with pytest.raises(OptionError, match=r"no label 'toxicity'; its labels: 0: non-toxic, 1: toxic"):
        HFScorer.from_options({"model": str(hf_classifier), "labels": ["toxicity"]})
    with pytest.raises(OptionError, match="label index 2 out of range"):
        HFScorer.from_options({"model": str(hf_classifier), "labels": [2]})
    with pytest.raises(OptionError, match="labels.*required"):
        HFScorer.from_options({"model": str(hf_classifier)})
    with pytest.raises(OptionError, match="model: folder not found"):
        HFScorer.from_options({"model": "./no/such/folder", "labels": "toxic"})
    with pytest.raises(OptionError, match="trust_remote_code.*unknown option"):
        HFScorer.from_options({"model": str(hf_classifier), "labels": "toxic", "trust_remote_code": True})
    # A hub id is not contacted at load time.
    hub = HFScorer.from_options({"model": "s-nlp/roberta_toxicity_classifier", "labels": "toxic",
                                 "revision": "main"})
    assert hub._model is None and hub.labels == ("toxic",)


# -- profanity_check ---------------------------------------------------------------------------

def rtp_texts_and_labels():
    if not RTP.is_dir():
        pytest.skip(f"RealToxicityPrompts samples not found at {RTP} (../shared/data/rtp)")
    texts, toxic = [], []
    for name in ("challenging.jsonl", "random.jsonl"):
        for line in (RTP / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for part in ("prompt", "continuation"):
                item = row.get(part) or {}
                if item.get("toxicity") is None or item.get("text") is None:
                    continue
                texts.append(item["text"])
                toxic.append(item["toxicity"] >= 0.5)
    return texts, np.array(toxic)


def test_profanity_check_ranks_real_text(record_property):
    from sklearn.metrics import roc_auc_score

    texts, toxic = rtp_texts_and_labels()
    assert len(texts) > 3000 and 0.2 < toxic.mean() < 0.8
    scores = ProfanityCheckScorer.from_options(None).score(texts)["profanity"]
    assert scores.shape == (len(texts),) and scores.min() >= 0 and scores.max() <= 1
    auc = roc_auc_score(toxic, scores)
    record_property("profanity_check_auc", auc)
    print(f"profanity_check ROC AUC on {len(texts)} RTP texts: {auc:.4f}")
    assert auc > 0.85


def test_profanity_check_takes_no_options_and_scores_empty_text():
    with pytest.raises(OptionError, match="threshold: unknown option; known options: none"):
        ProfanityCheckScorer.from_options({"threshold": 0.5})
    out = ProfanityCheckScorer.from_options({}).score(["", "have a nice day", "fuck off"])["profanity"]
    assert out.shape == (3,)
    assert out[2] > 0.9 and out[1] < 0.2 and out[0] < 0.2


# -- lexicon -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lexicon():
    return LexiconScorer.from_options({"words": ["fuck*", "shit", "ass", "cunt", "anal", "son of a bitch"],
                                       "patterns": [r"\bkill (?:your|ur)self\b"]})


@pytest.mark.parametrize("text", [
    "shit", "SHIT happens", "oh sh1t", "$h!t", "5hit", "shiiiiit", "s.h.i.t", "s-h-i-t", "s h i t",
    "what the fuck", "fucking hell", "f.u.c.k.i.n.g", "FuUuCk", "ph. no: 4ss", "kiss my a$$",
    "you son of a bitch", "SON  OF A B1TCH", "just kill urself", "ｆｕｃｋ",   # full-width letters
    "anal", "a n a l",
])
def test_lexicon_matches_evasions(lexicon, text):
    assert lexicon.score([text])["match"].tolist() == [1.0]


@pytest.mark.parametrize("text", [
    "a classic example", "Scunthorpe United", "assess the bass", "an al gore speech", "canal",
    "analysis", "shitake", "grasshopper", "passage", "", "kill yourselves slowly? no: kill yourselves",
    "sh it", "this is fine",
])
def test_lexicon_matches_whole_words_only(lexicon, text):
    assert lexicon.score([text])["match"].tolist() == [0.0]


def test_lexicon_word_file_and_errors(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# comment line\nbadword   # trailing comment\n\n  other thing \n")
    scorer = LexiconScorer.from_options({"words_file": str(words)})
    assert scorer.words == ["badword", "other thing"]
    np.testing.assert_array_equal(scorer.score(["a b4dword here", "the other  thing", "badwords", "other"])["match"],
                                  [1.0, 1.0, 0.0, 0.0])
    # Patterns keep their own flags and groups (they are not folded into one alternation).
    own = LexiconScorer.from_options({"patterns": [r"(?x) (\w+) \s \1", "(?s)start.*end"]})
    np.testing.assert_array_equal(own.score(["bye bye now", "bye now", "START\nEND"])["match"], [1, 0, 1])
    with pytest.raises(OptionError, match=r"patterns\.0: invalid regular expression"):
        LexiconScorer.from_options({"patterns": ["(unclosed"]})
    with pytest.raises(OptionError, match="needs `words`"):
        LexiconScorer.from_options({"words": []})
    with pytest.raises(OptionError, match="words_file: file not found"):
        LexiconScorer.from_options({"words_file": str(tmp_path / "missing.txt")})


def test_shipped_word_list_flags_real_slurs_not_innocent_words():
    offline = load_policy("offline")
    lexicon = next(c.scorer for c in offline.classifiers if c.name == "lexicon")
    assert len(lexicon.words) >= 20
    hits = lexicon.score(["what the fuck", "you stupid b1tch", "bullshit!", "Scunthorpe", "a classic cocktail",
                          "he said 'spick and span'", "assessment"])["match"]
    np.testing.assert_array_equal(hits, [1, 1, 1, 0, 0, 0, 0])
