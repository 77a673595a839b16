"""safegen.models.dream: Dream-7B's architecture, native (no remote code).

The reference is transformers' own Qwen2 (Dream's layers are Qwen2.5's, every position attending to
every other): on the same random weights, with a bidirectional mask, positions cumsum(mask) − 1 and
the logits shifted by one position as Dream's generation code shifts them, its logits must equal ours.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from safegen.models.dream import DreamConfig, DreamModel
from safegen.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]

# Dream-v0-Instruct-7B's config.json fields that define the computation (values as published in
# Dream's hub repository and its paper: Qwen2.5-7B's shapes, 28 query / 4 key-value heads, θ 1e6).
DREAM_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
                max_position_embeddings=131072, hidden_act="silu", tie_word_embeddings=False, mask_token_id=151666,
                pad_token_id=151643, bos_token_id=151643, eos_token_id=151643, rope_scaling=None,
                use_sliding_window=False, sliding_window=None, architectures=["DreamModel"])
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=120, rope_theta=1e6, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)


def test_the_7b_config_gives_qwen25_7bs_parameters():
    with torch.device("meta"):
        model = DreamModel(DreamConfig.from_dict(dict(DREAM_7B, model_type="Dream")))
    # Qwen2.5-7B's count: embedding and head 2 x 152064 x 3584, 28 layers of attention (biases on q, k, v)
    # and SwiGLU MLP, the final norm.
    d, kv, f = 3584, 512, 18944
    layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
    assert sum(p.numel() for p in model.parameters()) == 2 * 152064 * d + 28 * layer + d == 7_615_616_512
    names = {n for n, _ in model.named_parameters()}
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias", "model.layers.27.mlp.down_proj.weight",
            "model.norm.weight", "lm_head.weight"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names


@pytest.mark.parametrize("field, value", [("rope_scaling", {"type": "yarn", "factor": 4.0}),
                                          ("use_sliding_window", True), ("hidden_act", "gelu"),
                                          ("tie_word_embeddings", True)])
def test_settings_it_cannot_honour_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        DreamConfig(**{**SMALL, field: value})


@pytest.fixture(scope="module")
def pair():
    """Dream and the Qwen2 reference on the same random weights (biases made nonzero)."""
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    ours = DreamModel(DreamConfig(**SMALL, mask_token_id=119, pad_token_id=118, bos_token_id=117,
                                  eos_token_id=118)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _reference(ref, ids, attn):
    length = ids.shape[1]
    mask = attn.bool()[:, None, None, :].expand(-1, 1, length, -1)  # every position sees every real one
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's generation code's shift


def test_logits_equal_the_reference_with_and_without_left_padding(pair):
    ours, ref = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 117, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    attn[2, :5] = 0
    with torch.no_grad():
        mine = ours(ids, attention_mask=attn).logits
        theirs = _reference(ref, ids, attn)
        plain = ours(ids).logits
        plain_ref = _reference(ref, ids, torch.ones_like(ids))
    # Where the previous position is a real token (the first real token's logits come from padding in
    # Dream's own code, and a prompt token is never predicted).
    real = attn.bool()
    scored = real & torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    torch.testing.assert_close(mine[scored], theirs[scored], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, plain_ref, rtol=1e-5, atol=1e-5)


def test_a_row_does_not_depend_on_its_neighbours_padding(pair):
    ours, _ = pair
    torch.manual_seed(2)
    short = torch.randint(0, 117, (1, 6))
    long = torch.randint(0, 117, (1, 11))
    batch = torch.cat([torch.cat([torch.full((1, 5), 118), short], 1), long])
    attn = torch.ones_like(batch)
    attn[0, :5] = 0
    with torch.no_grad():
        alone = ours(short).logits[0]
        together = ours(batch, attention_mask=attn).logits[0, 5:]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_the_shift_is_inside_the_model():
    """Position i's logits are the head on position i - 1's state (the first keeps its own), so the
    sampler sees the logits of position i at i."""
    torch.manual_seed(3)
    model = DreamModel(DreamConfig(**SMALL)).eval()
    ids = torch.randint(0, 117, (1, 8))
    with torch.no_grad():
        states = model.model(ids)
        logits = model(ids).logits
        torch.testing.assert_close(logits[0, 1:], model.lm_head(states)[0, :-1])
        torch.testing.assert_close(logits[0, 0], model.lm_head(states)[0, 0])


@pytest.fixture(scope="module")
def tiny_dream(tmp_path_factory):
    from safegen.models.tiny import write_tiny_dream

    return write_tiny_dream(tmp_path_factory.mktemp("tiny-dream"), seed=0)


@pytest.mark.parametrize("quantization, tolerance", [("8bit", 0.15), ("4bit", 0.6)])
def test_the_hub_layout_loads_natively_and_quantized(tiny_dream, quantization, tolerance):
    full, tokenizer, profile = load_model(str(tiny_dream), quantization="none")
    assert isinstance(full, DreamModel) and not profile.shift_logits
    assert profile.mask_id == tokenizer.convert_tokens_to_ids("<|mask|>")
    assert set(profile.stop_ids) == {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    quant, _, _ = load_model(str(tiny_dream), quantization=quantization)
    import bitsandbytes as bnb

    linears = [m for n, m in quant.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    assert len(linears) == 2 * 7 and not isinstance(quant.lm_head, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    ids = torch.randint(0, 200, (2, 10))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0
    with torch.no_grad():
        a, b = full(ids, attention_mask=attn).logits, quant(ids, attention_mask=attn).logits
    real = attn.bool()
    assert (a[real] - b[real]).abs().max() < tolerance
    assert torch.corrcoef(torch.stack([a[real].flatten(), b[real].flatten().float()]))[0, 1] > 0.98


def test_detoxify_runs_on_a_tiny_dream(tiny_dream, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("Go away, you\nthe weather today\n")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model",
                          str(tiny_dream), "--quantization", "none", "--policy", "offline", "--max-new-tokens", "8",
                          "--temperature", "1.0", "--samples", "2", "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all(r["flops"] > 0 for r in records)
    # LLaDA's sampler with the dual cache, the command line's default (Dream's own orders: not yet)
    assert all(r["sampler"] == "llada+dual" for r in records)


def test_serve_answers_from_a_tiny_dream_as_offline(tiny_dream, tmp_path):
    """`safegen serve` on a Dream folder (the dual cache by default), called by the OpenAI client: the
    answer generate_text gives."""
    from oracles import served_and_offline

    messages = [{"role": "user", "content": "tell me about the weather"}]
    out, alone = served_and_offline(tiny_dream, tmp_path / "serve.log", messages)
    assert out.choices[0].message.content == alone.text
    assert out.choices[0].model_extra["safegen"]["sampler"] == "llada+dual"


# ------------------------------------------------------------------------------ the key/value cache
def _model(layers=2, seed=0):
    torch.manual_seed(seed)
    return DreamModel(DreamConfig(**{**SMALL, "num_hidden_layers": layers}, mask_token_id=119, pad_token_id=118)).eval()


def _at(logits, positions):
    return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))


def _padded_batch(seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 117, (3, 20))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    attn[2, :6] = 0
    return ids, attn


BLOCK = torch.arange(12, 16).expand(3, -1)
HOLES = torch.tensor([[9, 13, 17], [10, 11, 18], [8, 15, 19]])  # adjacent ones too


def test_cached_forwards_from_the_same_tokens_equal_the_full_forward():
    """With the cache made from the very tokens the queries run on, a block's and scattered holes'
    logits are the full forward's (the shift included: each query's logits come from the state before
    it, which the cached forward runs too), and so are the prefill's."""
    model = _model()
    ids, attn = _padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=attn).logits
        logits, cache = model.prefill(ids, attn, logits_from=8)
        torch.testing.assert_close(logits, full[:, 8:], rtol=1e-5, atol=1e-5)
        for positions in (BLOCK, HOLES):
            torch.testing.assert_close(model.forward_queries(ids.gather(1, positions), positions, cache),
                                       _at(full, positions), rtol=1e-5, atol=1e-5)
        # Merged with another call (safegen/engine.py), each gets its own.
        both = model.forward_queries_many([(ids.gather(1, BLOCK), BLOCK, cache), (ids.gather(1, HOLES), HOLES, cache)])
        torch.testing.assert_close(both[0], _at(full, BLOCK), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[1], _at(full, HOLES), rtol=1e-5, atol=1e-5)


