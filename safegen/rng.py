"""Counter-based random numbers: every draw is a pure function of (key, index).

Why not torch.Generator: a row's output must depend only on its prompt and its own seed, never on
which other rows share the batch, and the per-step path must stay free of Python loops over rows.
A stateful generator per row needs such a loop; a shared generator couples rows. Hashing
(row key, element index) gives each row an independent stream, vectorised over the whole batch,
and makes child streams (proposals, sub-steps) cheap: a child key is a hash of the parent key and a tag.

The hash is the 32-bit "lowbias32" integer mixer (two multiply-xorshift rounds), evaluated in int64
so that products never overflow and every shift is logical.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit mixer on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def derive(keys: torch.Tensor, *tags) -> torch.Tensor:
    """Child keys: one independent stream per (parent key, tag...). Tags are ints or int tensors
    broadcastable against `keys`."""
    k = keys.to(torch.int64) & _M32
    for tag in tags:
        t = torch.as_tensor(tag, dtype=torch.int64, device=k.device) & _M32
        k = _mix32(k ^ _mix32((t + 0x9E3779B9) & _M32))
    return k


def seed_keys(seeds, device=None) -> torch.Tensor:
    """Keys for a list/tensor of non-negative integer seeds (one per row)."""
    s = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    return derive(s & _M32, s >> 32)


def uniform(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """U(0,1) float32, exclusive of both ends. `keys` (n,) and `index` (n, ...) int64 element ids:
    the same (key, index) always gives the same number."""
    k = keys.reshape(keys.shape + (1,) * (index.dim() - 1))
    h = _mix32(_mix32(k ^ (index & _M32)) ^ ((index >> 32) & _M32))
    # 24 bits: exactly representable in float32; +0.5 keeps u strictly inside (0, 1).
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise, float32. Gumbel-max with it samples exactly from softmax(logits),
    up to the 24-bit resolution of the uniforms (Gumbel values up to about 16.6)."""
    return -torch.log(-torch.log(uniform(keys, index)))
