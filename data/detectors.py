"""The classical image detectors a study is read with, beside the model: one call per study.

* the lung-nodule detector and caliper (``data.nodule_measure``): the nodule's measured size per
  side, which a nodule call carries (``model.nodule_size_prompt``), and the evidence that there
  is a nodule;
* the vertebral-body attenuation (``data.spine_measure``): the evidence of a sclerotic level
  (``fracture``) and of a lytic focus (``bone_lesion``);
* the mediastinal lymph-node detector (``data.node_measure``): the evidence of an enlarged node
  (``lymphadenopathy``) and its station, which a lymphadenopathy call takes (the heads never
  learned where the nodes are).

The finding heads fuse the evidence of the findings their config names
(``heads.detector_evidence``), by weights fitted on held-out studies
(``multimodal.heads.fit_evidence_fusion``; ``medreport calibrate --detector-evidence``). CT
volumes only: a radiograph or an MR gets no sizes and no evidence, and its findings come from the
heads alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.node_measure import node_candidates, node_evidence
from data.nodule_measure import detector_evidence, measure_by_side, nodule_candidates
from data.spine_measure import spine_evidence
from data.vocab import NODE_STATIONS

# the findings a detector gives evidence for (the order of a cached evidence array)
DETECTOR_FINDINGS = ("nodule", "fracture", "bone_lesion", "lymphadenopathy")
# what the findings table names as a fused probability's second source
DETECTOR_LABELS = {"nodule": "lung-nodule detector", "fracture": "vertebral-body density",
                   "bone_lesion": "vertebral-body density", "lymphadenopathy": "lymph-node detector"}


@dataclass(frozen=True)
class DetectorReading:
    """A study's detector outputs: nodule sizes (whole mm; keys "any", "left", "right"), the
    evidence per finding of ``DETECTOR_FINDINGS`` (a finding is missing where its detector found
    nothing to read, e.g. no vertebral body in the field) and where a detector places a finding
    (``{"lymphadenopathy": "left hilar"}``: the best node candidate's station)."""

    sizes_mm: dict[str, int]
    evidence: dict[str, float]
    locations: dict[str, str] = field(default_factory=dict)


def read_study(study) -> DetectorReading:
    """Run every detector on a loaded ``data.study.Study`` (~1 s a demo-size CT on one core): CT
    volumes only. The column direction (LPS x) says which side is the patient's left."""
    if study.kind != "volume" or str(study.modality).upper() not in ("CT", ""):
        return DetectorReading({}, {})
    hu = np.asarray(study.volume, dtype=np.float32)
    if hu.ndim != 3 or hu.shape[0] < 3:
        return DetectorReading({}, {})
    direction = np.asarray(study.direction)
    left_high, superior_high = bool(direction[0, 0] >= 0), bool(direction[2, 2] >= 0)
    cands = nodule_candidates(hu, study.spacing_mm)
    sizes = {k: m.size_mm for k, m in measure_by_side(hu, study.spacing_mm, left_high, cands=cands).items()}
    evidence = {"nodule": detector_evidence(cands), **spine_evidence(hu, study.spacing_mm)}
    nodes = node_candidates(hu, study.spacing_mm, left_high, superior_high)
    locations = {}
    if nodes:  # no trachea found: no evidence (the heads decide alone), no station
        evidence["lymphadenopathy"] = node_evidence(nodes)
        locations["lymphadenopathy"] = nodes[0].station
    return DetectorReading(sizes, evidence, locations)


def evidence_array(evidence: dict[str, float]) -> np.ndarray:
    """float32 [len(DETECTOR_FINDINGS)], NaN where a finding has no evidence (the cache's form)."""
    return np.asarray([evidence.get(f, np.nan) for f in DETECTOR_FINDINGS], dtype=np.float32)


def locations_array(locations: dict[str, str]) -> np.ndarray:
    """int64 [1]: the lymph-node station's index in ``data.vocab.NODE_STATIONS``, -1 for none (the
    cache's form)."""
    station = locations.get("lymphadenopathy")
    return np.asarray([NODE_STATIONS.index(station) if station in NODE_STATIONS else -1], dtype=np.int64)


def locations_dict(arr) -> dict[str, str] | None:
    """The inverse of :func:`locations_array`; None without a station."""
    i = int(np.asarray(arr).ravel()[0]) if np.asarray(arr).size else -1
    return {"lymphadenopathy": NODE_STATIONS[i]} if 0 <= i < len(NODE_STATIONS) else None


def evidence_dict(arr) -> dict[str, float] | None:
    """The inverse of :func:`evidence_array`; None when no finding has evidence."""
    out = {f: float(v) for f, v in zip(DETECTOR_FINDINGS, np.asarray(arr, dtype=np.float64).ravel()) if np.isfinite(v)}
    return out or None