def test_one_layer_cached_queries_with_new_tokens_are_exact():
    """On one layer the keys and values outside the queries depend on their own tokens only, so the
    cached forward of changed query tokens must equal the full forward of the changed sequence: it
    fails if the queries' fresh keys are ignored, or if the state before a query reads a stale token."""
    model = _model(layers=1, seed=4)
    ids, attn = _padded_batch(seed=5)
    with torch.no_grad():
        _, cache = model.prefill(ids, attn)
        for positions in (BLOCK, HOLES):
            changed = ids.clone()
            changed.scatter_(1, positions, torch.randint(0, 117, positions.shape))
            full = model(changed, attention_mask=attn).logits
            cached = model.forward_queries(changed.gather(1, positions), positions, cache)
            torch.testing.assert_close(cached, _at(full, positions), rtol=1e-5, atol=1e-5)


def test_the_dual_cache_samples_a_tiny_dream_alone_and_merged(tiny_dream):
    """The command line's default sampler for Dream (the dual cache), through SafeGenerator: rows
    get the same tokens alone and side by side on the engine, and the cache spends fewer FLOPs."""
    from safegen import SafeGenerator, engine
    from safegen.sampling.sampler import drive

    model, tokenizer, profile = load_model(str(tiny_dream), quantization="none")
    gen = SafeGenerator(model, tokenizer, policy="offline", profile=profile,
                        sampling=dict(max_new_tokens=16, steps=16, block_length=4, temperature=1.0))
    prompts = ["Go away, you", "On this late November afternoon, we walked to the"]

    def steps(i, **options):
        return gen.generate_text_steps([prompts[i]], seeds=[i], **options)

    alone = [drive(steps(i, cache="dual")) for i in range(2)]
    runs = [engine.Generation(lambda i=i: steps(i, cache="dual")) for i in range(2)]
    while not all(r.done for r in runs):
        engine.advance([r for r in runs if not r.done])
    assert [r.result[0].text for r in runs] == [a[0].text for a in alone]
    plain = [drive(steps(i)) for i in range(2)]
    assert all(a[0].sampler == "llada+dual" and a[0].flops < p[0].flops / 2 for a, p in zip(alone, plain))


