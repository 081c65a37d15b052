"""The finding vocabulary: one list shared by the synthetic generator, the report labeller,
the model's finding heads and the UI.

Each finding has a machine name (used in manifests and as head index), a display name, the
organ system it is reported under (the Findings sub-sections), the sides / locations / sizes it
may take and its attribute values. ``FINDING_NAMES`` is the fixed, ordered list the model's heads
index into: append, never reorder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Findings sub-sections, in report order: (key, heading as printed in the report).
SYSTEMS: tuple[tuple[str, str], ...] = (
    ("lungs", "Lungs and airways"),
    ("pleura", "Pleura"),
    ("heart_mediastinum", "Heart and mediastinum"),
    ("bones", "Bones"),
    ("upper_abdomen", "Upper abdomen"),
)
SYSTEM_HEADINGS: dict[str, str] = dict(SYSTEMS)

SIDES: tuple[str, ...] = ("left", "right", "bilateral")

LOBES: tuple[str, ...] = (
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "left lower lobe",
)
LOBE_SIDE: dict[str, str] = {lobe: lobe.split()[0] for lobe in LOBES}

NODE_STATIONS: tuple[str, ...] = (
    "right paratracheal",
    "left paratracheal",
    "subcarinal",
    "aortopulmonary window",
    "right hilar",
    "left hilar",
)
NODE_STATION_SIDE: dict[str, str | None] = {
    "right paratracheal": "right",
    "left paratracheal": "left",
    "subcarinal": None,
    "aortopulmonary window": None,
    "right hilar": "right",
    "left hilar": "left",
}

VERTEBRAE: tuple[str, ...] = tuple([f"T{i}" for i in range(1, 13)] + ["L1", "L2"])

AMOUNTS: tuple[str, ...] = ("small", "moderate", "large")


@dataclass(frozen=True)
class FindingDef:
    """One vocabulary entry."""

    name: str
    display: str
    system: str  # key of SYSTEMS
    sides: tuple[str, ...] = ()  # allowed sides; () = no side
    locations: tuple[str, ...] = ()  # allowed locations; () = none
    size_mm: tuple[float, float] | None = None  # (min, max) size the generator draws; None = unsized
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    generated: bool = True  # the synthetic generator draws it (False: labeller-only)


FINDINGS: tuple[FindingDef, ...] = (
    FindingDef("nodule", "Pulmonary nodule", "lungs", SIDES[:2], LOBES, (4.0, 28.0),
               {"density": ("solid", "part-solid", "ground-glass", "calcified")}),
    FindingDef("mass", "Lung mass", "lungs", SIDES[:2], LOBES, (32.0, 65.0)),
    FindingDef("consolidation", "Consolidation", "lungs", SIDES, LOBES),
    FindingDef("ground_glass_opacity", "Ground-glass opacity", "lungs", SIDES, LOBES),
    FindingDef("atelectasis", "Atelectasis", "lungs", SIDES, LOBES),
    FindingDef("emphysema", "Emphysema", "lungs", ("bilateral",), (),
               attributes={"severity": ("mild", "moderate", "severe")}),
    FindingDef("lobectomy", "Post-lobectomy changes", "lungs", SIDES[:2],
               ("right upper lobe", "left upper lobe", "right lower lobe")),
    FindingDef("pleural_effusion", "Pleural effusion", "pleura", SIDES, (), attributes={"amount": AMOUNTS}),
    FindingDef("pneumothorax", "Pneumothorax", "pleura", SIDES[:2], (), attributes={"amount": AMOUNTS}),
    FindingDef("cardiomegaly", "Cardiomegaly", "heart_mediastinum"),
    FindingDef("pericardial_effusion", "Pericardial effusion", "heart_mediastinum",
               attributes={"amount": AMOUNTS}),
    FindingDef("lymphadenopathy", "Mediastinal lymphadenopathy", "heart_mediastinum", SIDES[:2],
               NODE_STATIONS, (12.0, 30.0)),
    FindingDef("hiatal_hernia", "Hiatal hernia", "upper_abdomen", attributes={"amount": AMOUNTS}),
    FindingDef("fracture", "Fracture", "bones", SIDES[:2], VERTEBRAE,
               attributes={"type": ("compression", "other")}),
    FindingDef("bone_lesion", "Bone lesion", "bones", SIDES[:2], VERTEBRAE, (10.0, 30.0),
               {"type": ("lytic", "sclerotic")}),
)

FINDING_NAMES: tuple[str, ...] = tuple(f.name for f in FINDINGS)
BY_NAME: dict[str, FindingDef] = {f.name: f for f in FINDINGS}
# Findings that carry a size and so can fall below the resolution of a volume size.
SIZED: frozenset[str] = frozenset(f.name for f in FINDINGS if f.size_mm is not None)


def finding(name: str) -> FindingDef:
    """The vocabulary entry for ``name``; KeyError names the known findings."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown finding {name!r}; known: {', '.join(FINDING_NAMES)}") from None


def findings_in_system(system: str) -> tuple[FindingDef, ...]:
    return tuple(f for f in FINDINGS if f.system == system)


@dataclass
class Label:
    """One finding read from a report or planted in a study (a manifest ``labels`` entry).

    ``present`` is True / False, or None when the report is uncertain ("cannot exclude").
    """

    finding: str
    present: bool | None
    side: str | None = None
    location: str | None = None
    size_mm: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "present": self.present,
            "side": self.side,
            "location": self.location,
            "size_mm": self.size_mm,
            "attributes": dict(self.attributes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Label":
        return cls(
            finding=d["finding"],
            present=d.get("present"),
            side=d.get("side"),
            location=d.get("location"),
            size_mm=None if d.get("size_mm") is None else float(d["size_mm"]),
            attributes=dict(d.get("attributes") or {}),
        )


def validate_label(label: Label) -> list[str]:
    """Problems with a label against the vocabulary (empty list = valid)."""
    problems: list[str] = []
    if label.finding not in BY_NAME:
        return [f"unknown finding {label.finding!r}"]
    fd = BY_NAME[label.finding]
    if label.present not in (True, False, None):
        problems.append(f"{fd.name}: present must be true, false or null")
    if label.side is not None and label.side not in SIDES:
        problems.append(f"{fd.name}: side {label.side!r} not in {SIDES}")
    if label.location is not None and fd.locations and label.location not in fd.locations:
        problems.append(f"{fd.name}: location {label.location!r} not allowed")
    for key, value in label.attributes.items():
        if key in fd.attributes and value not in fd.attributes[key]:
            problems.append(f"{fd.name}: attribute {key}={value!r} not in {fd.attributes[key]}")
    return problems


def vocabulary_table() -> list[dict[str, Any]]:
    """The vocabulary as plain dicts (for docs and the UI)."""
    return [
        {
            "name": f.name,
            "display": f.display,
            "system": f.system,
            "section": SYSTEM_HEADINGS[f.system],
            "sides": list(f.sides),
            "locations": list(f.locations),
            "size_mm": list(f.size_mm) if f.size_mm else None,
            "attributes": {k: list(v) for k, v in f.attributes.items()},
        }
        for f in FINDINGS
    ]
