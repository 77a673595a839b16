"""Dream's architecture (Dream-org/Dream-v0-Instruct-7B, -Base), implemented here so that Dream checkpoints
load without running remote code.

Dream is Qwen2.5-7B's transformer trained as a masked diffusion LM: pre-norm blocks with RMSNorm,
rotary position embeddings (θ 1e6), grouped-query attention with biases on the query, key and value
projections (28 query heads, 4 key-value heads at 7B), a SwiGLU MLP, an output head separate from the
embedding, and no causal mask. This module reads the hub's `config.json` (model_type "Dream") and
`model.safetensors` parameter names as they are (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`model.layers.N.mlp.gate_proj`, `model.norm`, `lm_head`: Qwen2's layout).

Dream was initialised from an autoregressive model and keeps its habit: the hidden state at position
i − 1 predicts the token at position i (Dream's generation code shifts the logits by one, the first
position keeping its own). That shift is done here, inside the model: `forward` returns at position i
the logits of the token at i, as LLaDA's do, so the sampler, the caches and IterRef see one convention.

Padding follows LLaDABackbone: a left-padded row's real tokens are moved to the front (positions
0..n−1, as Dream's generation code numbers them with cumsum(attention_mask) − 1), run, shifted among
themselves, and moved back, so a row's logits do not depend on its neighbours' padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .kvcache import CacheView, CachedForwards, packed_states
from .prenorm import PreNormBackbone, PreNormLayer, PreNormLMMixin, attention_output
from .rope import rotate

__all__ = ["DreamConfig", "DreamModel"]


class DreamConfig(PretrainedConfig):
    """Dream's config.json fields; the defaults are Dream-v0-Instruct-7B's values."""

    model_type = "Dream"

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    use_cache: bool = False  # read by nothing: no key/value cache across calls
    # The native class returns aligned logits (no shift left to do); a property, so never saved.
    safegen_aligned_logits = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        refused = {
            "hidden_act": (self.hidden_act != "silu", "Dream's MLP is SwiGLU (silu(gate_proj) * up_proj)"),
            "rope_scaling": (self.rope_scaling is not None, "scaled rotary embeddings are not implemented"),
            "use_sliding_window": (bool(self.use_sliding_window), "every position sees every other in Dream"),
            "tie_word_embeddings": (bool(self.tie_word_embeddings), "Dream's head is separate from its embedding"),
        }
        for field, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"Dream config field {field}={getattr(self, field)!r} is not supported ({why})")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"Dream config field hidden_size ({self.hidden_size}) must split into "
                             f"num_attention_heads ({self.num_attention_heads}) heads of even size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Dream config field num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        d, self.head_dim = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def project(self, h, cos, sin):
        """Queries (n_heads), keys and values (n_kv_heads) of the normed states h (B, L, d), rotated."""
        batch, length, _ = h.shape
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def output(self, att):
        return attention_output(self.o_proj, att)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h):
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DreamLayer(PreNormLayer):
    """Pre-norm attention without a causal mask, then the SwiGLU MLP, each added to the residual stream."""

    def __init__(self, config: DreamConfig):
        super().__init__(config, DreamAttention(config), DreamMLP(config))


class DreamModel(CachedForwards, PreNormLMMixin, PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DreamLayer"]
    supports_gradient_checkpointing = False
    # The head stays in 16 bits when the model is quantized (safegen.models.loading).
    safegen_head_module = "lm_head"

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = PreNormBackbone(config, (DreamLayer(config) for _ in range(config.num_hidden_layers)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs) -> MaskedLMOutput:
        """Logits (B, L, vocab_size) of the token at each position (Dream's one-position shift done
        here). attention_mask (B, L): 1 for real tokens, 0 for padding, which no position attends to."""
        return MaskedLMOutput(logits=self.lm_head(packed_states(lambda ids, real: _shift(self.model(ids, real)),
                                                                 input_ids, attention_mask)))

    # Block-wise key/value cache (safegen.models.kvcache; Fast-dLLM's prefix and dual caches, which
    # Fast-dLLM also ships for Dream): the same functions as LLaDA's, through Dream's cache view.
    # Shifted: its cached forwards run the position before each query too (kvcache.shifted_width).
    def cache_view(self) -> CacheView:
        return CacheView(self, shifted=True)


def _shift(hidden: torch.Tensor) -> torch.Tensor:
    """Position i takes the state of position i − 1; the first keeps its own (Dream's generation code)."""
    return torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)


AutoConfig.register(DreamConfig.model_type, DreamConfig, exist_ok=True)
