"""Audio encoder: a one-channel timm ResNet-50 over the dictation's log-mel spectrogram -> time tokens.

The backbone sees the spectrogram as a 1-channel image [1, M, T]; its last-stage map
[C, m, t] is averaged over frequency (m) and every remaining time step becomes a token with a
sinusoidal time position. Studies without audio are masked out (and never computed).

Shape legend: B batch, M mel bins, T frames, C channels, N time tokens, D width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from multimodal.layers import create_resnet_backbone, sinusoid


@dataclass
class AudioEncoderConfig:
    backbone: str = "resnet50"
    channels: tuple[int, ...] | None = None
    stem_width: int = 64
    output_stride: int = 32
    weights_file: str | None = None
    dim: int = 256
    max_tokens: int = 64  # time tokens after pooling (longer dictations are average-pooled down)
    channels_last: bool = True
    n_mels: int = 64  # what the preprocessing should produce (matches data.audio.AudioConfig presets)
    hop_s: float = 0.01  # frame hop, for the time position in seconds

    @classmethod
    def preset(cls, name: str) -> "AudioEncoderConfig":
        presets = {
            "tiny": cls(channels=(8, 16, 32, 64), stem_width=8, output_stride=16, dim=64, max_tokens=16, n_mels=32),
            "demo": cls(channels=(8, 16, 32, 64), stem_width=8, dim=256, max_tokens=32, n_mels=64),
            "full": cls(channels=None, stem_width=64, dim=512, max_tokens=64, n_mels=80),
        }
        if name not in presets:
            raise KeyError(f"unknown audio-encoder preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


class AudioEncoder(nn.Module):
    """log-mel [B, 1, M, T] + present [B] (+ optional frame lengths [B]) -> (tokens [B, N, D], mask [B, N])."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_resnet_backbone(
            cfg.backbone, 1, cfg.channels, cfg.stem_width, cfg.output_stride, cfg.weights_file
        )
        if cfg.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.num_features = self.backbone.num_features
        self.proj = nn.Linear(self.num_features, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(
        self,
        mel_B1MT: torch.Tensor,
        present_B: torch.Tensor,
        lengths_B: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, _, T = mel_B1MT.shape
        stride = self.cfg.output_stride
        t_out = -(-T // stride)  # backbone's time resolution (ceil)
        N = min(t_out, self.cfg.max_tokens)
        tokens = mel_B1MT.new_zeros(B, N, self.cfg.dim)
        mask = torch.zeros(B, N, dtype=torch.bool, device=mel_B1MT.device)
        present_B = present_B.bool()
        if not bool(present_B.any()):
            return tokens, mask
        x = mel_B1MT[present_B]  # [P, 1, M, T]
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone.forward_features(x)  # [P, C, m, t]
        seq = feats.mean(dim=2)  # pool frequency -> [P, C, t]
        seq = F.adaptive_avg_pool1d(seq, N)  # [P, C, N]
        tok = self.norm(self.proj(rearrange(seq, "p c n -> p n c")))  # [P, N, D]
        # Time position in seconds of each token's centre.
        secs = (torch.arange(N, device=x.device, dtype=torch.float32) + 0.5) * (T * self.cfg.hop_s / N)
        tok = tok + self.time_proj(sinusoid(secs, self.cfg.dim, 0.1, 600.0).to(tok.dtype))[None]
        tokens[present_B] = tok.to(tokens.dtype)  # autocast: the projection may be bf16
        valid = present_B[:, None].expand(B, N).clone()
        if lengths_B is not None:  # mask tokens past each clip's end (batch padded in time)
            tok_end = torch.ceil(lengths_B.float() / T * N).long()  # [B]
            valid &= torch.arange(N, device=x.device)[None, :] < tok_end[:, None]
        mask |= valid
        return tokens, mask
