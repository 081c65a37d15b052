"""2.5D image encoder: a timm ResNet-50 applied to every slab, feature maps -> tokens.

A CT study arrives as slabs of adjacent slices rendered in three HU windows (lung, mediastinum,
bone) as the three input channels; a 2D radiograph is a study of one slab. All valid slabs of
the batch go through the backbone as ONE ``[n_valid, 3, H, W]`` pass (channels_last), padded
slabs are never computed. Each slab's last-stage feature map is max-pooled to a fixed
``grid x grid`` (max, not mean: a small lesion should not be averaged away with its cell) and
every cell becomes a token, carrying

* the slab's z position (mm, relative to the study's centre, sinusoidal -> linear), and
* its in-plane cell position (learned table, grid x grid).

Shape legend: B batch, S slabs, C backbone channels, h/w feature map, G grid side, N tokens, D width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from multimodal.layers import create_resnet_backbone, sinusoid


@dataclass
class ImageEncoderConfig:
    backbone: str = "resnet50"
    channels: tuple[int, ...] | None = None  # per-stage bottleneck widths; None = standard (64,128,256,512)
    stem_width: int = 64
    output_stride: int = 32  # 16 or 8 dilate the last stages (finer evidence maps, more compute)
    weights_file: str | None = None  # local .safetensors for the backbone (timm pretrained_cfg_overlay)
    grid: int = 4  # feature map pooled to grid x grid tokens per slab
    dim: int = 256  # token width D
    in_chans: int = 3  # 3 mean-slab windows + one channel per ``mip_windows`` entry
    # Extra input channels: the slab's maximum-intensity projection in these CT windows
    # (data.preprocess.make_slabs), e.g. ("lung",) for small nodules. () = none.
    mip_windows: tuple[str, ...] = ()
    channels_last: bool = True
    # Input geometry this encoder is built for (the preprocessing reads these; the encoder itself
    # accepts any H, W and slab count).
    image_size: int = 128
    max_slabs: int = 16
    z_min_period_mm: float = 4.0
    z_max_period_mm: float = 2000.0

    def __post_init__(self) -> None:
        self.mip_windows = tuple(self.mip_windows)
        if self.in_chans != 3 + len(self.mip_windows):
            raise ValueError(
                f"image encoder in_chans={self.in_chans} does not match its input: 3 window channels + "
                f"{len(self.mip_windows)} MIP channel(s) {list(self.mip_windows)}; set in_chans to "
                f"{3 + len(self.mip_windows)}")

    def stage_reduction(self, stage: int) -> int:
        """Downsampling of backbone stage ``stage`` (timm feature index: 0 stem, 1-4 layer1-4),
        as timm's ``feature_info`` reports it: 2^(stage+1), capped by the output stride (dilation)."""
        if not 0 <= stage <= 4:
            raise ValueError(f"backbone stage {stage} does not exist; use 0 (stem) to 4 (layer4)")
        return min(2 ** (stage + 1), self.output_stride)

    @classmethod
    def preset(cls, name: str) -> "ImageEncoderConfig":
        presets = {
            "tiny": cls(channels=(8, 16, 32, 64), stem_width=8, output_stride=8, grid=4, dim=64,
                        image_size=64, max_slabs=8),
            "demo": cls(channels=(16, 32, 64, 128), stem_width=16, grid=4, dim=256,
                        image_size=128, max_slabs=16),
            "full": cls(channels=None, stem_width=64, grid=4, dim=512, image_size=256, max_slabs=64),
        }
        if name not in presets:
            raise KeyError(f"unknown image-encoder preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


class ImageEncoder(nn.Module):
    """slabs [B, S, C, H, W] + slab_mask [B, S] + z_mm [B, S] -> (tokens [B, S*G*G, D], mask [B, S*G*G])."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_resnet_backbone(
            cfg.backbone, cfg.in_chans, cfg.channels, cfg.stem_width, cfg.output_stride, cfg.weights_file
        )
        if cfg.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.num_features = self.backbone.num_features
        self.proj = nn.Linear(self.num_features, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.z_proj = nn.Linear(cfg.dim, cfg.dim)
        self.cell_pos = nn.Parameter(torch.zeros(cfg.grid * cfg.grid, cfg.dim))
        nn.init.trunc_normal_(self.cell_pos, std=0.02)

    @property
    def tokens_per_slab(self) -> int:
        return self.cfg.grid * self.cfg.grid

    def backbone_features(self, slabs_BS3HW: torch.Tensor, slab_mask_BS: torch.Tensor) -> torch.Tensor:
        """Backbone feature maps of the valid slabs only: [n_valid, C, h, w] (row order = slab_mask.nonzero())."""
        return self.backbone.forward_features(self._valid_slabs(slabs_BS3HW, slab_mask_BS))

    def _valid_slabs(self, slabs_BS3HW: torch.Tensor, slab_mask_BS: torch.Tensor) -> torch.Tensor:
        """The backbone's input: the valid slabs only, [n_valid, 3, H, W] (channels_last if set)."""
        x = slabs_BS3HW[slab_mask_BS]  # [n_valid, 3, H, W]
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def backbone_maps(self, slabs_BS3HW: torch.Tensor, slab_mask_BS: torch.Tensor,
                      stages: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As ``backbone_features``, plus the feature maps of the intermediate ``stages`` (timm
        feature indices, e.g. 2 = layer2 at stride 8): ([n_valid, C, h, w], [[n_valid, C_i, h_i, w_i]]).
        One backbone pass; the maps feed training-only losses (the dense localisation loss)."""
        final, maps = self.backbone.forward_intermediates(self._valid_slabs(slabs_BS3HW, slab_mask_BS), indices=list(stages))
        return final, list(maps)

    def stage_channels(self, stage: int) -> int:
        """Channels of backbone stage ``stage`` (timm ``feature_info``)."""
        return int(self.backbone.feature_info[stage]["num_chs"])

    def tokens_from_features(
        self, feats_VChw: torch.Tensor, slab_mask_BS: torch.Tensor, z_mm_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid-slab feature maps -> padded tokens [B, S*G*G, D] and mask [B, S*G*G]."""
        B, S = slab_mask_BS.shape
        G = self.cfg.grid
        pooled = F.adaptive_max_pool2d(feats_VChw, G)  # [V, C, G, G]
        cells = rearrange(pooled, "v c gh gw -> v (gh gw) c")  # [V, G*G, C]
        tok = self.norm(self.proj(cells)) + self.cell_pos  # [V, G*G, D]
        # Slab z relative to the study centre (mean over valid slabs), so only geometry matters.
        zmask = slab_mask_BS.to(z_mm_BS.dtype)
        centre_B1 = (z_mm_BS * zmask).sum(1, keepdim=True) / zmask.sum(1, keepdim=True).clamp_min(1)
        z_rel_BS = (z_mm_BS - centre_B1)[slab_mask_BS]  # [V]
        z_emb = self.z_proj(
            sinusoid(z_rel_BS, self.cfg.dim, self.cfg.z_min_period_mm, self.cfg.z_max_period_mm).to(tok.dtype)
        )  # [V, D]
        tok = tok + z_emb[:, None, :]
        out = tok.new_zeros(B, S, G * G, self.cfg.dim)
        out[slab_mask_BS] = tok  # scatter valid slabs back into the padded layout
        tokens_BND = rearrange(out, "b s n d -> b (s n) d")  # [B, S*G*G, D]
        mask_BN = slab_mask_BS.repeat_interleave(G * G, dim=1)  # [B, S*G*G]
        return tokens_BND, mask_BN

    def forward(
        self, slabs_BS3HW: torch.Tensor, slab_mask_BS: torch.Tensor, z_mm_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(slab_mask_BS.any()):  # no image anywhere in the batch: all tokens masked
            B, S = slab_mask_BS.shape
            n = S * self.tokens_per_slab
            return slabs_BS3HW.new_zeros(B, n, self.cfg.dim), slab_mask_BS.new_zeros(B, n)
        feats = self.backbone_features(slabs_BS3HW, slab_mask_BS)
        return self.tokens_from_features(feats, slab_mask_BS, z_mm_BS)
