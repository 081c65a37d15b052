"""Rotary position embedding (RoPE).

Base 500,000 (as Llama 3 uses for 128K contexts) keeps the slowest rotation's wavelength
(2*pi*base^((d-2)/d) ~ 2.3M positions at d=64) far above 100K tokens, so positions across a
whole 100K-token record stay distinguishable; the local branch only ever compares nearby
positions, where any base works.

``fraction`` < 1 rotates only the fastest ``fraction`` of the frequency pairs and leaves the
slowest ones unrotated (partial RoPE, as GPT-NeoX's ``rotary_pct``; "p-RoPE", Barbero et al.
2024).  A slow pair turns by less than a radian over a training length of 8K tokens, so the model
uses it as a content channel, and at 100K it turns by several radians: content matches across
distances never seen in training break.  Unrotated pairs match content at any distance; the
rotated fast pairs turn through every phase within the training length and carry position.
Legend: B batch, H heads, T tokens, d head dim.
"""
from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype,
                fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim // 2,), computed on the fly (no max-length
    cache); the slowest (1 - fraction) of the pairs get frequency 0 (cos 1, sin 0: unrotated)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    inv_freq[rotated_pairs(head_dim, fraction):] = 0.0
    ang = positions.to(torch.float64)[..., None] * inv_freq  # [..., d/2]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. cos/sin: [T, d/2] or [B, T, d/2] (per-sequence positions during decode).
    Returns x's dtype: under autocast the projections are bf16 and the angles fp32, so the rotation
    is computed in the wider dtype and rounded back, and q and k stay in v's dtype."""
    if cos.dtype != x_BHTd.dtype:
        wide = torch.promote_types(x_BHTd.dtype, cos.dtype)
        return apply_rope(x_BHTd.to(wide), cos.to(wide), sin.to(wide)).to(x_BHTd.dtype)
    if cos.dim() == 3:  # [B, T, d/2] -> [B, 1, T, d/2]
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    if torch.is_grad_enabled() and (x_BHTd.requires_grad or cos.requires_grad):
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    # inference (the 100K-token prefill): the same arithmetic written into one output, no cat copy
    out = torch.empty_like(x_BHTd)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).sub_(x2 * sin)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2).add_(x1 * sin)  # x2 cos + x1 sin
    return out


def rotated_pairs(head_dim: int, fraction: float) -> int:
    """How many of the head_dim // 2 frequency pairs rotate (the fastest ones) at ``fraction``."""
    return round(fraction * (head_dim // 2))
