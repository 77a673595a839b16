"""Blame: which characters each scorer objects to, how a policy combines it, and the bridge from
characters to generated token positions."""
from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from safegen.policy import SCORERS, Options, Scorer, load_policy
from safegen.policy.attribution import _spans_from_prefixes, token_blame, token_spans
from safegen.policy.scorers import HFScorer, LexiconScorer, ProfanityCheckScorer
from safegen.policy.scorers.base import occlusion_blame, occlusion_cost, spread, without_word

RTP = Path(os.environ.get("SAFEGEN_RTP_DIR") or Path(__file__).resolve().parents[2] / "shared/data/rtp")


def rtp_texts(n: int) -> list[str]:
    if not RTP.is_dir():
        pytest.skip(f"RealToxicityPrompts samples not found at {RTP}")
    rows = [json.loads(line) for line in (RTP / "challenging.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["prompt"]["text"] + (r.get("continuation") or {}).get("text", "") for r in rows[:n]]


def blamed(text: str, blame: np.ndarray, level: float = 0.5) -> list[str]:
    """The runs of characters blamed at least `level`."""
    runs, start = [], None
    for i, b in enumerate(list(blame) + [0.0]):
        if b >= level and start is None:
            start = i
        elif b < level and start is not None:
            runs.append(text[start:i])
            start = None
    return runs


# -- lexicon -----------------------------------------------------------------------------------

def test_lexicon_blame_is_exactly_the_matched_characters():
    lexicon = LexiconScorer.from_options({"words": ["fuck*", "shit", "ass", "son of a bitch"],
                                          "patterns": [r"kill (?:your|ur)self"]})
    # Normalisation changes lengths before the matches ("ﬁ" -> "fi", "ß" -> "ss"), so positions
    # must be mapped back; evasions, phrases and patterns are blamed whole, innocent words not at all.
    text = "ﬁne Straße: ｆｕｃｋ this s.h.i.t, a classic ass, you SON  OF A B1TCH, kill urself"
    blame = lexicon.blame([text])["match"][0]
    assert blame.shape == (len(text),) and set(np.unique(blame)) == {0.0, 1.0}
    assert blamed(text, blame) == ["ｆｕｃｋ", "s.h.i.t", "ass", "SON  OF A B1TCH", "kill urself"]
    # A combining accent composes under NFKC, which per-character normalisation cannot see.
    accented = "cafe\u0301 shit"
    assert blamed(accented, lexicon.blame([accented])["match"][0]) == ["shit"]
    # Blame and score agree: a text blames something exactly when it matches.
    texts = rtp_texts(300)
    scores = lexicon.score(texts)["match"]
    assert scores.sum() > 20
    np.testing.assert_array_equal([b.any() for b in lexicon.blame(texts)["match"]], scores == 1)


# -- profanity_check ---------------------------------------------------------------------------

def test_profanity_check_contributions_are_the_decision_function():
    from profanity_check import profanity_check as package

    scorer = ProfanityCheckScorer()
    texts = ["shit shit happens, İstanbul FUCK", "You are a fucking idiot and a shit person", "",
             "the the of and", *rtp_texts(100)]
    X = package.vectorizer.transform(texts)
    models = package.model.calibrated_classifiers_
    assert len(models) == 5
    for i, text in enumerate(texts):
        spans, terms, intercepts = scorer.contributions(text)
        decision = np.array([m.estimator.decision_function(X[i])[0] for m in models])
        np.testing.assert_allclose(terms.sum(1) + intercepts, decision, rtol=0, atol=1e-9)
        # Each counted occurrence is a word the vectorizer sees, in the text's own characters.
        assert all(text[a:b].lower() in package.vectorizer.vocabulary_ for a, b in spans)
        # The package's probability is the mean of the models' calibrated sigmoids of it, which is
        # what blame's logit weights assume.
        logits = np.array([-(m.calibrators[0].a_ * d + m.calibrators[0].b_) for m, d in zip(models, decision)])
        assert np.mean(1 / (1 + np.exp(-logits))) == pytest.approx(scorer.score([text])["profanity"][0], abs=1e-9)


def test_profanity_check_blames_the_profane_words():
    scorer = ProfanityCheckScorer()
    texts = ["You are a fucking idiot and a shit person", "what a lovely day in the park"]
    scores = scorer.score(texts)["profanity"]
    toxic, calm = scorer.blame(texts)["profanity"]
    assert toxic.max() == pytest.approx(scores[0]) and scores[0] > 0.9
    assert set(blamed(texts[0], toxic)) == {"fucking", "idiot", "shit"}
    assert blamed(texts[0], toxic, level=scores[0] - 1e-9) == ["fucking"]
    assert calm.max() <= scores[1] < 0.1


# -- occlusion (detoxify, hf) ------------------------------------------------------------------

class WordCountScorer(Scorer):
    """A stand-in classifier: logit = -3 + 4 · (listed words in the text)."""

    name = "word_count"
    labels = ("toxic",)
    bad = ("idiot", "moron")

    def score(self, texts):
        counts = np.array([sum(w.strip(",.!") in self.bad for w in t.lower().split()) for t in texts])
        return {"toxic": 1 / (1 + np.exp(3 - 4 * counts))}


def test_occlusion_blames_the_words_that_raise_the_score_even_when_it_saturates():
    scorer = WordCountScorer()
    texts = ["you idiot, what a moron!", "hello there", "idiot"]
    blame = occlusion_blame(scorer, texts)["toxic"]
    score = scorer.score(texts)["toxic"]
    # Two bad words: removing either leaves 0.73, yet both carry the whole score (0.99), no more.
    assert blamed(texts[0], blame[0], level=score[0] - 1e-9) == ["idiot,", "moron!"]
    assert all(b.max() == pytest.approx(s) for b, s in zip(blame, score) if b.max() > 0)
    assert blame[0][:3].max() == 0 and blame[1].max() == 0
    assert blamed(texts[2], blame[2], level=score[2] - 1e-9) == ["idiot"]
    assert occlusion_cost(texts) == (1 + 5) + (1 + 2) + (1 + 1)
    assert without_word("a b c", (2, 3)) == "a c" and without_word("a b", (0, 1)) == "b"
    assert without_word("a b", (2, 3)) == "a"


@pytest.fixture(scope="module")
def random_hf_classifier(tmp_path_factory):
    """A tiny BERT classifier whose head reads its (random) features, so every word moves the score."""
    import transformers

    folder = tmp_path_factory.mktemp("hf-blame")
    words = "the a you are is an idiot hello world good bad day what ok".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                                     num_labels=2, id2label={0: "ok", 1: "toxic"}, label2id={"ok": 0, "toxic": 1})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # larger weights: the default initialisation barely separates texts
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embeddings" not in name:
                weight.mul_(100.0 if name.startswith("classifier") else 5.0)
    model.save_pretrained(folder)
    return folder


def test_hf_occlusion_blame_matches_one_word_at_a_time(random_hf_classifier):
    scorer = HFScorer.from_options({"model": str(random_hf_classifier), "labels": "toxic", "batch_size": 4})
    texts = ["you are an idiot", "hello world", "what a bad day ok", "", "idiot"]
    got = scorer.blame(texts)["toxic"]
    assert scorer.blame_cost(texts) == sum(1 + len(t.split()) for t in texts)
    # The attribution, recomputed from the scores of the very batch it scored (the text and each
    # text one word shorter, in batches of 4, padded): the same numbers, so equal to rounding of float64.
    batch = [variant for text in texts for variant in
             [text] + [" ".join(text.split()[:k] + text.split()[k + 1:]) for k in range(len(text.split()))]]
    batched = scorer.score(batch)["toxic"]
    at = 0
    for text, blame in zip(texts, got):
        words = text.split()
        spans, pos = [], 0
        for w in words:
            pos = text.index(w, pos)
            spans.append((pos, pos + len(w)))
            pos += len(w)
        full, occluded = batched[at], batched[at + 1:at + 1 + len(words)]
        at += 1 + len(words)
        drops = [math.log(full / (1 - full)) - math.log(p / (1 - p)) for p in occluded]
        np.testing.assert_allclose(blame, spread(full, drops, spans, len(text)), rtol=1e-9, atol=1e-12)
    # And those scores are each text's own, whatever its batch: padding only changes the order of
    # float32 sums (padded positions are masked to exact zeros), a few float32 ulps of a logit, far
    # below 1e-5 in a probability. (The blame itself is not compared at that tolerance: its shares
    # divide one word's drop by another's, which multiplies a rounding difference without bound.)
    alone = np.array([scorer.score([t])["toxic"][0] for t in batch])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    assert sum(b.max() > 0.1 for b in got if len(b)) >= 2   # the scores move: words are blamed
    # Through a policy: the occlusion's texts are counted, a repeated text once.
    (random_hf_classifier / "p.yaml").write_text("classifiers: [{name: t, scorer: hf, model: ., labels: toxic}]\n")
    blame, cost = load_policy(random_hf_classifier / "p.yaml").blame(["hello world", "idiot", "hello world"])
    assert cost.tolist() == [3, 2, 0]
    np.testing.assert_allclose(blame[0], got[1])


# -- policy ------------------------------------------------------------------------------------

class CharTableScorer(Scorer):
    """Scores 0.8 (label a) or 0.4 (label b) where its character occurs, and blames that character as much."""

    name = "chars"

    def __init__(self, labels, char):
        self.labels, self.char = tuple(labels), char

    @classmethod
    def from_options(cls, options):
        opts = Options(options)
        labels, char = opts.string_list("labels", ["a"]), opts.string("char", "x")
        opts.done()
        return cls(labels, char)

    def score(self, texts):
        return {label: np.array([(0.8 if label == "a" else 0.4) * (self.char in t) for t in texts])
                for label in self.labels}

    def blame(self, texts):
        return {label: [np.array([(0.8 if label == "a" else 0.4) * (c == self.char) for c in t]) for t in texts]
                for label in self.labels}


@pytest.mark.parametrize("aggregate, combine", [
    ("max", lambda f, s: np.maximum(f, s)),
    ("mean", lambda f, s: (f + s) / 2),
    ("weighted_mean", lambda f, s: (0.5 * f + 1.0 * s) / 1.5),
    ("noisy_or", lambda f, s: 1 - (1 - 0.5 * f) * (1 - 1.0 * s)),
])
def test_policy_combines_blame_like_scores(tmp_path, monkeypatch, aggregate, combine):
    monkeypatch.setitem(SCORERS, "chars", CharTableScorer)
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""
        classifiers:
          - {{name: first, scorer: chars, labels: [a, b], char: x, weight: 0.5}}
          - {{name: second, scorer: chars, labels: [a, b], char: y, label_aggregate: mean}}
          - {{name: list, scorer: lexicon, words: [zz], hard: true}}
        aggregate: {aggregate}
        threshold: 0.5
    """))
    policy = load_policy(tmp_path / "p.yaml")
    texts = ["axy zz", "xy", "axy zz", "q"]
    blame, cost = policy.blame(texts)
    assert cost.tolist() == [0] * 4 and [len(b) for b in blame] == [6, 2, 6, 1]
    first = np.array([0, 0.8, 0, 0, 0, 0])          # max over labels a (0.8) and b (0.4)
    second = np.array([0, 0, 0.6, 0, 0, 0])         # mean over labels
    expected = combine(first, second)
    expected[4:] = 1.0                              # the hard list fired on "zz"
    np.testing.assert_allclose(blame[0], expected, atol=1e-12)
    np.testing.assert_allclose(blame[1], combine(first, second)[1:3], atol=1e-12)
    np.testing.assert_array_equal(blame[2], blame[0])
    assert blame[3].tolist() == [0.0]


def test_policy_hard_classifier_below_threshold_blames_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(SCORERS, "chars", CharTableScorer)
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""
        classifiers:
          - {name: soft, scorer: chars, labels: [b], char: x}
          - {name: hard, scorer: chars, labels: [b], char: y, hard: true}
        threshold: 0.5
    """))
    blame, _ = load_policy(tmp_path / "p.yaml").blame(["xy"])
    np.testing.assert_allclose(blame[0], [0.4, 0.0])   # y's classifier scored 0.4: it did not fire


