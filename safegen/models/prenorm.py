"""The pre-norm transformer layout that Dream and LLaDA-MoE share, under Qwen's module names (which
their checkpoints use): per layer an RMS-normed attention and an RMS-normed MLP, each added to the
residual stream; a final norm; an untied head. A family brings its own attention (with `project`
and `output`) and MLP; this module gives the layer the block interface of the key/value cache
(safegen.models.kvcache: n_heads, n_kv_heads, head_dim, project, finish), the backbone's forward, and
the language model's weight initialisation and embedding accessors."""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .attention import attend
from .llada import RMSNorm
from .rope import rotary_angles


def attention_output(o_proj: nn.Linear, att: torch.Tensor) -> torch.Tensor:
    """The heads' outputs (B, heads, L, head_dim) merged and projected back to the model width."""
    batch, _, length, _ = att.shape
    return o_proj(att.transpose(1, 2).reshape(batch, length, -1))


class PreNormLayer(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(x)), without a causal mask."""

    def __init__(self, config, attention: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    @property
    def n_heads(self):
        return self.self_attn.n_heads

    @property
    def n_kv_heads(self):
        return self.self_attn.n_kv_heads

    @property
    def head_dim(self):
        return self.self_attn.head_dim

    def project(self, x, cos, sin):
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def finish(self, x, att):
        x = x + self.self_attn.output(att)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, key_mask):
        q, k, v = self.project(x, cos, sin)
        return self.finish(x, attend(q, k, v, key_mask, self.n_heads // self.n_kv_heads))


class PreNormBackbone(nn.Module):
    """The `model` attribute of the language model: embeddings, the layers, the final norm."""

    def __init__(self, config, layers):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, real=None):
        """The final norm's output (B, L, d) with positions 0..L-1; `real` (B, L) bool marks the keys
        attended to (None: all)."""
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_angles(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, input_ids.device)
        key_mask = None
        if real is not None:  # a row without any real token would softmax over nothing: it sees everything
            key_mask = (real | ~real.any(-1, keepdim=True))[:, None, None, :]
        for layer in self.layers:
            x = layer(x, cos, sin, key_mask)
        return self.norm(x)


class PreNormLMMixin:
    """For a PreTrainedModel with `model` (a PreNormBackbone) and `lm_head`: random initialisation
    (tests only: transformers skips tensors loaded from a checkpoint) and the embedding accessors."""

    def _init_weights(self, module):
        if module is self.lm_head:
            init.normal_(module.weight, mean=0.0, std=self.config.hidden_size ** -0.5)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head
