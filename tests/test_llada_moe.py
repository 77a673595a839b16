"""safegen.models.llada_moe: LLaDA-MoE-7B-A1B's architecture, native (no remote code).

The reference is transformers' own Qwen3-MoE, the same computation once made bidirectional (per-head
q/k RMSNorm before RoPE, a softmax router over the experts choosing the top k without renormalising,
SwiGLU experts, no shared expert): on the same random weights, its logits must equal ours.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from safegen.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM
from safegen.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]

# LLaDA-MoE-7B-A1B-Instruct's config.json fields that define the computation (as published: 16 layers of
# 2048, 16 heads of 128, 64 experts of 1024 with 8 a token, q/k norms, θ 50,000, vocabulary 157,184).
MOE_7B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
              expert_intermediate_size=1024, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, qk_layernorm=True,
              rope_theta=50000.0, rms_norm_eps=1e-5, vocab_size=157184, max_position_embeddings=8192,
              mask_token_id=156895, eos_token_id=156892, pad_token_id=156892, tie_word_embeddings=False,
              architectures=["LLaDAMoEModelLM"])
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
             num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, vocab_size=100, rope_theta=50000.0,
             rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)


def test_the_7b_config_counts_total_and_active_parameters():
    from safegen.models.memory import estimate

    config = LLaDAMoEConfig.from_dict(dict(MOE_7B, model_type="llada"))
    est = estimate(config)
    d, w, E, k = 2048, 1024, 64, 8
    shared = 4 * d * d + 2 * 128 + 2 * d + E * d  # attention, q/k norms, the two norms, the router
    embed = 2 * 157184 * d + d  # embedding, head, final norm
    assert est.parameters == 16 * (shared + E * 3 * d * w) + embed == 7_356_880_896
    assert est.active_parameters == 16 * (shared + k * 3 * d * w) + embed == 1_719_736_320
    # FLOPs count the experts a token runs, not all 64 (safegen.models.flops).
    from safegen.models import flops

    dims = flops.dims_of(config)
    assert dims.mlp_hidden == k * w + E / 3


@pytest.mark.parametrize("field, value", [("moe_layer_freq", [1, 0]), ("clip_qkv", 8.0), ("attention_bias", True),
                                          ("shared_expert_intermediate_size", 512), ("partial_rotary_factor", 0.5)])
def test_settings_it_cannot_honour_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        LLaDAMoEConfig(**{**SMALL, field: value})


@pytest.fixture(scope="module")
def pair():
    """Ours and the Qwen3-MoE reference on the same random weights (norms perturbed off 1)."""
    torch.manual_seed(0)
    ref = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, moe_intermediate_size=32, intermediate_size=96,
                                             decoder_sparse_step=1, mlp_only_layers=[])).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    ours = LLaDAMoEModelLM(LLaDAMoEConfig(**SMALL, expert_intermediate_size=32, mask_token_id=99, pad_token_id=98,
                                          eos_token_id=98)).eval()
    weights = {}
    for key, value in ref.state_dict().items():  # transformers fuses the experts; the checkpoint does not
        if key.endswith("mlp.experts.gate_up_proj"):
            width = value.shape[1] // 2
            for e in range(value.shape[0]):
                weights[f"{key[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = value[e, :width]
                weights[f"{key[:-len('gate_up_proj')]}{e}.up_proj.weight"] = value[e, width:]
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(value.shape[0]):
                weights[f"{key[:-len('down_proj')]}{e}.down_proj.weight"] = value[e]
        else:
            weights[key] = value
    ours.load_state_dict(weights, strict=True)
    return ours, ref


def test_logits_equal_the_reference_with_and_without_left_padding(pair):
    ours, ref = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0
    attn[2, :5] = 0
    length = ids.shape[1]
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=attn.bool()[:, None, None, :].expand(-1, 1, length, -1),
                     position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        mine = ours(ids, attention_mask=attn).logits
    real = attn.bool()
    torch.testing.assert_close(mine[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_a_rows_routing_and_logits_do_not_depend_on_its_batch(pair):
    ours, _ = pair
    torch.manual_seed(2)
    rows = torch.randint(0, 97, (5, 9))
    with torch.no_grad():
        together = ours(rows).logits
        for i in range(5):
            alone = ours(rows[i:i + 1]).logits[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
            assert torch.equal(together[i].argmax(-1), alone.argmax(-1))


def test_routing_picks_the_top_experts_without_renormalising(pair):
    """One layer's MoE against its definition written out: softmax over the experts, the k largest,
    their probabilities as weights (summing to less than 1)."""
    ours, _ = pair
    moe = ours.model.layers[0].mlp
    torch.manual_seed(3)
    x = torch.randn(6, 64)
    with torch.no_grad():
        probs = torch.softmax(moe.gate(x), -1)
        weights, chosen = probs.topk(2, -1)
        expected = torch.stack([sum(w * moe.experts[int(e)](x[t]) for w, e in zip(weights[t], chosen[t]))
                                for t in range(6)])
        torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)
    assert (weights.sum(-1) < 1).all()


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from safegen.models.tiny import write_tiny_llada_moe

    return write_tiny_llada_moe(tmp_path_factory.mktemp("tiny-moe"), seed=0)


@pytest.mark.parametrize("quantization, tolerance", [("8bit", 0.15), ("4bit", 0.6)])
def test_the_hub_layout_loads_natively_with_every_expert_quantized(tiny_moe, quantization, tolerance):
    import bitsandbytes as bnb

    full, _, profile = load_model(str(tiny_moe), quantization="none")
    assert isinstance(full, LLaDAMoEModelLM) and json.loads((tiny_moe / "config.json").read_text())["model_type"] == "llada"
    quant, _, _ = load_model(str(tiny_moe), quantization=quantization)
    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    quantized = {n for n, m in quant.named_modules() if isinstance(m, kinds)}
    layers, experts = full.config.num_hidden_layers, full.config.num_experts
    assert len(quantized) == layers * (4 + 3 * experts)  # q, k, v, o and every expert's three
    assert not any(n.endswith("mlp.gate") or n == "lm_head" for n in quantized)  # routers and head kept
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        a, b = full(ids).logits, quant(ids).logits.float()
    assert (a - b).abs().max() < tolerance
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.98


def test_cached_forwards_from_the_same_tokens_equal_the_full_forward(tiny_moe):
    model, _, _ = load_model(str(tiny_moe), quantization="none")
    torch.manual_seed(4)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        logits, cache = model.prefill(ids, None, logits_from=6)
        torch.testing.assert_close(logits, full[:, 6:], rtol=1e-5, atol=1e-5)
        positions = torch.arange(8, 12).expand(2, -1)
        torch.testing.assert_close(model.forward_queries(ids.gather(1, positions), positions, cache),
                                   full[:, 8:12], rtol=1e-5, atol=1e-5)


def test_detoxify_and_memory_on_a_tiny_llada_moe(tiny_moe, tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("Go away, you\nthe weather today\n")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "safegen", "detoxify", str(src), "-o", str(out), "--model",
                          str(tiny_moe), "--quantization", "none", "--policy", "offline", "--max-new-tokens", "8",
                          "--temperature", "1.0", "--samples", "2", "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all(r["flops"] > 0 and r["sampler"] == "llada+dual" for r in records)
    memory = subprocess.run([sys.executable, "-m", "safegen", "memory", "--model", str(tiny_moe)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert memory.returncode == 0 and "active parameters" in memory.stdout, memory.stderr


def test_serve_answers_from_a_tiny_llada_moe_as_offline(tiny_moe, tmp_path):
    """`safegen serve` on a LLaDA-MoE folder (the dual cache by default), called by the OpenAI client:
    the answer generate_text gives."""
    from oracles import served_and_offline

    messages = [{"role": "user", "content": "tell me about the weather"}]
    out, alone = served_and_offline(tiny_moe, tmp_path / "serve.log", messages)
    assert out.choices[0].message.content == alone.text
    assert out.choices[0].model_extra["safegen"]["sampler"] == "llada+dual"


def test_the_routers_stay_in_float32_when_the_model_loads_in_bfloat16(tiny_moe):
    """The checkpoint stores the routers in float32; a bf16 load keeps them so (a rounded router can
    send a token to other experts)."""
    model, _, _ = load_model(str(tiny_moe), quantization="none", dtype="bfloat16")
    assert all(layer.mlp.gate.weight.dtype == torch.float32 for layer in model.model.layers)
    assert model.model.layers[0].mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.randint(0, 200, (2, 8))).logits.dtype == torch.bfloat16
