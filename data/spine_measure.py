"""Vertebral-body attenuation on a CT volume in HU: a sclerotic level and a lytic focus.

Why: the image encoder never learned the spine's findings (test AUC 0.59 for a compression
fracture, 0.40 for a lytic bone lesion, session 22): at the demo size the vertebral body is a
disk of ~10 pixels inside a 4-slice slab, one corner of one 22 mm token. Radiologists read the
marrow's attenuation on the bone window, and opportunistic CT screening measures it per vertebra
(trabecular HU). This module does that with numpy and scipy (no offline library segments
vertebrae on a plain HU array; TotalSegmentator and MONAI's spine models need weights we cannot
fetch), and gives the finding heads two evidence scores to fuse (``multimodal.heads``):

* **sclerosis** (``fracture``): how far the densest level's marrow lies above the column's
  typical marrow, in HU (a healing compression fracture is sclerotic; the synthetic phantom draws
  its wedge fracture as a sclerotic body). On real CT the criterion of a compression fracture is
  the loss of vertebral height, which this does not measure.
* **lytic share** (``bone_lesion``): the largest share of one slice's marrow below 45 HU, fluid or
  soft tissue where there should be bone (a disc is ~85 HU, marrow 150-400).

Method (pure functions; Z/Y/X voxel axes, spacing in mm):

1. **Vertebral body**: pixels whose 25th percentile down the scan is trabecular bone (150-450 HU:
   not cortex, not the canal's fluid, and not an enhancing aorta or the sternum, which leave the
   scan's field for more than a quarter of its slices), in the middle 30 % of the columns; of
   their connected components the one with the largest area x compactness (a body is a disk),
   eroded by one pixel off the cortex.
2. **Per slice**, inside that body (smoothed lightly): the median (marrow density) and the share
   below 45 HU.

Measured on the demo split (session 23, ``runs/s23/spine_probe.py``): sclerosis separated the 17
test fractures from every other study (the lowest fracture 160 HU, the highest other study
21 HU; val 12 of 13, one body not found); the lytic share was above 0 in 10 of 12 test bone
lesions and in no other study (val 9 of 13). These are synthetic studies: on real CT the scores
are evidence to fuse and to refit (``medreport calibrate``), never a diagnosis.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from data.nodule_measure import coarse_grid

TRABECULAR_HU = (150.0, 450.0)  # marrow of a vertebral body: above soft tissue and discs, below cortex
LYTIC_HU = 45.0  # below a disc (~85 HU), far below marrow: fluid or soft tissue in the bone
MIN_BODY_MM2 = 100.0  # a vertebral body's marrow in one axial image is several cm^2


def vertebral_body_mask(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray | None:
    """[Y, X] bool: the vertebral body's marrow in the axial plane (step 1 of the module's method);
    None when no disk of trabecular bone runs down the middle of the scan."""
    hu = np.asarray(hu_ZYX, dtype=np.float32)
    if hu.ndim != 3 or hu.shape[0] < 4:
        return None
    _, Y, X = hu.shape
    p25_YX = np.percentile(hu, 25, axis=0)  # bone in at least 3 of 4 slices: the spine runs the whole scan
    middle = np.zeros((Y, X), bool)
    middle[:, int(X * 0.35): int(X * 0.65)] = True
    cand = (p25_YX > TRABECULAR_HU[0]) & (p25_YX < TRABECULAR_HU[1]) & middle
    lab, n = ndimage.label(cand)
    best, best_score = None, 0.0
    for i in range(1, n + 1):
        m = lab == i
        area = float(m.sum()) * spacing_zyx[1] * spacing_zyx[2]
        if area < MIN_BODY_MM2:
            continue
        yy, xx = np.nonzero(m)
        extent = max((yy.max() - yy.min() + 1) * spacing_zyx[1], (xx.max() - xx.min() + 1) * spacing_zyx[2])
        score = area * area / (np.pi * (extent / 2) ** 2)  # area x compactness (1 for a disk)
        if score > best_score:
            best, best_score = m, score
    if best is None:
        return None
    body = ndimage.binary_erosion(best, iterations=1)
    return body if body.sum() >= 5 else None


def spine_evidence(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float]) -> dict[str, float]:
    """``{"fracture": sclerosis HU, "bone_lesion": lytic share}`` (the module's scores); ``{}``
    when no vertebral body is found (then the heads decide alone)."""
    hu, spacing_zyx, _ = coarse_grid(hu_ZYX, spacing_zyx)  # a fine CT is read on 2-2.5 mm blocks
    body_YX = vertebral_body_mask(hu, spacing_zyx)
    if body_YX is None:
        return {}
    smooth = ndimage.gaussian_filter(hu, (0.5, 1.5 / spacing_zyx[1], 1.5 / spacing_zyx[2]))
    marrow_ZP = smooth[:, body_YX]  # [Z, P] the body's pixels on every slice
    median_Z = np.median(marrow_ZP, axis=1)
    sclerosis = float(median_Z.max() - np.median(median_Z))  # the densest level against the column
    lytic = float((marrow_ZP < LYTIC_HU).mean(axis=1).max())
    return {"fracture": sclerosis, "bone_lesion": lytic}
