"""LLaDA-MoE's architecture (inclusionAI/LLaDA-MoE-7B-A1B-Instruct, -Base), implemented here so that its
checkpoints load without running remote code.

LLaDA-MoE is a masked diffusion LM with a sparse mixture of experts in every layer: pre-norm RMSNorm
blocks; attention with separate q, k, v and output projections (16 query and 16 key-value heads of
128 at 7B, no biases), the queries and keys normalised per head (RMSNorm over head_dim, `q_norm` and
`k_norm`) before full rotary embeddings (θ 50,000); every MLP a router (`mlp.gate`, a linear map to
the experts' scores, softmax in float32) choosing 8 of 64 SwiGLU experts per token (`mlp.experts.{e}`),
whose outputs are summed with their router probabilities, not renormalised (norm_topk_prob false);
no shared expert; a separate output head; no causal mask, and position i predicts token i (no shift).
Its `config.json` says model_type "llada", like the dense model, with architectures
["LLaDAMoEModelLM"]: safegen.models.loading picks this class by that architecture.

Each expert is its own nn.Linear triple, as the checkpoint stores them, so bitsandbytes quantizes
every expert in 4-bit or 8-bit; the routers and the head stay in 16 bits. A token's route depends on
its own state only, so a row's routing does not depend on its batch.

The facts above come from LLaDA-MoE's published config.json and modeling code as described in the
model card and public ports of its modeling code (a vLLM port "adapted from modeling_lladamoe.py");
the config field names read here are its (`num_experts`, `num_experts_per_tok`,
`expert_intermediate_size`, `qk_layernorm`, `norm_topk_prob`, `moe_layer_freq`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .kvcache import CacheView, CachedForwards, packed_states
from .llada import RMSNorm
from .prenorm import PreNormBackbone, PreNormLayer, PreNormLMMixin, attention_output
from .rope import rotate

__all__ = ["LLaDAMoEConfig", "LLaDAMoEModelLM"]


class LLaDAMoEConfig(PretrainedConfig):
    """LLaDA-MoE's config.json fields; the defaults are LLaDA-MoE-7B-A1B-Instruct's values."""

    model_type = "llada"  # as its config.json says; not registered with AutoConfig (the dense LLaDA is)

    vocab_size: int = 157184
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    head_dim: int | None = None
    expert_intermediate_size: int | None = 1024  # each expert's width
    dense_intermediate_size: int | None = None  # a dense layer's (moe_layer_freq 0): none in LLaDA-MoE
    moe_layer_freq: list | None = None  # 1 per MoE layer (every layer of LLaDA-MoE); None: all
    clip_qkv: float | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    routed_scaling_factor: float | None = 1.0
    qk_layernorm: bool = True
    attention_bias: bool = False
    partial_rotary_factor: float = 1.0
    shared_expert_intermediate_size: int | None = None
    moe_router_enable_expert_bias: bool | None = False
    router_num_group: int | None = None
    hidden_act: str = "silu"
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    mask_token_id: int | None = 156895
    eos_token_id: int | None = 156892
    pad_token_id: int | None = 156892
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        refused = {
            "attention_bias": (bool(self.attention_bias), "LLaDA-MoE's projections have no bias"),
            "partial_rotary_factor": (self.partial_rotary_factor != 1, "rotary embeddings cover the whole head"),
            "shared_expert_intermediate_size": (self.shared_expert_intermediate_size is not None,
                                                "a shared expert is not implemented (LLaDA-MoE has none)"),
            "moe_router_enable_expert_bias": (bool(self.moe_router_enable_expert_bias), "router biases are not implemented"),
            "router_num_group": (self.router_num_group is not None, "group-limited routing is not implemented"),
            "hidden_act": (self.hidden_act != "silu", "the experts are SwiGLU"),
            "rope_scaling": (self.rope_scaling is not None, "scaled rotary embeddings are not implemented"),
            "tie_word_embeddings": (bool(self.tie_word_embeddings), "the head is separate from the embedding"),
            "moe_layer_freq": (self.moe_layer_freq is not None and 0 in list(self.moe_layer_freq),
                               "dense layers between the MoE ones are not implemented (LLaDA-MoE has none)"),
            "clip_qkv": (self.clip_qkv is not None, "clipping q, k and v is not implemented"),
        }
        for field, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"LLaDA-MoE config field {field}={getattr(self, field)!r} is not supported ({why})")
        if self.head_dim % 2 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LLaDA-MoE config: head_dim ({self.head_dim}) must be even and num_attention_heads "
                             f"({self.num_attention_heads}) a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"LLaDA-MoE config field num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"1..num_experts ({self.num_experts})")

    @property
    def expert_width(self) -> int:
        # expert_intermediate_size, as LLaDA-MoE's config names it; Qwen-style configs say moe_intermediate_size.
        return self.expert_intermediate_size or getattr(self, "moe_intermediate_size", None) or self.intermediate_size


class Expert(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """The router picks num_experts_per_tok experts per token by their softmax probability; the
    token's output is the sum of their outputs weighted by those probabilities."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.top_k, self.normalise = config.num_experts_per_tok, config.norm_topk_prob
        self.scale = config.routed_scaling_factor or 1.0
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.hidden_size, config.expert_width) for _ in range(config.num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # The router in float32, as the checkpoint stores it (kept so on load: _keep_in_fp32_modules_strict).
        probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = (weights * self.scale).to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # only the experts some token chose: the active parameters
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        return out.reshape(shape)

    @property
    def active_experts(self) -> int:
        return self.top_k


class MoEAttention(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        d, self.head_dim = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_layernorm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_layernorm else None

    def project(self, h, cos, sin):
        batch, length, _ = h.shape
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # per head, before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin), v

    def output(self, att):
        return attention_output(self.o_proj, att)


class MoELayer(PreNormLayer):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config, MoEAttention(config), SparseMoE(config))


class LLaDAMoEModelLM(CachedForwards, PreNormLMMixin, PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MoELayer"]
    _keep_in_fp32_modules_strict = ["mlp.gate"]  # in bf16 too
    supports_gradient_checkpointing = False
    # Kept in 16 bits when quantized (safegen.models.loading): the head, and every layer's router.
    safegen_head_module = "lm_head"
    safegen_keep_modules = ("lm_head", "mlp.gate")

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = PreNormBackbone(config, (MoELayer(config) for _ in range(config.num_hidden_layers)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs) -> MaskedLMOutput:
        """Logits (B, L, vocab_size); position i predicts token i. attention_mask (B, L): 1 for real
        tokens, 0 for padding; a padded row's real tokens run at positions 0..n-1 (as LLaDA's)."""
        return MaskedLMOutput(logits=self.lm_head(packed_states(self.model, input_ids, attention_mask)))

    # The key/value caches (safegen.models.kvcache), through the same seam as LLaDA's and Dream's.
    def cache_view(self) -> CacheView:
        return CacheView(self, shifted=False)