# -- characters to tokens ----------------------------------------------------------------------

def prefix_spans(tokenizer, ids):
    """The reference: decode every prefix."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text, _spans_from_prefixes(text, tokenizer.batch_decode([ids[:j + 1] for j in range(len(ids))],
                                                                    skip_special_tokens=True))


def test_token_spans_on_the_tiny_tokenizer():
    from safegen.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = tok("You are a fucking idiot, you think? Fine.", add_special_tokens=False)["input_ids"]
    text, spans = token_spans(tok, ids)
    assert [text[a:b].strip() for a, b in spans] == tok.convert_ids_to_tokens(ids)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
    # Sampled sequences are rarely what the tokenizer would write. On random ids (specials,
    # punctuation runs, and apostrophes that the clean-up joins to a neighbour: "don ' t" -> "don't"),
    # each word-level token still owns exactly its own word.
    rng = np.random.default_rng(0)
    for _ in range(30):
        row = rng.integers(0, len(tok), size=40).tolist()
        text, spans = token_spans(tok, row)
        assert [text[a:b].strip() for a, b in spans] == [tok.decode([t], skip_special_tokens=True) for t in row]


def test_token_spans_on_a_byte_level_bpe():
    """LLaDA's tokenizer is a byte-level BPE: a character can take several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["you are an idiot", "what a day"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    ids = tok("café idiot 😀 you", add_special_tokens=False)["input_ids"]
    text, spans = token_spans(tok, ids)
    assert text == "café idiot 😀 you" and (text, spans) == prefix_spans(tok, ids)
    # Every token holding a byte of "é" or of the emoji owns that character, so blaming the
    # character blames all of them.
    for ch in ("é", "😀"):
        at = text.index(ch)
        owners = [j for j, (a, b) in enumerate(spans) if a <= at < b]
        pieces = len(tok(ch, add_special_tokens=False)["input_ids"])
        assert pieces >= 2 and len(owners) == pieces
        assert token_blame(np.array([float(c == ch) for c in text]), spans, len(ids)).sum() == pieces
    assert spans[0][0] == 0 and spans[-1][1] == len(text)


