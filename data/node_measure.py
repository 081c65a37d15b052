"""Enlarged mediastinal and hilar lymph nodes on a CT volume in HU: the evidence that there is one,
its station and its size.

Why: the image encoder never learned lymphadenopathy (test AUC 0.55, session 25's demo model): a
node of 12-30 mm is one corner of one 22 mm token, beside vessels of the same density. A radiologist
reads the nodes station by station around the airway (the IASLC map: paratracheal above the
carina, subcarinal below it, the aortopulmonary window, the hila), and calls a node enlarged when
it is a ball of soft tissue over 10 mm short axis in the mediastinal fat or at the hilum. This
module does that with numpy and scipy (no offline library segments lymph nodes on a plain HU array;
the published detectors need trained weights we cannot fetch), and gives the finding heads its
evidence to fuse (``heads.detector_evidence``, ``multimodal.heads``).

Method (pure functions; Z/Y/X voxel axes, spacing in mm; fine volumes are searched on the coarse
grid of ``data.nodule_measure.coarse_grid``):

1. **Airway**: the tracheal air (below -950 HU: lumen, not lung parenchyma) followed from the
   lungs' top slice downwards while each slice holds one compact air component of 40-800 mm²
   near the middle of the columns, each within 15 mm of the one above (which end is the head the
   volume's orientation says); its last slice is the
   **carina** (where the trachea splits into the two bronchi).
2. **Search region**: within 45 mm of the carina up and down and front to back, and 80 mm to
   either side (the stations of the map lie there), not air, and no deeper than 50 mm into the
   lung (hilar nodes sit at the lung's root; deeper soft tissue is the nodule detector's).
3. **Candidates**: a soft-tissue weight (1 at 10-70 HU, 0 below -50 HU and above 130 HU: fat,
   lung and enhancing blood are not node) filtered by a scale-normalised Laplacian of Gaussian at
   radii 6 / 8 / 10.5 / 13.5 mm; local maxima, ranked by response x blobness (the Hessian's
   weakest / strongest eigenvalue: a vessel is a tube, a node a ball).
4. **Ball test** (the 15 best): the share of soft tissue in the core (within 0.7 r) times the
   square of the share of *not* soft tissue in a shell at 1.3-1.8 r. A node is a ball in fat or
   lung; a meeting of vessels, the oesophagus or the tracheal wall has soft tissue leaving it.

Measured on the synthetic demo val split (session 28, ``runs/s28/ln_probe.py``; the search box
and the ball test's exponent were chosen there): the best candidate's score separated the 17
studies with an enlarged node from 60 without at AUC 0.97, and the best candidate was the node
in 15 of 17. These are synthetic phantoms (fixed stations, a fat-filled mediastinum): on real CT
the score is evidence to fuse and to refit on labelled local studies (``medreport calibrate
--detector-evidence``), never a diagnosis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data.nodule_measure import coarse_grid, log_blobs, lung_mask

LUMEN_HU = -950.0  # tracheal air: below lung parenchyma (~-860)
TRACHEA_AREA_MM2 = (40.0, 800.0)  # an adult trachea's lumen is ~1.5-2.5 cm across
BOX_MM = (45.0, 45.0, 80.0)  # search half-widths around the carina (z, y, x)
HILUM_MM = 50.0  # deepest a candidate may lie inside the lung mask
RADII_MM = (6.0, 8.0, 10.5, 13.5)  # LoG radii: nodes of ~12 to ~30 mm
SOFT_HU = (-30.0, 130.0)  # the ball test's soft tissue
SHELL_POWER = 2.0
MAX_TESTED = 15
EVIDENCE_FLOOR = 1e-3  # node_evidence: log(score + this), finite without any candidate
HILAR_MM = 40.0  # a node this far to the side of the carina is hilar


@dataclass(frozen=True)
class NodeCandidate:
    """A ball of soft tissue near the airway. ``center_zyx``: voxel indices of the volume given;
    ``radius_mm``: the LoG scale it answered best at; ``station``: its IASLC-style station from its
    place beside the carina (``data.vocab.NODE_STATIONS``)."""

    center_zyx: tuple[int, int, int]
    score: float
    radius_mm: float
    station: str


def tracheal_air(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float], lung: np.ndarray | None = None,
                 superior_is_high_z: bool = True) -> list[tuple[int, float, float]]:
    """``[(z, y, x)]``: the tracheal lumen's centroid per slice, from the lungs' top slice down to
    the carina (step 1 of the module's method); ``[]`` when no trachea is found.
    ``superior_is_high_z``: the head end is the high end of the z axis (``data.study.Study``'s
    direction: the z axis's LPS vector points superior)."""
    hu = np.asarray(hu_ZYX, dtype=np.float32)
    lung = lung_mask(hu) if lung is None else lung
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if len(zs) < 3:
        return []
    lo, hi = int(zs[0]), int(zs[-1])
    order = range(hi, lo - 1, -1) if superior_is_high_z else range(lo, hi + 1)
    X = hu.shape[2]
    px_mm2 = float(spacing_zyx[1]) * float(spacing_zyx[2])
    out: list[tuple[int, float, float]] = []
    prev = None
    for z in order:
        air = hu[z] < LUMEN_HU
        lab, n_lab = ndimage.label(air)
        if n_lab:
            idx = np.arange(1, n_lab + 1)
            area = ndimage.sum_labels(air, lab, idx) * px_mm2
            cy, cx = (np.asarray(c, dtype=np.float64) for c in zip(*ndimage.center_of_mass(air, lab, idx)))
            ok = (area >= TRACHEA_AREA_MM2[0]) & (area <= TRACHEA_AREA_MM2[1]) & (np.abs(cx - (X - 1) / 2) < 0.15 * X)
            if prev is not None:
                ok &= np.hypot((cy - prev[0]) * spacing_zyx[1], (cx - prev[1]) * spacing_zyx[2]) < 15.0
        else:
            ok = np.zeros(0, bool)
        if ok.sum() != 1:
            if out:  # the lumen split (the carina) or ended
                break
            continue
        i = int(np.flatnonzero(ok)[0])
        prev = (cy[i], cx[i])
        out.append((int(z), float(cy[i]), float(cx[i])))
    return out


def _ball_test(soft: np.ndarray, spacing: tuple[float, float, float], p: tuple[int, int, int], r: float
               ) -> tuple[float, float]:
    """(share of soft tissue within 0.7 r, share of non-soft tissue in the 1.3-1.8 r shell)."""
    reach = [int(np.ceil(1.8 * r / s)) + 1 for s in spacing]
    lo = [max(0, c - k) for c, k in zip(p, reach)]
    box = soft[lo[0]: p[0] + reach[0] + 1, lo[1]: p[1] + reach[1] + 1, lo[2]: p[2] + reach[2] + 1]
    axes = [(np.arange(n) + o - c) * s for n, o, c, s in zip(box.shape, lo, p, spacing)]
    dz, dy, dx = np.meshgrid(*axes, indexing="ij")
    d = np.sqrt(dz * dz + dy * dy + dx * dx)  # mm from the candidate
    core, shell = d <= 0.7 * r, (d >= 1.3 * r) & (d <= 1.8 * r)
    return (float(box[core].mean()) if core.any() else 0.0, 1.0 - float(box[shell].mean()) if shell.any() else 0.0)


def station_of(center_zyx, carina_zyx, top_z: int, spacing_zyx, patient_left_is_high_x: bool) -> str:
    """The station of a node at ``center_zyx`` beside the carina (voxels; ``top_z`` a slice of the
    trachea above the carina, which says which way is up): hilar when over 40 mm to the side,
    else paratracheal (or the aortopulmonary window, to the left and further out) above the carina
    and subcarinal below it."""
    dx_mm = (center_zyx[2] - carina_zyx[2]) * float(spacing_zyx[2])
    left = (dx_mm > 0) == patient_left_is_high_x
    if abs(dx_mm) >= HILAR_MM:
        return "left hilar" if left else "right hilar"
    above = (center_zyx[0] - carina_zyx[0]) * (top_z - carina_zyx[0]) > 0
    if not above:
        return "subcarinal"
    if not left:
        return "right paratracheal"
    return "aortopulmonary window" if abs(dx_mm) > 21.0 else "left paratracheal"


def node_candidates(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float], patient_left_is_high_x: bool = True,
                    superior_is_high_z: bool = True, max_candidates: int = 5) -> list[NodeCandidate]:
    """Ranked balls of soft tissue near the carina (the module's method), best first; ``[]`` when
    the volume shows no lungs or no trachea. ``patient_left_is_high_x`` / ``superior_is_high_z``:
    the volume's orientation (``data.study.Study.direction``). Centres are voxels of ``hu_ZYX`` (the middle of
    their block when a fine volume was searched on the coarse grid)."""
    hu, sp, f = coarse_grid(hu_ZYX, spacing_zyx)
    if hu.ndim != 3 or min(hu.shape) < 3:
        return []
    lung = lung_mask(hu)
    if not lung.any():
        return []
    airway = tracheal_air(hu, sp, lung, superior_is_high_z)
    if len(airway) < 3:
        return []
    carina = airway[-1]
    # Work on the search box and a margin of HILUM_MM around it: the lung depth of every voxel in
    # the box that is at most HILUM_MM deep is exact there, and the filters (4 sigma < HILUM_MM)
    # see the zeros they would see in the whole volume. ~4x less work on a demo CT.
    lo = [max(0, int(np.floor(c - (b + HILUM_MM) / s))) for c, b, s in zip(carina, BOX_MM, sp)]
    hi = [min(n, int(np.ceil(c + (b + HILUM_MM) / s)) + 1) for c, b, s, n in zip(carina, BOX_MM, sp, hu.shape)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    hu, lung = hu[crop], lung[crop]
    carina = (carina[0] - lo[0], carina[1] - lo[1], carina[2] - lo[2])
    zc, yc, xc = carina
    Z, Y, X = hu.shape
    near_Z = np.abs(np.arange(Z) - zc) * sp[0] <= BOX_MM[0]
    near_Y = np.abs(np.arange(Y) - yc) * sp[1] <= BOX_MM[1]
    near_X = np.abs(np.arange(X) - xc) * sp[2] <= BOX_MM[2]
    box = near_Z[:, None, None] & near_Y[None, :, None] & near_X[None, None, :]
    if lung.all():  # no voxel outside the lung to measure depth from: the whole crop is deep lung
        return []
    depth = ndimage.distance_transform_edt(lung, sampling=sp)  # mm into the lung, 0 outside
    region = box & (hu > LUMEN_HU) & (depth <= HILUM_MM)
    w = np.clip((hu + 50.0) / 60.0, 0.0, 1.0) * np.clip((130.0 - hu) / 60.0, 0.0, 1.0) * region
    ranked = log_blobs(w, sp, RADII_MM, region)
    soft = (hu > SOFT_HU[0]) & (hu < SOFT_HU[1])
    top_z = airway[0][0] - lo[0]
    out = []
    for score, p, r in ranked[:MAX_TESTED]:
        core, shell = _ball_test(soft, sp, p, r)
        station = station_of(p, carina, top_z, sp, patient_left_is_high_x)
        centre = tuple(int((c + o) * k + k // 2) for c, o, k in zip(p, lo, f))
        out.append(NodeCandidate((centre[0], centre[1], centre[2]), score * core * shell ** SHELL_POWER, r, station))
    out.sort(key=lambda c: -c.score)
    return out[:max_candidates]


def node_evidence(cands: list[NodeCandidate]) -> float:
    """The detector's evidence that the study has an enlarged node: log(best score + 0.001), about
    -6.9 when nothing ball-shaped lies near the airway."""
    return float(np.log((cands[0].score if cands else 0.0) + EVIDENCE_FLOOR))
