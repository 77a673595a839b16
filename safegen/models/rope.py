"""LLaDA's rotary position embeddings (RoPE): the angles and the rotation, shared by the full forward
(llada.py) and the cached one (kvcache.py), which rotates only its query positions."""
from __future__ import annotations

import torch


def rotary_angles(length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles for positions 0..length-1, shape (length, head_dim), float32.

    Computed per call rather than cached in a buffer: buffers are created on the meta device when
    from_pretrained places a model with device_map, and this is negligible next to a forward pass.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in float32 (LLaDA's rope_full_precision), pairing dimension i with i + head_dim/2."""
    h = x.float()
    first, second = h.chunk(2, dim=-1)
    return (h * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)