def test_reward_blame_maps_characters_to_generated_positions():
    from safegen.models.tiny import EOS, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    policy = load_policy("offline")
    eos = tok.convert_tokens_to_ids(EOS)
    words = tok("you are a fucking idiot", add_special_tokens=False)["input_ids"]
    calm = tok("what a good day", add_special_tokens=False)["input_ids"]
    G = 8
    # Row 0 has a toxic word after its stop token: not shown, not scored, not blamed.
    rows = torch.tensor([(words + [eos] * G)[:G], (calm + [eos] + words)[:G], (words + [eos] * G)[:G]])
    reward = policy.reward_fn(tok, stop_ids=[eos])
    blame, cost = reward.blame(rows)
    assert blame.shape == (3, G) and blame.dtype == torch.float32 and cost.tolist() == [0, 0, 0]
    assert blame[0, 3] == 1.0                      # "fucking": the hard list's match
    assert 0.3 < blame[0, 4] < 1.0                 # "idiot": profanity_check's share
    assert blame[0, :3].max() == 0 and blame[0, 5:].max() == 0
    assert blame[1].max() < 0.2 and blame[1, len(calm):].max() == 0
    torch.testing.assert_close(blame[2], blame[0])
    assert reward.blame_texts == int(cost.sum()) == 0
    with pytest.raises(ValueError, match="shape"):
        reward.blame(rows[0])


