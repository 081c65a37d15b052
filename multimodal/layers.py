"""Small building blocks shared by the encoders, fusion and heads.

Shape legend: B batch, S slabs, N tokens, D width, H heads, F fused tokens, K findings.
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from data.errors import MedreportError


class BackboneWeightsError(MedreportError):
    """A backbone weights file named in a config is missing or not a safetensors file."""


def sinusoid(x: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Fixed sinusoidal features of a real-valued position (any shape) -> (*x.shape, dim).

    Periods are spaced geometrically between ``min_period`` and ``max_period`` (same units as x).
    Hand-written (a few lines) because positions here are in millimetres, not integer steps.
    """
    half = dim // 2
    periods = torch.exp(
        torch.linspace(math.log(min_period), math.log(max_period), half, device=x.device, dtype=torch.float32)
    )
    angles = x.float().unsqueeze(-1) * (2 * math.pi / periods)  # (..., half)
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        out = F.pad(out, (0, 1))
    return out.to(x.dtype if x.is_floating_point() else torch.float32)


def create_resnet_backbone(
    name: str,
    in_chans: int,
    channels: tuple[int, ...] | None,
    stem_width: int,
    output_stride: int,
    weights_file: str | None,
) -> nn.Module:
    """A timm ResNet trunk without pooling or classifier (``forward_features`` -> [N, C, h, w]).

    ``channels`` narrows the network while keeping its depth and bottleneck layout: timm's
    ``ResNet`` takes the per-stage bottleneck widths as ``channels`` (default (64, 128, 256, 512)
    for ResNet-50) and the stem width as ``stem_width``; ``timm.create_model("resnet50", ...)``
    forwards both to the constructor, so a narrowed model is still timm's resnet50 (3-4-6-3).
    ``weights_file`` (a local .safetensors file) goes through timm's own loader via
    ``pretrained_cfg_overlay=dict(file=...)``; nothing is ever downloaded.
    """
    kwargs: dict = dict(num_classes=0, global_pool="", in_chans=in_chans, output_stride=output_stride)
    if channels is not None:
        kwargs.update(channels=tuple(channels), stem_width=stem_width)
    if weights_file:
        path = Path(weights_file)
        if not path.is_file():
            raise BackboneWeightsError(
                f"backbone weights file {path} not found: fix the path in the config, or set weights_file to null"
            )
        if path.suffix != ".safetensors":
            raise BackboneWeightsError(
                f"backbone weights {path.name} must be a .safetensors file (pickled .pth files are refused); "
                "convert it with safetensors.torch.save_file(torch.load(f, weights_only=True), 'x.safetensors')"
            )
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
        )
    return timm.create_model(name, pretrained=False, **kwargs)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP: queries attend to a key/value set (with padding mask)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 query_residual: bool = True):
        super().__init__()
        # Pooling blocks (learned queries shared by all studies) drop the query residual: otherwise
        # the study-independent query dominates the output and the pooled content is diluted.
        self.query_residual = query_residual
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, q_BQD: torch.Tensor, kv_BND: torch.Tensor, kv_mask_BN: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """kv_mask True = valid. Every row must have at least one valid key (callers add a null token)."""
        kv = self.norm_kv(kv_BND)
        out, weights = self.attn(
            self.norm_q(q_BQD), kv, kv, key_padding_mask=~kv_mask_BN, need_weights=need_weights
        )
        x = q_BQD + out if self.query_residual else out
        x = x + self.mlp(self.norm_mlp(x))
        return x, weights
