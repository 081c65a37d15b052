"""Evidence heatmaps: where in the image a finding (or a generated sentence) comes from.

Method: **Grad-CAM on the image ResNet's last stage** (Selvaraju et al. 2017). For a scalar
score (a finding's presence logit, or a sentence's summed token log-probability) we take its
gradient with respect to the last-stage feature maps of all slabs of the study, average it
over the study's slabs and positions into one weight per channel, and form
ReLU(sum_c weight_c * feature_c) per slab. Why Grad-CAM rather than attention rollout:

* it is *class-discriminative*: each finding gets its own map from its own logit, whereas
  rollout through fusion's attention pooling, gates and the decoder's sparse/MoE layers mostly
  shows where the model looks in general, and has no principled way to cross the gated sum;
* it needs one backward per score and no change to the model (no stored attention weights
  in hot paths, so the sparse attention kernels stay as they are);
* its resolution is the backbone's output stride (32, or 16/8 with a dilated config), fine
  enough to name the key slices, and coarse localisation is what the UI shows anyway.

Channel weights are shared by all slabs of a study (the score is per study, and a slab that
does not contain the finding should come out cold rather than renormalised). Maps are
upsampled to slab H x W, scaled to [0, 1] by the study's maximum, and the hottest slabs are
mapped back to original slice indices through ``z_index_range``.

Shape legend: V valid slabs (of the batch), C channels, h/w feature map, S slabs, H/W slab size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Evidence:
    """One heatmap over one study, ready to overlay on its slabs."""

    heatmap_SHW: np.ndarray  # float32 (S, H, W) in [0, 1], one map per slab
    slab_scores: np.ndarray  # float32 (S,) peak of each slab's map
    key_slabs: list[int]  # slab indices, hottest first
    key_slices: list[int]  # original z indices (centre slice of each key slab), hottest first
    key_slice_ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) per key slab
    peak_SYX: tuple[int, int, int] = (0, 0, 0)  # location of the global maximum (slab, y, x)


def gradcam_maps(
    feats_VChw: torch.Tensor, score: torch.Tensor, study_of_row_V: torch.Tensor, n_studies: int,
    retain_graph: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps [V, h, w] (unnormalised, >= 0) for ``score`` (scalar: the sum over studies of
    each study's score; studies are independent in eval mode, so one backward serves all).

    ``study_of_row_V``: which study each feature-map row belongs to (channel weights are averaged
    per study)."""
    (grad,) = torch.autograd.grad(score, feats_VChw, retain_graph=retain_graph)
    g_VC = grad.float().mean(dim=(2, 3))  # [V, C]
    C = g_VC.shape[1]
    sums = g_VC.new_zeros(n_studies, C).index_add_(0, study_of_row_V, g_VC)
    counts = g_VC.new_zeros(n_studies).index_add_(0, study_of_row_V, torch.ones_like(g_VC[:, 0]))
    alpha_BC = sums / counts.clamp_min(1)[:, None]
    cam = torch.einsum("vchw,vc->vhw", feats_VChw.detach().float(), alpha_BC[study_of_row_V])
    return F.relu(cam)


def evidence_from_maps(
    cam_Vhw: torch.Tensor,
    slab_mask_BS: torch.Tensor,
    size_hw: tuple[int, int],
    z_index_range_BS2: np.ndarray | torch.Tensor | None = None,
    n_key: int = 3,
) -> list[Evidence]:
    """Per-study Evidence from the valid-slab maps of a batch (rows ordered as slab_mask.nonzero())."""
    B, S = slab_mask_BS.shape
    up = F.interpolate(cam_Vhw[:, None], size=size_hw, mode="bilinear", align_corners=False)[:, 0]  # [V, H, W]
    full = up.new_zeros(B, S, *size_hw)
    full[slab_mask_BS] = up
    out = []
    for b in range(B):
        n_valid = int(slab_mask_BS[b].sum())
        heat_t = full[b]  # padded slabs stay 0
        peak = float(heat_t.max())
        heat = (heat_t / peak if peak > 0 else heat_t).cpu().numpy().astype(np.float32)
        slab_scores = heat.reshape(S, -1).max(1)
        order = [int(s) for s in np.argsort(-slab_scores[:n_valid], kind="stable")[:n_key]]
        if z_index_range_BS2 is not None:
            zr = np.asarray(z_index_range_BS2[b].cpu() if torch.is_tensor(z_index_range_BS2) else z_index_range_BS2[b])
            ranges = [(int(zr[s, 0]), int(zr[s, 1])) for s in order]
        else:
            ranges = [(s, s + 1) for s in order]
        keys = [(a + max(a, c - 1)) // 2 for a, c in ranges]
        flat = int(np.argmax(heat[:max(n_valid, 1)]))
        s_, rem = divmod(flat, size_hw[0] * size_hw[1])
        y_, x_ = divmod(rem, size_hw[1])
        out.append(Evidence(heat, slab_scores.astype(np.float32), order, keys, ranges, (s_, y_, x_)))
    return out
