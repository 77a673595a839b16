"""safegen.models.mdlm against MDLM's published architecture: a folder in the hub's layout (config.json with the
hub's fields and auto_map, model.safetensors with `backbone.*` names, remote code that must never run)
loads with load_model, and its logits match a plain re-derivation of the DiT written here, head by head."""
import json
import math
import sys

import pytest
import torch
from safetensors.torch import save_file

from safegen.models.loading import load_model
from safegen.models.mdlm import HEAD_MODULE, MDLMConfig, MDLMModel

# Output widths multiples of 32: bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 rows
# and needs input widths of at least 64.
HIDDEN, HEADS, COND, BLOCKS, VOCAB = 64, 4, 64, 2, 50

REMOTE_BOMB = "raise RuntimeError('the repository code was imported')\n"


def hub_config(**changes):
    """config.json as kuleshov-group/mdlm-owt ships it, at a small size."""
    return {"architectures": ["MDLM"],
            "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                         "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
            "cond_dim": COND, "dropout": 0.1, "hidden_dim": HIDDEN, "model_length": 64, "model_type": "mdlm",
            "n_blocks": BLOCKS, "n_heads": HEADS, "return_dict": False, "time_conditioning": False,
            "torch_dtype": "float32", "transformers_version": "4.38.2", "vocab_size": VOCAB, **changes}