# ------------------------------------------------------------------------------ Dream's own orders
def test_dreams_orders_score_as_its_generation_code_does():
    """maskgit_plus: the drawn token's tempered probability; topk_margin: the two most likely tokens'
    margin; entropy: the negative entropy; each on the tempered, top-k/top-p truncated distribution
    (computed here directly from the logits, and compared with the confidence the sampler commits by)."""
    from safegen.sampling.dream import truncate
    from safegen.sampling.sampler import DiffusionSampler, SamplingConfig
    from safegen.models.family import ModelProfile

    torch.manual_seed(6)
    logits = torch.randn(2, 5, 30) * 3
    x = torch.full((2, 5), 29)
    committable = torch.ones(2, 5, dtype=torch.bool)
    keys = torch.tensor([11, 12])
    for order, T, top_k, top_p in (("maskgit_plus", 0.7, None, None), ("topk_margin", 1.0, 5, None),
                                   ("entropy", 1.5, None, 0.8), ("topk_margin", 0.0, None, 0.9)):
        cfg = SamplingConfig(max_new_tokens=5, steps=5, block_length=5, temperature=T, remasking=order,
                             top_k=top_k, top_p=top_p)
        sampler = DiffusionSampler(torch.nn.Identity(), ModelProfile(mask_id=29), cfg)
        pred = sampler.predict(logits.clone(), x, committable, keys, T)
        lg = logits.clone()
        lg[..., 29] = float("-inf")  # the mask is never a prediction (safegen's rule), then Dream's filters
        lg = truncate(lg, top_k, top_p)
        p = torch.softmax(lg / (T if T > 0 else 1.0), -1)
        assert (p.gather(-1, pred.candidates[..., None]) > 0).all()  # never outside the truncated support
        if order == "maskgit_plus":
            expected = p.gather(-1, pred.candidates[..., None]).squeeze(-1)
        elif order == "topk_margin":
            top = p.topk(2, -1).values
            expected = top[..., 0] - top[..., 1]
        else:
            expected = (p * torch.log(p + 1e-10)).sum(-1)
        torch.testing.assert_close(pred.confidence, expected, rtol=1e-5, atol=1e-6)


