"""LLaDA's architecture, implemented here so that LLaDA checkpoints load without running remote code.

LLaDA (GSAI-ML/LLaDA-8B-Instruct, -Base, LLaDA-1.5) is a Llama-style transformer without a causal mask:
pre-norm blocks with RMSNorm, rotary position embeddings computed in float32, a SwiGLU MLP, no biases,
and an output head separate from the embedding. Its hub repository ships its own modeling code, written
for transformers 4; this module reads the same `config.json` (model_type "llada") and the same
`model.safetensors` parameter names, and registers itself with transformers' Auto classes when
imported, so `from_pretrained` picks this class even where the folder's `auto_map` names remote files.

Configuration fields that would change the computation in ways this implementation does not follow
(another block type, biases, ALiBi, weight tying, ...) are refused with the field named; fields that
only matter for training (dropout, initialisation scheme, precision) are kept and ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig,
                          PreTrainedModel)
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput

from .attention import attend
from .kvcache import CachedForwards, packed_states
from .rope import rotary_angles, rotate

__all__ = ["LLaDAConfig", "LLaDAModelLM"]

# Fields whose value is fixed by this implementation: LLaDA's published value -> why nothing else works.
REQUIRED = {
    "block_type": ("llama", "only LLaDA's Llama-style block (separate q/k/v projections, SwiGLU MLP) is implemented"),
    "activation_type": ("silu", "LLaDA's SwiGLU MLP is written activation_type 'silu' (silu(ff_proj) * up_proj)"),
    "layer_norm_type": ("rms", "only RMSNorm is implemented"),
    "layer_norm_with_affine": (True, "the norms' weights are part of every LLaDA checkpoint"),
    "bias_for_layer_norm": (False, "LLaDA's norms have no bias"),
    "include_bias": (False, "LLaDA's linear layers have no bias"),
    "include_qkv_bias": (False, "LLaDA's q/k/v projections have no bias"),
    "weight_tying": (False, "LLaDA's output head is separate from its embedding"),
    "tie_word_embeddings": (False, "LLaDA's output head is separate from its embedding"),
    "rope": (True, "positions enter only through rotary embeddings"),
    "rope_full_precision": (True, "rotary embeddings are applied in float32"),
    "alibi": (False, "ALiBi is not implemented (LLaDA uses rotary embeddings)"),
    "attention_layer_norm": (False, "query/key norms are not implemented"),
    "input_emb_norm": (False, "scaling the embeddings by sqrt(d_model) is not implemented"),
    "scale_logits": (False, "scaling the logits by 1/sqrt(d_model) is not implemented"),
    "block_group_size": (1, "block groups change the parameter names (block_groups.*), not implemented"),
}


class LLaDAConfig(PretrainedConfig):
    """LLaDA's config.json fields; the defaults are LLaDA-8B-Instruct's values."""

    model_type = "llada"

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (1 with multi_query_attention)
    multi_query_attention: bool | None = None
    mlp_hidden_size: int | None = 12288  # None: mlp_ratio * d_model
    mlp_ratio: int = 4
    vocab_size: int = 126464
    # Rows of the embedding and the output head (None: vocab_size); may exceed vocab_size, so logits can
    # be wider than the vocabulary and a sampler must never pick an id >= vocab_size.
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    mask_token_id: int | None = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    block_type: str = "llama"
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = False
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    weight_tying: bool = False
    tie_word_embeddings: bool = False
    rope: bool = True
    rope_full_precision: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    block_group_size: int = 1
    # Read by nothing: a masked diffusion LM has no key/value cache. Kept (any value) because
    # configs saved by LLaDA's own code may carry it.
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.n_kv_heads is None:
            self.n_kv_heads = 1 if self.multi_query_attention else self.n_heads
        super().__post_init__(**kwargs)
        for field, (value, why) in REQUIRED.items():
            # None counts as False where LLaDA's code reads the field as a flag.
            if (getattr(self, field) or False) != value:
                raise ValueError(f"LLaDA config field {field}={getattr(self, field)!r} is not supported "
                                 f"(must be {value!r}: {why})")
        if self.multi_query_attention is not None and self.n_kv_heads != (1 if self.multi_query_attention
                                                                          else self.n_heads):
            raise ValueError(f"LLaDA config fields multi_query_attention={self.multi_query_attention} and "
                             f"n_kv_heads={self.n_kv_heads} contradict each other")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"LLaDA config field d_model ({self.d_model}) must split into n_heads "
                             f"({self.n_heads}) heads of even size (RoPE rotates pairs of dimensions)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LLaDA config field n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"LLaDA config field embedding_size ({self.embedding_size}) is smaller than "
                             f"vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 (the mean of squares loses precision in half precision), scaled in the
        # input's dtype, in that order, as LLaDA's code does: bf16 results then match it bit for bit.
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight * h


class LLaDABlock(nn.Module):
    """Pre-norm attention without a causal mask, then a SwiGLU MLP, each added to the residual stream."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, head_dim = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, head_dim
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=False)
        self.attn_out = nn.Linear(config.n_heads * head_dim, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)  # the gate, through SiLU
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def project(self, x, cos, sin):
        """Queries (n_heads), keys and values (n_kv_heads) of x (B, L, d), (B, heads, L, head_dim),
        queries and keys rotated by the angles cos/sin."""
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, x, att):
        """The block's output from its input x and its attention `att` (B, n_heads, L, head_dim):
        the attention residual, then the SwiGLU MLP's."""
        batch, length, _ = x.shape
        x = x + self.attn_out(att.transpose(1, 2).reshape(batch, length, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def forward(self, x, cos, sin, key_mask):
        q, k, v = self.project(x, cos, sin)
        return self.finish(x, attend(q, k, v, key_mask, self.n_heads // self.n_kv_heads))


class LLaDABackbone(nn.Module):
    """The `model` attribute of LLaDAModelLM: holds `.transformer`, whose keys give the checkpoint's names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        # ff_out last: transformers' default quantization skip list keeps the module of the last
        # parameter unquantized, which then is the head.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
        ))
        self.config = config

    def forward(self, input_ids, attention_mask=None):
        # Each row's real tokens are moved to the front (stable: their order kept), run, and moved
        # back (kvcache.packed_states). A row's tokens then sit at positions 0..n-1 whatever its
        # neighbours' lengths, as transformers' position_ids = cumsum(attention_mask) - 1 gives for
        # left-padded batches, and its keys start at index 0 as when it runs alone. In exact
        # arithmetic neither matters (RoPE sees position differences, padded keys are masked), but in
        # bf16 q and k are rounded after the rotation by the absolute angle, and the attention
        # kernel's float32 sums group keys by their index: left padding changed a prompt's greedy
        # output (11 of 32 tokens on the tiny model in bf16). Unpadded rows keep 0..L-1, LLaDA's own
        # absolute positions. Moved back before the head: d_model wide, not the vocabulary.
        return self.head(packed_states(self.hidden, input_ids, attention_mask))

    # The cache view (safegen.models.kvcache): the embedding, the blocks, the head; not shifted.
    shifted = False

    def embed(self, input_ids):
        return self.transformer.wte(input_ids)

    @property
    def cache_blocks(self):
        return self.transformer.blocks

    def head(self, x):
        return self.transformer.ff_out(self.transformer.ln_f(x))

    def hidden(self, input_ids, real):
        """The last block's output with positions 0..L-1; `real` (B, L) bool marks the keys attended
        to (None: all)."""
        x = self.transformer.wte(input_ids)
        cos, sin = rotary_angles(input_ids.shape[1], self.config.head_dim, self.config.rope_theta,
                                 input_ids.device)
        key_mask = None
        if real is not None:
            # A row without any real token would softmax over nothing (NaN); let it see everything.
            key_mask = (real | ~real.any(-1, keepdim=True))[:, None, None, :]
        for block in self.transformer.blocks:
            x = block(x, cos, sin, key_mask)
        return x


class LLaDAModelLM(CachedForwards, PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["LLaDABlock"]
    supports_gradient_checkpointing = False

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDABackbone(config)
        self.post_init()

    def _init_weights(self, module):
        # Only for random models (tests, benchmarks): transformers.initialization skips tensors loaded
        # from a checkpoint.
        if module is self.model.transformer.ff_out:
            # The head reads an RMS-normalised state: std d_model**-0.5 gives logits of order 1, so a
            # random model already has peaked and flat positions for a sampler to tell apart.
            init.normal_(module.weight, mean=0.0, std=self.config.d_model ** -0.5)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.transformer.ff_out

    def forward(self, input_ids, attention_mask=None, **kwargs) -> MaskedLMOutput:
        """Logits (B, L, embedding_size); position i predicts token i (no shift).

        attention_mask (B, L): 1 for real tokens, 0 for padding, which no position attends to.
        """
        return MaskedLMOutput(logits=self.model(input_ids, attention_mask))

    # Block-wise key/value cache (safegen.models.kvcache; Fast-dLLM's prefix and dual caches): the
    # backbone is its own cache view.
    def cache_view(self):
        return self.model

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "a masked diffusion LM has no left-to-right generate(); use safegen's sampler instead")


AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
# LLaDA's hub config maps AutoModel and AutoModelForCausalLM to its model; code written for it keeps working.
for _auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
    _auto.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