def hub_weights(seed=0):
    """Random tensors under the checkpoint's names and shapes, the modulations included (the reference
    initialises them to zero, which would hide a wrong shift/scale/gate order)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    w = {"backbone.vocab_embed.embedding": r(VOCAB, HIDDEN, std=1.0),
         "backbone.sigma_map.mlp.0.weight": r(COND, 256), "backbone.sigma_map.mlp.0.bias": r(COND),
         "backbone.sigma_map.mlp.2.weight": r(COND, COND), "backbone.sigma_map.mlp.2.bias": r(COND),
         "backbone.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, HIDDEN // HEADS, 2).float() / (HIDDEN // HEADS)),
         "backbone.output_layer.norm_final.weight": 1 + r(HIDDEN),
         "backbone.output_layer.adaLN_modulation.weight": r(2 * HIDDEN, COND),
         "backbone.output_layer.adaLN_modulation.bias": r(2 * HIDDEN),
         "backbone.output_layer.linear.weight": r(VOCAB, HIDDEN), "backbone.output_layer.linear.bias": r(VOCAB)}
    for i in range(BLOCKS):
        p = f"backbone.blocks.{i}."
        w |= {p + "norm1.weight": 1 + r(HIDDEN), p + "attn_qkv.weight": r(3 * HIDDEN, HIDDEN),
              p + "attn_out.weight": r(HIDDEN, HIDDEN), p + "norm2.weight": 1 + r(HIDDEN),
              p + "mlp.0.weight": r(4 * HIDDEN, HIDDEN), p + "mlp.0.bias": r(4 * HIDDEN),
              p + "mlp.2.weight": r(HIDDEN, 4 * HIDDEN), p + "mlp.2.bias": r(HIDDEN),
              p + "adaLN_modulation.weight": r(6 * HIDDEN, COND), p + "adaLN_modulation.bias": r(6 * HIDDEN)}
    return w


def write_hub_folder(folder, config=None, weights=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or hub_config()))
    save_file(weights or hub_weights(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("configuration_mdlm.py", "modeling_mdlm.py"):
        (folder / name).write_text(REMOTE_BOMB)
    return folder


# ----------------------------------------------------------------------------- the reference, re-derived
def reference_logits(w, ids, sigma=None):
    """MDLM's DiT from its equations, one sequence and one head at a time, float64.

    c = silu(W2 silu(W1 [cos(σ f), sin(σ f)] + b1) + b2), f_j = 10000^(-j/128); per block
    (shift, scale, gate) x 2 = W_ada c + b_ada; h = LN(x) w (1 + scale) + shift;
    x += gate_a * W_o attn(h); x += gate_m * (W_2 gelu_tanh(W_1 h' + b_1) + b_2); the output
    h = LN(x) w (1 + scale) + shift, logits = W h + b. Rotary: dimension j and j + d/2 rotate as a
    pair by angle p * 10000^(-2j/d)."""
    w = {k: v.double() for k, v in w.items()}
    d = HIDDEN // HEADS
    out = []
    for row in ids:
        s = 0.0 if sigma is None else float(sigma)
        f = torch.tensor([math.exp(-math.log(10000) * j / 128) for j in range(128)], dtype=torch.float64)
        emb = torch.cat([torch.cos(s * f), torch.sin(s * f)])
        t = torch.nn.functional.silu(w["backbone.sigma_map.mlp.0.weight"] @ emb + w["backbone.sigma_map.mlp.0.bias"])
        c = torch.nn.functional.silu(w["backbone.sigma_map.mlp.2.weight"] @ t + w["backbone.sigma_map.mlp.2.bias"])
        x = w["backbone.vocab_embed.embedding"][row]  # (L, HIDDEN)
        L = len(row)

        def norm(v, weight):
            mu = v.mean(-1, keepdim=True)
            var = ((v - mu) ** 2).mean(-1, keepdim=True)
            return (v - mu) / torch.sqrt(var + 1e-5) * weight

        def rope(v):  # (L, d)
            r = v.clone()
            for j in range(d // 2):
                theta = torch.arange(L, dtype=torch.float64) * 10000 ** (-2 * j / d)
                a, b = v[:, j], v[:, j + d // 2]
                r[:, j] = a * torch.cos(theta) - b * torch.sin(theta)
                r[:, j + d // 2] = b * torch.cos(theta) + a * torch.sin(theta)
            return r

        for i in range(BLOCKS):
            p = f"backbone.blocks.{i}."
            mod = w[p + "adaLN_modulation.weight"] @ c + w[p + "adaLN_modulation.bias"]
            sh_a, sc_a, g_a, sh_m, sc_m, g_m = mod.split(HIDDEN)
            h = norm(x, w[p + "norm1.weight"]) * (1 + sc_a) + sh_a
            qkv = h @ w[p + "attn_qkv.weight"].T  # (L, 3 HIDDEN): q | k | v, each head-major
            heads = []
            for k in range(HEADS):
                q = rope(qkv[:, k * d:(k + 1) * d])
                kk = rope(qkv[:, HIDDEN + k * d:HIDDEN + (k + 1) * d])
                v = qkv[:, 2 * HIDDEN + k * d:2 * HIDDEN + (k + 1) * d]
                heads.append(torch.softmax(q @ kk.T / math.sqrt(d), dim=-1) @ v)
            x = x + g_a * (torch.cat(heads, dim=-1) @ w[p + "attn_out.weight"].T)
            h = norm(x, w[p + "norm2.weight"]) * (1 + sc_m) + sh_m
            u = h @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"]
            u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
            x = x + g_m * (u @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"])
        p = "backbone.output_layer."
        sh, sc = (w[p + "adaLN_modulation.weight"] @ c + w[p + "adaLN_modulation.bias"]).split(HIDDEN)
        h = norm(x, w[p + "norm_final.weight"]) * (1 + sc) + sh
        out.append(h @ w[p + "linear.weight"].T + w[p + "linear.bias"])
    return torch.stack(out).float()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    return write_hub_folder(tmp_path_factory.mktemp("mdlm") / "mdlm-hub-layout")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB - 1, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_hub_layout_loads_natively_and_matches_the_reference_logits(hub_dir, ids, trust_remote_code):
    model, tokenizer, profile = load_model(str(hub_dir), quantization="none", device_map="cpu",
                                           trust_remote_code=trust_remote_code)
    assert type(model) is MDLMModel and not model.training
    assert not any("modeling_mdlm" in n or "configuration_mdlm" in n for n in sys.modules)
    # No tokenizer files and not GPT-2's vocabulary: the model loads for token-id use.
    assert tokenizer is None and profile.mask_id == VOCAB - 1
    ids = ids.clone()
    ids[0, 3:6] = VOCAB - 1  # masks are ordinary input rows of the embedding
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits(hub_weights(), ids), atol=1e-4, rtol=1e-4)


def test_time_conditioning_reads_the_noise_level(hub_dir, ids):
    config = MDLMConfig(**{k: v for k, v in hub_config(time_conditioning=True).items()
                           if k not in ("architectures", "auto_map", "model_type")})
    model = MDLMModel(config).eval()
    missing, unexpected = model.load_state_dict(hub_weights(), strict=False)
    assert not missing and unexpected == ["backbone.rotary_emb.inv_freq"]
    with torch.no_grad():
        logits = model(input_ids=ids, timesteps=torch.full((3,), 0.7)).logits
    torch.testing.assert_close(logits, reference_logits(hub_weights(), ids, sigma=0.7), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="timesteps"):
        model(input_ids=ids)
    # The released model ignores the noise level (its time embedding sees 0).
    unconditioned, _, _ = load_model(str(hub_dir), quantization="none", device_map="cpu")
    with torch.no_grad():
        torch.testing.assert_close(unconditioned(input_ids=ids, timesteps=torch.full((3,), 0.7)).logits,
                                   unconditioned(input_ids=ids).logits)


def test_left_padding_leaves_the_real_tokens_logits_unchanged(hub_dir, ids):
    model, _, _ = load_model(str(hub_dir), quantization="none", device_map="cpu")
    pads = [0, 4, 7]
    batch = torch.zeros(3, 11 + 7, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, pad in enumerate(pads):
        batch[row, 7 - pad:7 - pad + pad] = 0  # padding may be any id: it is never attended to
        batch[row, 7:] = ids[row]
        mask[row, 7:] = 1
        if pad:
            batch[row, 7 - pad:7] = 5
            mask[row, :7] = 0
    mask[0, :7] = 0
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask).logits[:, 7:]
        alone = model(input_ids=ids).logits
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def correlation(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("quantization, layer_type", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_load_keeps_the_head(hub_dir, ids, quantization, layer_type):
    bnb = pytest.importorskip("bitsandbytes")
    model, _, _ = load_model(str(hub_dir), quantization=quantization, device_map="cpu")
    modules = dict(model.named_modules())
    assert type(modules[HEAD_MODULE]) is torch.nn.Linear
    blocks = {n: m for n, m in modules.items() if n.startswith("backbone.blocks.") and
              isinstance(m, torch.nn.Linear)}
    assert len(blocks) == 5 * BLOCKS
    assert all(isinstance(m, getattr(bnb.nn, layer_type)) for m in blocks.values())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert correlation(logits, reference_logits(hub_weights(), ids)) > 0.9