def test_top_k_and_top_p_keep_exactly_the_tokens_dream_keeps():
    from safegen.sampling.dream import truncate

    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    assert torch.isfinite(truncate(logits, 2, None)).tolist() == [[True, True, False, False, False]]
    # top_p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the 0.2 token that crosses it is kept too
    assert torch.isfinite(truncate(logits, None, 0.75)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(truncate(logits, None, 0.3)).tolist() == [[True, False, False, False, False]]


def test_alg_temp_draws_positions_in_proportion_to_softmax_of_confidence():
    """With one commit a step, alg_temp commits position j with probability softmax(confidence /
    alg_temp)_j (Dream's multinomial draw); 4,000 keyed draws against it: a z-test per position and TV."""
    from safegen.sampling.sampler import DiffusionSampler, SamplingConfig
    from safegen.models.family import ModelProfile

    confidence_logits = torch.tensor([[3.0, 0, 0], [2.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]])  # max_prob per position
    logits = confidence_logits[None].expand(4000, -1, -1).clone()
    x = torch.full((4000, 4), 3)
    cfg = SamplingConfig(max_new_tokens=4, steps=4, block_length=4, remasking="entropy", alg_temp=0.5)
    sampler = DiffusionSampler(torch.nn.Identity(), ModelProfile(mask_id=3), cfg)
    pred = sampler.predict(logits, x, torch.ones_like(x, dtype=torch.bool), torch.arange(4000) * 7919 + 1, 0.0)
    chosen = pred.confidence.argmax(1)
    p = torch.softmax(confidence_logits[:, :3], -1)
    entropy = (p * torch.log(p + 1e-10)).sum(-1)
    target = torch.softmax(entropy / 0.5, -1)
    freq = torch.bincount(chosen, minlength=4).double() / 4000
    z = (freq - target.double()) / torch.sqrt(target.double() * (1 - target.double()) / 4000)
    assert z.abs().max() < 4, (freq, target)
    assert 0.5 * (freq - target.double()).abs().sum() < 0.03
    assert freq[0] < 0.95  # not the most confident every time: the draw is real


class _Counter:
    """A hook that only watches: the masked count of the block before each commit, per row."""

    def __init__(self):
        self.masked = []

    def applies(self, block, step, steps_in_block, t):
        return True

    def __call__(self, sampler, state):
        self.masked.append((state.gen == sampler.mask_id).sum(1).clone())


def _commits(rows, **sampling):
    from oracles import SMALL_MASK, small_llada
    from safegen.models.family import ModelProfile
    from safegen.sampling.sampler import DiffusionSampler, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=16, steps=8, block_length=16, temperature=1.0, **sampling)
    sampler = DiffusionSampler(small_llada(seed=7), ModelProfile(mask_id=SMALL_MASK), cfg)
    hook = _Counter()
    prompt = torch.randint(0, 190, (rows, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampler.run(prompt, seeds=list(range(rows)), hook=hook)
    masked = torch.stack(hook.masked)  # (S + 1, rows): before each of the 8 steps, and after the last
    return masked[:-1] - masked[1:], masked


def test_dreams_transfer_commits_floor_n_times_one_minus_s_over_t():
    commits, masked = _commits(3, transfer="dream", remasking="entropy")
    S = 8
    for i in range(S):
        t, s = 1 - i * (1 - 1e-3) / S, 1 - (i + 1) * (1 - 1e-3) / S
        expected = masked[i] if i == S - 1 else torch.floor(masked[i].double() * (1 - s / t)).long()
        assert torch.equal(commits[i], expected), (i, commits[i], expected)
    assert (masked[-1] == 0).all()


def test_origin_commits_each_masked_position_with_probability_one_minus_s_over_t():
    """Dream's "origin": at each step every masked position commits independently with probability
    1 - s/t, so the count is Binomial(n, 1 - s/t): its mean over 600 rows against n(1 - s/t) (a
    z-test per step) and its spread (not the fixed count of the other orders)."""
    commits, masked = _commits(600, remasking="origin")
    S = 8
    for i in range(S - 1):
        t, s = 1 - i * (1 - 1e-3) / S, 1 - (i + 1) * (1 - 1e-3) / S
        p = 1 - s / t
        n = masked[i].double()
        z = (commits[i].double() - n * p).sum() / torch.sqrt((n * p * (1 - p)).sum())
        assert abs(z) < 4, (i, float(z))
    assert commits[0].unique().numel() > 3  # random counts
    assert (masked[-1] == 0).all()
