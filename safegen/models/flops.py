"""Model FLOPs of LLaDA's forwards, counted from what a forward computes, for cost accounting.

Denoiser rows (safegen.refine.cost) stop measuring cost once forwards differ in length: a cached forward
(safegen.models.kvcache) runs 32 query positions where the uncached one runs 320. So the sampler also counts,
per forward and per sequence,

* query positions: positions run through the blocks;
* attention pairs: (query, key) pairs scored, queries × the row's real keys;
* head positions: positions whose logits the output head computes;

and turns them into FLOPs (a multiply-add is 2 FLOPs) for the model's configuration:

    per query, per layer:  2·d·(H·hd) [q] + 2·2·d·(KV·hd) [k, v] + 2·(H·hd)·d [out] + 3·2·d·mlp [SwiGLU]
    per pair,  per layer:  2·(H·hd) [q·k] + 2·(H·hd) [softmax weights · v]   (= 4·d with H·hd = d)
    per head position:     2·d·embedding_size

Norms, RoPE, softmax and the embedding lookup are left out (O(d) per position, under 1% at LLaDA's
widths). A row's padding is not counted: it is the batch's waste, not the row's cost, and a row's count
must not depend on its neighbours. Models without a LLaDA-shaped config (the exact toys, MDLM) count 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Dims", "dims_of", "forward_flops", "real_positions", "sequence_flops"]


@dataclass(frozen=True)
class Dims:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    head_width: int  # rows of the output head (embedding_size)

    @property
    def per_query(self) -> float:
        d, q = self.d_model, self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        return 2.0 * d * q + 4.0 * d * kv + 2.0 * q * d + 6.0 * d * self.mlp_hidden

    @property
    def per_pair(self) -> float:
        return 4.0 * self.n_heads * self.head_dim


def dims_of(model) -> Optional[Dims]:
    """The shapes of a LLaDA- or Dream-configured model (or a bare config); None for other models.
    (Dream's q/k/v biases add a handful of FLOPs per position, not counted.)"""
    cfg = getattr(model, "config", model)
    if getattr(cfg, "model_type", None) == "llada" and hasattr(cfg, "num_experts"):
        # LLaDA-MoE: the experts a token runs (num_experts_per_tok of them) and its router, as an MLP
        # width: 3 SwiGLU matrices of k experts' width, plus a router of num_experts outputs (2 d E =
        # 3 · 2 d (E / 3)); the experts not chosen cost nothing.
        width = cfg.num_experts_per_tok * cfg.expert_width + cfg.num_experts / 3
        return Dims(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                    cfg.head_dim, width, cfg.vocab_size)
    if getattr(cfg, "model_type", None) == "llada":
        return Dims(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads,
                    cfg.mlp_hidden_size, cfg.embedding_size)
    if getattr(cfg, "model_type", None) == "Dream":
        return Dims(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                    cfg.hidden_size // cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size)
    return None


def forward_flops(dims: Optional[Dims], queries, pairs, heads):
    """FLOPs of forwards with `queries` query positions, `pairs` attention pairs and `heads` head
    positions (numbers or float64 tensors, per row); 0 without dims."""
    if dims is None:
        return queries * 0.0
    return dims.n_layers * (queries * dims.per_query + pairs * dims.per_pair) + heads * 2.0 * dims.d_model * dims.head_width


def real_positions(x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(n,) float64 on the CPU: each row's real positions, its keys (padding is not the row's cost)."""
    if attention_mask is None:
        return torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64)
    return attention_mask.sum(1).double().cpu()


def sequence_flops(dims: Optional[Dims], x: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   queries: Optional[int] = None, heads: Optional[int] = None) -> torch.Tensor:
    """(n,) float64 FLOPs of one forward per row of x (n, L): `queries` query positions (None: every
    real position, the uncached forward) against the row's real keys, the head on `heads` positions
    (None: as many as queries)."""
    keys = real_positions(x, attention_mask)
    q = keys if queries is None else torch.full_like(keys, float(queries))
    h = q if heads is None else torch.full_like(keys, float(heads))
    return forward_flops(dims, q, q * keys, h)
