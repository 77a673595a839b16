"""Bidirectional attention as LLaDA's blocks compute it, shared by the full forward (llada.py) and the
cached one (kvcache.py), so that both pick the same kernel and give the same numbers."""
from __future__ import annotations

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def attend(q, k, v, key_mask, n_rep: int = 1):
    """softmax(q kᵀ / √d) v over the keys `key_mask` allows, keys and values repeated `n_rep` times
    for grouped-query heads. Every position sees every unpadded position (no causal mask)."""
    if n_rep != 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if q.device.type == "cpu":
        # PyTorch's fused CPU kernel groups its float32 sums over keys by the key count, so a row
        # padded to a longer neighbour's length got other bf16 roundings (up to 0.002 on the tiny
        # model) than alone; the math kernel sums a row's keys alike whatever follows them.
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
