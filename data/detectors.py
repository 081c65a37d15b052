"""The classical image detectors a study is read with, beside the model: one call per study.

* the lung-nodule detector and caliper (``data.nodule_measure``): the nodule's measured size per
  side, which a nodule call carries (``model.nodule_size_prompt``), and the evidence that there
  is a nodule;
* the vertebral-body attenuation (``data.spine_measure``): the evidence of a sclerotic level
  (``fracture``) and of a lytic focus (``bone_lesion``).

The finding heads fuse the evidence of the findings their config names
(``heads.detector_evidence``), by weights fitted on held-out studies
(``multimodal.heads.fit_evidence_fusion``; ``medreport calibrate --detector-evidence``). CT
volumes only: a radiograph or an MR gets no sizes and no evidence, and its findings come from the
heads alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.nodule_measure import detector_evidence, measure_by_side, nodule_candidates
from data.spine_measure import spine_evidence

DETECTOR_FINDINGS = ("nodule", "fracture", "bone_lesion")  # the findings a detector gives evidence for
# what the findings table names as a fused probability's second source
DETECTOR_LABELS = {"nodule": "lung-nodule detector", "fracture": "vertebral-body density",
                   "bone_lesion": "vertebral-body density"}


@dataclass(frozen=True)
class DetectorReading:
    """A study's detector outputs: nodule sizes (whole mm; keys "any", "left", "right") and the
    evidence per finding of ``DETECTOR_FINDINGS`` (a finding is missing where its detector found
    nothing to read, e.g. no vertebral body in the field)."""

    sizes_mm: dict[str, int]
    evidence: dict[str, float]


def read_study(study) -> DetectorReading:
    """Run every detector on a loaded ``data.study.Study`` (~0.6 s a demo-size CT on one core): CT
    volumes only. The column direction (LPS x) says which side is the patient's left."""
    if study.kind != "volume" or str(study.modality).upper() not in ("CT", ""):
        return DetectorReading({}, {})
    hu = np.asarray(study.volume, dtype=np.float32)
    if hu.ndim != 3 or hu.shape[0] < 3:
        return DetectorReading({}, {})
    left_high = bool(np.asarray(study.direction)[0, 0] >= 0)
    cands = nodule_candidates(hu, study.spacing_mm)
    sizes = {k: m.size_mm for k, m in measure_by_side(hu, study.spacing_mm, left_high, cands=cands).items()}
    return DetectorReading(sizes, {"nodule": detector_evidence(cands), **spine_evidence(hu, study.spacing_mm)})


def evidence_array(evidence: dict[str, float]) -> np.ndarray:
    """float32 [len(DETECTOR_FINDINGS)], NaN where a finding has no evidence (the cache's form)."""
    return np.asarray([evidence.get(f, np.nan) for f in DETECTOR_FINDINGS], dtype=np.float32)


def evidence_dict(arr) -> dict[str, float] | None:
    """The inverse of :func:`evidence_array`; None when no finding has evidence."""
    out = {f: float(v) for f, v in zip(DETECTOR_FINDINGS, np.asarray(arr, dtype=np.float64).ravel()) if np.isfinite(v)}
    return out or None
