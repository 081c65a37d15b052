"""Sampling the truth of one synthetic study: patient, acquisition, findings and history facts.

Everything here is drawn from one ``numpy.random.Generator`` so a study is a pure function of
its seed. The phantom renders the findings, the history generator plants the facts, the report
writer words both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.vocab import AMOUNTS, LOBE_SIDE, LOBES, NODE_STATION_SIDE, NODE_STATIONS, Label

# Size presets of contracts.md: (z, y, x) voxels and (slice thickness, in-plane spacing) ranges.
SIZES = ("tiny", "demo", "full")

INDICATIONS: tuple[str, ...] = (
    "shortness of breath and cough for three weeks",
    "persistent cough and unintentional weight loss",
    "fever and productive cough, evaluate for pneumonia",
    "pleuritic chest pain",
    "hemoptysis",
    "chronic dyspnea on exertion",
    "abnormal chest radiograph",
    "follow-up of pulmonary nodule",
    "staging of known malignancy",
    "chest wall pain after a fall",
    "back pain with suspected vertebral fracture",
    "worsening dyspnea, history of smoking",
    "evaluate for interstitial lung disease",
    "hypoxia after surgery",
    "palpitations and chest tightness",
    "restaging after chemotherapy",
)
# Indications reserved for the history-driven scenarios (nodule follow-up, known malignancy).
_SCENARIO_INDICATIONS = ("follow-up of pulmonary nodule", "staging of known malignancy", "restaging after chemotherapy")
CANCERS: tuple[str, ...] = (
    "colon cancer", "breast cancer", "renal cell carcinoma", "melanoma",
    "head and neck squamous cell carcinoma", "prostate cancer", "lung adenocarcinoma",
)


@dataclass
class Fact:
    """A fact planted in the history that must (or, for distractors, must not) reach the report."""

    kind: str  # indication | prior_nodule | malignancy | lobectomy | contrast_allergy | distractor
    text: str = ""  # the sentence as planted in the history
    char_offset: int = -1  # where ``text`` starts in history.txt (set by the history writer)
    expect_in_report: str = ""  # phrase the report must contain ("" for distractors)
    section: str = ""  # the report section the phrase belongs in
    must_not_appear: str = ""  # distractors: phrase that must not leak into the report

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "text": self.text, "char_offset": self.char_offset,
             "expect_in_report": self.expect_in_report, "section": self.section}
        if self.must_not_appear:
            d["must_not_appear"] = self.must_not_appear
        return d


@dataclass
class Case:
    """The full truth of one synthetic study (before rendering)."""

    id: str
    seed: int
    split: str
    size: str
    age: int
    sex: str  # "M" | "F"
    indication: str
    labels: list[Label]  # present findings only
    contrast: bool
    has_history: bool
    history_tokens: int
    has_audio: bool
    facts: list[Fact] = field(default_factory=list)
    prior_nodule_mm: float | None = None  # size on the prior CT (nodule follow-up)
    prior_date: str | None = None
    cancer: str | None = None
    lobectomy_lobe: str | None = None
    anatomy: dict = field(default_factory=dict)  # body/lung/heart scale factors
    acquisition: dict = field(default_factory=dict)  # shape, spacing, noise

    def present(self, name: str) -> Label | None:
        return next((lab for lab in self.labels if lab.finding == name and lab.present), None)


def _acquisition(rng: np.random.Generator, size: str) -> dict:
    if size == "tiny":
        shape, thk, px = (16, 64, 64), 10.0, float(rng.uniform(5.3, 5.7))
    elif size == "demo":
        shape, thk, px = (64, 128, 128), 5.0, float(rng.uniform(2.6, 2.8))
    elif size == "full":
        thk = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
        nz = int(np.clip(round(rng.uniform(260, 360) / thk), 40, 400))
        shape, px = (nz, 512, 512), float(rng.uniform(0.6, 0.9))
    else:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {"shape": shape, "slice_thickness": thk, "pixel_spacing": round(px, 4),
            "noise_hu": float(rng.uniform(8, 30)), "kvp": int(rng.choice([100, 120]))}


def _sample_finding(rng: np.random.Generator, name: str, case_lobectomy: str | None) -> Label:
    lobes = [lb for lb in LOBES if lb != case_lobectomy]
    if name in ("nodule", "mass", "consolidation", "ground_glass_opacity", "atelectasis"):
        lobe = str(rng.choice(lobes))
        side = LOBE_SIDE[lobe]
        if name == "nodule":
            size = float(rng.choice([4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 22, 26]))
            dens = str(rng.choice(["solid", "solid", "part-solid", "ground-glass"]))
            return Label(name, True, side, lobe, size, {"density": dens})
        if name == "mass":
            return Label(name, True, side, lobe, float(rng.integers(32, 66)), {})
        if name == "atelectasis":
            lobe = str(rng.choice([lb for lb in ("right lower lobe", "left lower lobe") if lb in lobes] or lobes))
            return Label(name, True, LOBE_SIDE[lobe], lobe, None, {})
        return Label(name, True, side, lobe, None, {})
    if name == "emphysema":
        return Label(name, True, "bilateral", None, None, {"severity": str(rng.choice(["mild", "moderate", "severe"]))})
    if name == "pleural_effusion":
        side = str(rng.choice(["left", "right", "bilateral"], p=[0.35, 0.35, 0.3]))
        return Label(name, True, side, None, None, {"amount": str(rng.choice(AMOUNTS, p=[0.5, 0.35, 0.15]))})
    if name == "pneumothorax":
        return Label(name, True, str(rng.choice(["left", "right"])), None, None,
                     {"amount": str(rng.choice(AMOUNTS, p=[0.6, 0.3, 0.1]))})
    if name == "cardiomegaly":
        return Label(name, True, None, None, None, {})
    if name == "pericardial_effusion":
        return Label(name, True, None, None, None, {"amount": str(rng.choice(AMOUNTS, p=[0.6, 0.3, 0.1]))})
    if name == "lymphadenopathy":
        station = str(rng.choice(NODE_STATIONS))
        return Label(name, True, NODE_STATION_SIDE[station], station, float(rng.integers(12, 31)), {})
    if name == "hiatal_hernia":
        return Label(name, True, None, None, None, {"amount": str(rng.choice(AMOUNTS, p=[0.5, 0.35, 0.15]))})
    if name == "fracture":
        level = str(rng.choice(["T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1"]))
        return Label(name, True, None, level, None, {"type": "compression"})
    if name == "bone_lesion":
        level = str(rng.choice(["T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12"]))
        return Label(name, True, None, level, float(rng.integers(10, 26)), {"type": "lytic"})
    raise KeyError(name)


# Relative frequency of each generated finding in abnormal studies.
_FREQ: dict[str, float] = {
    "nodule": 0.30, "mass": 0.07, "consolidation": 0.14, "ground_glass_opacity": 0.10, "atelectasis": 0.12,
    "emphysema": 0.14, "pleural_effusion": 0.16, "pneumothorax": 0.06, "cardiomegaly": 0.12,
    "pericardial_effusion": 0.06, "lymphadenopathy": 0.09, "hiatal_hernia": 0.08, "fracture": 0.06,
    "bone_lesion": 0.05,
}


def _fake_date(rng: np.random.Generator, year_lo: int, year_hi: int) -> str:
    return f"{int(rng.integers(year_lo, year_hi + 1)):04d}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"


def sample_case(
    rng: np.random.Generator,
    study_id: str,
    seed: int,
    split: str,
    size: str,
    history_tokens: tuple[int, int] = (200, 16000),
    normal_fraction: float = 0.3,
    p_no_history: float = 0.08,
    p_no_audio: float = 0.1,
    force: dict | None = None,
) -> Case:
    """Draw one study's truth. ``force`` overrides draws (used for the bundled showcase sample):
    keys ``normal``, ``has_history``, ``has_audio``, ``history_tokens``, ``findings`` (names),
    ``prior_nodule``, ``malignancy``, ``lobectomy``, ``contrast_allergy``."""
    force = force or {}
    age = int(rng.integers(28, 89))
    sex = str(rng.choice(["M", "F"]))
    acq = _acquisition(rng, size)
    anatomy = {
        "body_scale": float(rng.uniform(0.85, 1.08)),
        "ap_ratio": float(rng.uniform(0.62, 0.78)),
        "lung_scale": float(rng.uniform(0.88, 1.08)),
        "heart_scale": float(rng.uniform(0.9, 1.05)),
        "fat_mm": float(rng.uniform(6, 28)),
        "vessel_seed": int(rng.integers(0, 2**31 - 1)),
    }
    has_history = bool(force.get("has_history", rng.random() >= p_no_history))
    has_audio = bool(force.get("has_audio", rng.random() >= p_no_audio))
    lo, hi = history_tokens
    # Log-uniform length: many short records, some very long ones.
    htok = int(force.get("history_tokens", round(float(np.exp(rng.uniform(np.log(lo), np.log(max(hi, lo + 1))))))))

    # History-driven scenarios (only possible when there is a history to carry them).
    prior_nodule = bool(force.get("prior_nodule", has_history and rng.random() < 0.22))
    malignancy = bool(force.get("malignancy", has_history and rng.random() < 0.22))
    lobectomy = bool(force.get("lobectomy", has_history and rng.random() < 0.08))
    allergy = bool(force.get("contrast_allergy", has_history and rng.random() < 0.15))
    normal = bool(force.get("normal", (not prior_nodule) and rng.random() < normal_fraction))

    lobectomy_lobe = str(rng.choice(["right upper lobe", "left upper lobe", "right lower lobe"])) if lobectomy else None
    labels: list[Label] = []
    if lobectomy_lobe:
        labels.append(Label("lobectomy", True, LOBE_SIDE[lobectomy_lobe], lobectomy_lobe, None, {}))
    names: list[str] = list(force.get("findings", []))
    if not normal and not names:
        k = int(rng.choice([1, 1, 1, 2, 2, 3]))
        pool = list(_FREQ)
        p = np.array([_FREQ[n] for n in pool])
        names = [str(n) for n in rng.choice(pool, size=k, replace=False, p=p / p.sum())]
    if prior_nodule and "nodule" not in names:
        names.append("nodule")
    if "mass" in names and "nodule" in names and not prior_nodule:
        names.remove("nodule")
    for name in names:
        labels.append(_sample_finding(rng, name, lobectomy_lobe))

    prior_mm = prior_date = None
    nod = next((lab for lab in labels if lab.finding == "nodule"), None)
    if prior_nodule and nod is not None:
        nod.attributes["density"] = "solid"
        nod.size_mm = float(rng.choice([7, 8, 9, 10, 11, 12, 14, 16]))
        prior_mm = float(nod.size_mm + rng.choice([-4, -3, -2, 0, 0, 2, 3]))
        prior_mm = max(prior_mm, 4.0)
        prior_date = _fake_date(rng, 2019, 2023)

    cancer = str(rng.choice(CANCERS)) if malignancy else None
    if prior_nodule:
        indication = "follow-up of pulmonary nodule"
    elif malignancy:
        indication = str(rng.choice(["staging of known malignancy", "restaging after chemotherapy"]))
    else:
        indication = str(rng.choice([i for i in INDICATIONS if i not in _SCENARIO_INDICATIONS]))
    return Case(
        id=study_id, seed=seed, split=split, size=size, age=age, sex=sex, indication=indication,
        labels=labels, contrast=not allergy, has_history=has_history, history_tokens=htok,
        has_audio=has_audio, prior_nodule_mm=prior_mm, prior_date=prior_date, cancer=cancer,
        lobectomy_lobe=lobectomy_lobe, anatomy=anatomy, acquisition=acq,
    )
