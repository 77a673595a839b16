"""safegen.models.llada: LLaDA-8B's config.json as published, the 8B model's parameters, refused settings."""
import pytest
import torch

from safegen.models.llada import LLaDAConfig, LLaDAModelLM

# The fields of LLaDA-8B-Instruct's config.json (values as published; auto_map and model_type are read by
# transformers before the config class sees the rest).
LLADA_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "torch_dtype": "bfloat16", "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}
LLADA_8B_PARAMETERS = 8_015_581_184
BLOCK_SHAPES = {"attn_norm": (4096,), "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                "attn_out": (4096, 4096), "ff_norm": (4096,), "ff_proj": (12288, 4096),
                "up_proj": (12288, 4096), "ff_out": (4096, 12288)}


@pytest.fixture(scope="module")
def llada_8b():
    with torch.device("meta"):
        return LLaDAModelLM(LLaDAConfig.from_dict(dict(LLADA_8B_CONFIG, model_type="llada")))


def test_published_config_is_accepted_and_extra_fields_are_kept():
    config = LLaDAConfig.from_dict(dict(LLADA_8B_CONFIG, model_type="llada", some_future_field=3))
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (4096, 32, 32, 32)
    assert (config.mlp_hidden_size, config.rope_theta, config.mask_token_id) == (12288, 500000.0, 126336)
    saved = config.to_dict()
    assert saved["init_fn"] == "mitchell" and saved["precision"] == "amp_bf16" and saved["some_future_field"] == 3
    # The defaults are LLaDA-8B-Instruct's: a bare LLaDAConfig is the 8B model.
    assert {k: getattr(LLaDAConfig(), k) for k in ("d_model", "n_layers", "mlp_hidden_size", "embedding_size")} \
        == {k: LLADA_8B_CONFIG[k] for k in ("d_model", "n_layers", "mlp_hidden_size", "embedding_size")}


def test_8b_parameter_names_shapes_and_count(llada_8b):
    shapes = {name: tuple(p.shape) for name, p in llada_8b.named_parameters()}
    expected = {f"model.transformer.blocks.{i}.{part}.weight": shape
                for i in range(32) for part, shape in BLOCK_SHAPES.items()}
    expected.update({"model.transformer.wte.weight": (126464, 4096), "model.transformer.ln_f.weight": (4096,),
                     "model.transformer.ff_out.weight": (126464, 4096)})
    assert shapes == expected
    assert sum(p.numel() for p in llada_8b.parameters()) == LLADA_8B_PARAMETERS


@pytest.mark.parametrize("field, value", [
    ("block_type", "sequential"), ("activation_type", "swiglu"), ("activation_type", "gelu"),
    ("include_bias", True), ("include_qkv_bias", True), ("weight_tying", True), ("alibi", True),
    ("rope", False), ("layer_norm_type", "default"), ("attention_layer_norm", True), ("scale_logits", True),
    ("input_emb_norm", True), ("block_group_size", 2), ("rope_full_precision", False)
])
def test_settings_it_cannot_honour_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"field {field}="):
        LLaDAConfig(**{field: value})


def test_inconsistent_dimensions_are_refused():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLaDAConfig(n_heads=32, n_kv_heads=5)
    with pytest.raises(ValueError, match="embedding_size"):
        LLaDAConfig(vocab_size=100, embedding_size=64)
    with pytest.raises(ValueError, match="multi_query_attention"):
        LLaDAConfig(multi_query_attention=True, n_kv_heads=32)
    # LLaDA's defaults for omitted sizes: mlp_ratio * d_model, embedding_size = vocab_size, kv heads = heads.
    config = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=None, mlp_hidden_size=None, mlp_ratio=3,
                         vocab_size=100, embedding_size=None)
    assert (config.mlp_hidden_size, config.embedding_size, config.n_kv_heads) == (192, 100, 4)


def test_grouped_query_attention_shares_keys_across_heads():
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=50,
                         embedding_size=64)
    model = LLaDAModelLM(config).eval()
    block = model.model.transformer.blocks[0]
    assert block.k_proj.weight.shape == (16, 32)
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        grouped = model(ids).logits
        # The same model with the two kv heads written out for each query head: identical logits.
        full = LLaDAModelLM(LLaDAConfig(**{**config.to_dict(), "n_kv_heads": 4})).eval()
        state = model.state_dict()
        for name in ("k_proj", "v_proj"):
            w = state[f"model.transformer.blocks.0.{name}.weight"].view(2, 8, 32)
            state[f"model.transformer.blocks.0.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
        full.load_state_dict(state)
        torch.testing.assert_close(full(ids).logits, grouped)


def test_rotary_embedding_is_relative_and_uses_the_config_theta():
    from safegen.models.llada import rotary_angles, rotate

    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 16, dtype=torch.float64).unbind(0)
    cos, sin = rotary_angles(40, 16, 500000.0, "cpu")

    def score(i, j):  # q at position i against k at position j
        return (rotate(q, cos[i], sin[i]) * rotate(k, cos[j], sin[j])).sum().item()

    # Only the distance between positions matters, which is why left padding does not shift real tokens.
    assert score(3, 10) == pytest.approx(score(23, 30), abs=1e-5)
    assert score(3, 10) != pytest.approx(score(3, 30), abs=1e-3)
    config = dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=48, vocab_size=50, embedding_size=64)
    ids = torch.randint(0, 50, (1, 12))
    torch.manual_seed(1)
    a = LLaDAModelLM(LLaDAConfig(rope_theta=500000.0, **config)).eval()
    b = LLaDAModelLM(LLaDAConfig(rope_theta=10.0, **config)).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() > 1e-3
