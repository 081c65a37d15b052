"""Finding heads: presence, side and coarse location per finding, their loss, and calibration.

Every finding has a learned query that attention-pools the fused tokens into a
finding-specific vector; from it come a presence logit (a per-finding linear unit), side logits
(``SIDES``) and coarse-location logits (``HeadsConfig.locations``). Presence probabilities are
calibrated by one temperature (``fit_temperature`` on validation logits, stored in the heads).

Shape legend: B batch, F fused tokens, K findings, D width, L locations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIDES = ("none", "left", "right", "bilateral")
DEFAULT_LOCATIONS = ("unspecified", "upper", "middle", "lower", "hilar", "mediastinal", "pleural", "diffuse")


@dataclass
class HeadsConfig:
    finding_names: tuple[str, ...] = ()
    locations: tuple[str, ...] = DEFAULT_LOCATIONS
    n_heads: int = 4
    presence_weight: float = 1.0
    side_weight: float = 0.3
    location_weight: float = 0.3

    @property
    def num_findings(self) -> int:
        return len(self.finding_names)


@dataclass
class FindingLabels:
    """Targets per study and finding. present: 1/0, or -1 = unknown (ignored);
    side / location: class index, or -100 = unknown / not applicable (ignored)."""

    present_BK: torch.Tensor
    side_BK: torch.Tensor | None = None
    location_BK: torch.Tensor | None = None


@dataclass
class HeadsOutput:
    presence_logits_BK: torch.Tensor
    side_logits_BK4: torch.Tensor
    location_logits_BKL: torch.Tensor
    temperature: torch.Tensor = field(default_factory=lambda: torch.tensor(1.0))

    @property
    def presence_probs(self) -> torch.Tensor:
        """Calibrated presence probabilities [B, K]."""
        return torch.sigmoid(self.presence_logits_BK / self.temperature)


class FindingHeads(nn.Module):
    def __init__(self, cfg: HeadsConfig, dim: int):
        super().__init__()
        if cfg.num_findings == 0:
            raise ValueError("HeadsConfig.finding_names is empty: give the finding vocabulary")
        self.cfg = cfg
        K = cfg.num_findings
        self.queries = nn.Parameter(torch.randn(K, dim) * 0.02)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, cfg.n_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.presence_w = nn.Parameter(torch.zeros(K, dim))  # one logistic unit per finding
        self.presence_b = nn.Parameter(torch.full((K,), -2.0))  # findings are rare a priori
        self.side = nn.Linear(dim, len(SIDES))
        self.location = nn.Linear(dim, len(cfg.locations))
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, fused_BFD: torch.Tensor, mask_BF: torch.Tensor) -> HeadsOutput:
        B = fused_BFD.shape[0]
        kv = self.norm_kv(fused_BFD)
        q = self.queries.expand(B, -1, -1)  # [B, K, D]
        h, _ = self.attn(q, kv, kv, key_padding_mask=~mask_BF.bool(), need_weights=False)
        h = self.norm(h + q)  # [B, K, D]
        presence = torch.einsum("bkd,kd->bk", h, self.presence_w) + self.presence_b  # [B, K]
        return HeadsOutput(presence, self.side(h), self.location(h), self.temperature)


def heads_loss(out: HeadsOutput, labels: FindingLabels, cfg: HeadsConfig) -> dict[str, torch.Tensor]:
    """Weighted sum of presence BCE (known labels only), side and location CE (where labelled)."""
    present = labels.present_BK.float()
    known = present >= 0
    bce = F.binary_cross_entropy_with_logits(out.presence_logits_BK, present.clamp(0, 1), reduction="none")
    presence = (bce * known).sum() / known.sum().clamp_min(1)
    zero = out.presence_logits_BK.new_zeros(())
    side = location = zero
    if labels.side_BK is not None and bool((labels.side_BK >= 0).any()):
        side = F.cross_entropy(out.side_logits_BK4.flatten(0, 1), labels.side_BK.flatten(), ignore_index=-100)
    if labels.location_BK is not None and bool((labels.location_BK >= 0).any()):
        location = F.cross_entropy(
            out.location_logits_BKL.flatten(0, 1), labels.location_BK.flatten(), ignore_index=-100
        )
    total = cfg.presence_weight * presence + cfg.side_weight * side + cfg.location_weight * location
    return {"heads": total, "presence": presence, "side": side, "location": location}


def _flat_known(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    lg = torch.as_tensor(np.asarray(logits, dtype=np.float64) if not torch.is_tensor(logits) else logits)
    lb = torch.as_tensor(np.asarray(labels, dtype=np.float64) if not torch.is_tensor(labels) else labels)
    lg, lb = lg.detach().double().flatten(), lb.detach().double().flatten()
    known = lb >= 0
    return lg[known], lb[known]


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """Temperature T > 0 minimising the BCE of sigmoid(logits / T) on held-out data.

    logits, labels: arrays/tensors of the same shape (labels 1/0; negative = unknown, ignored).
    Optimises log T with L-BFGS (1 parameter, converges in a few steps).
    """
    lg, lb = _flat_known(logits, labels)
    if lg.numel() == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(lg / log_t.exp(), lb)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE of binary probabilities over all (study, finding) pairs with known labels:
    sum over equal-width probability bins of (bin share) * |observed rate - mean probability|."""
    p, y = _flat_known(probs, labels)
    if p.numel() == 0:
        return 0.0
    bins = torch.clamp((p * n_bins).long(), max=n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.double().mean() * (y[sel].mean() - p[sel].mean()).abs()
    return float(ece)