# -- generator and command line ----------------------------------------------------------------

def test_generator_targeted_remasking_redraws_what_the_policy_blames(tiny_generator_parts):
    """One proposal per sample: uniform re-masking re-draws a blamed token 2 times in 8, targeted
    (floor 0.01) nearly always, so it removes the toxicity from many more samples."""
    from safegen.generator import SafeGenerator
    from safegen.policy.policy import Classifier, Policy

    model, tokenizer, profile = tiny_generator_parts
    sampling = dict(max_new_tokens=8, steps=8, block_length=8, temperature=1.0)
    plain = SafeGenerator(model, tokenizer, policy="offline", profile=profile, sampling=sampling)
    ids, attn, _ = plain.encode_prompts(["Tell me about your day"] * 16)
    P = ids.shape[1]
    before = plain.generate(ids, attention_mask=attn, seed=0, refine=False)
    # A policy that objects to the first word of every sample.
    words = sorted({w for w in tokenizer.convert_ids_to_tokens(before[:, P].tolist()) if w.isalpha()})
    assert len(words) >= 8
    policy = Policy([Classifier("lexicon", LexiconScorer(words), hard=True)], alpha=0.1)
    gen = SafeGenerator(model, tokenizer, policy=policy, profile=profile, sampling=sampling,
                        refinement=dict(iterations=1, rho=0.25, adaptive=False, budget=None))
    removed = {}
    for remask in ("uniform", "targeted"):
        out = gen.generate(ids, attention_mask=attn, seed=0, proposal_holes=remask, blame_floor=0.01,
                           return_dict_in_generate=True)
        assert all(r.text_before == r2 for r, r2 in zip(out.reports, policy.reward_fn(
            tokenizer, profile.stop_ids).decode(before[:, P:])))
        assert all(r.reward_calls == 2 for r in out.reports)   # the draft and one proposal; blame is free
        removed[remask] = sum(r.toxic_before and not r.toxic_after for r in out.reports)
    assert removed["targeted"] >= removed["uniform"] + 4, removed


def test_cli_remask_options_reach_the_refinement():
    from safegen.arguments import refine_options as _refine_options
    from safegen.cli import build_parser

    args = build_parser().parse_args(["generate", "hi", "--remask", "targeted", "--blame-floor", "0.2"])
    assert _refine_options(args) == {"proposal_holes": "targeted", "blame_floor": 0.2}  # --remask: the former name
    assert _refine_options(build_parser().parse_args(["generate", "hi"])) == {}
