"""The finding prompt: the finding calls as a short line of text that the decoder reads right
before it writes the report (``ModelConfig.finding_prompt``).

The decoder sequence becomes ``[BOS] history (digest) prompt [REPORT] report``. The prompt is the
calls of the finding heads at inference and the study's labels in training, written in report
words ("Calls: cardiomegaly; right lower lobe nodule."), so that the decoder's self-attention
and its copy head (the prompt is a copy source, like the digest) carry the findings table into
the text. This follows PromptMRG's diagnosis-driven prompts (Jin et al., AAAI 2024). The report
is still written token by token by the decoder; the prompt is never shown as report text.

The **acquisition line** (``ModelConfig.acquisition_prompt``) goes before it: whether IV contrast
was given and the slice thickness, from the study's DICOM header ("Acquisition: no IV contrast,
5 mm slices."), in training and at inference alike, so that the technique section states what
the scanner did rather than what most studies had. A radiologist writes the technique from the
protocol, not from the images; before this line a contrast allergy in the record was the
decoder's only clue, and it carried 21 % of those facts (session 10).

Pure functions over finding names, sides, locations and de-identified study metadata; no model code.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from data.vocab import BY_NAME, FINDING_NAMES

LEAD = "Calls:"
NONE = "none"
# report words for the machine names where they differ from "name with spaces"
_WORDS = {"ground_glass_opacity": "ground-glass opacity"}


def finding_phrase(name: str, side: str | None = None, location: str | None = None) -> str:
    """One call in report words: the location for findings that take one (a lobe, nodal
    station or spine region), else the side for findings that take one, then the finding."""
    fd = BY_NAME.get(name)  # None: a finding outside the vocabulary (no side or location then)
    word = _WORDS.get(name, name.replace("_", " "))
    if name == "lobectomy" and location and location.endswith(" lobe"):
        # the report's words for it: "right upper lobectomy", not "right upper lobe lobectomy",
        # so that the decoder can copy the procedure as a radiologist names it
        return f"{location[:-len(' lobe')]} lobectomy"
    if fd is not None and fd.locations and location and location != "unspecified":
        return f"{location} {word}"
    if fd is not None and fd.sides and side in fd.sides:
        return f"{side} {word}"
    return word


def finding_prompt(calls: Sequence[tuple[str, str | None, str | None]]) -> str:
    """``[(name, side, location), ...]`` (findings called present) -> the prompt line, findings
    in vocabulary order: "Calls: cardiomegaly; right lower lobe nodule." / "Calls: none."."""
    order = {n: i for i, n in enumerate(FINDING_NAMES)}
    phrases = [finding_phrase(*c) for c in sorted(calls, key=lambda c: order.get(c[0], len(order)))]
    return f"{LEAD} {'; '.join(phrases) if phrases else NONE}."


ACQ_LEAD = "Acquisition:"
UNKNOWN = "unknown"
# Study descriptions that say whether contrast was given (used when the header has no agent).
_NO_CONTRAST = re.compile(r"\b(without|w/o|wo|non[- ]?(contrast|enhanced)|noncon|unenhanced|plain)\b", re.I)
_CONTRAST = re.compile(r"\b(with (iv )?contrast|w/ ?(iv )?contrast|w (iv )?contrast|c\+|contrast[- ]enhanced|cect|angio\w*)\b", re.I)


def contrast_from_metadata(md: Mapping) -> bool | None:
    """Was IV contrast given, from ``data.dicom``'s de-identified metadata: the ContrastBolusAgent
    when the header states one (or states "none"), else the study description's wording ("CT CHEST
    WITHOUT CONTRAST", "CT THORAX W/ CONTRAST"); None when neither says (NIfTI, PNG, silent headers)."""
    if md.get("contrast_agent_stated"):
        return bool(md.get("contrast_agent_present"))
    desc = str(md.get("study_description") or "")
    if _NO_CONTRAST.search(desc):
        return False
    if _CONTRAST.search(desc):
        return True
    return None


def acquisition_phrase(contrast: bool | None, slice_mm: float | None) -> str:
    """"Acquisition: IV contrast, 2.5 mm slices." / "Acquisition: no IV contrast." /
    "Acquisition: unknown." (the thickness as the technique templates write it, ``:g``)."""
    parts = []
    if contrast is not None:
        parts.append("IV contrast" if contrast else "no IV contrast")
    if slice_mm is not None and slice_mm > 0:
        parts.append(f"{round(float(slice_mm), 2):g} mm slices")
    return f"{ACQ_LEAD} {', '.join(parts) if parts else UNKNOWN}."


def contrast_of_line(line: str | None) -> bool | None:
    """The contrast an acquisition line states: True ("IV contrast"), False ("no IV contrast"),
    None (no line, "unknown", or a thickness alone)."""
    body = (line or "").strip()
    if not body.startswith(ACQ_LEAD):
        return None
    parts = [p.strip() for p in body[len(ACQ_LEAD):].strip().rstrip(".").split(",")]
    if "no IV contrast" in parts:
        return False
    if "IV contrast" in parts:
        return True
    return None


def without_thickness(line: str) -> str:
    """An acquisition line without its slice thickness ("Acquisition: IV contrast, 5 mm slices." ->
    "Acquisition: IV contrast."; "unknown" when nothing else is left). For a model whose training
    data had one thickness only (``ModelConfig.acquisition_thickness`` False): an unseen thickness
    in its prompt broke the demo decoder's report structure (docs/training.md, session 16)."""
    body = line.strip()
    if not (body.startswith(ACQ_LEAD) and body.endswith(".")):
        return line
    parts = [p for p in body[len(ACQ_LEAD):-1].strip().split(", ") if p and not p.endswith("mm slices") and p != UNKNOWN]
    return f"{ACQ_LEAD} {', '.join(parts) if parts else UNKNOWN}."


def study_acquisition(study) -> str:
    """The acquisition line of a loaded study (a ``data.study.Study``: its metadata, kind and
    spacing): the header's slice thickness, else the volume's slice spacing; none for radiographs."""
    md = study.metadata
    if study.kind == "radiograph":
        return acquisition_phrase(contrast_from_metadata(md), None)
    return acquisition_phrase(contrast_from_metadata(md), md.get("slice_thickness_mm") or study.spacing_mm[0])
