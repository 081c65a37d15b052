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

from data.vocab import BY_NAME, FINDING_NAMES, SYSTEMS

LEAD = "Calls:"
NONE = "none"
# report words for the machine names where they differ from "name with spaces"
_WORDS = {"ground_glass_opacity": "ground-glass opacity"}


def finding_phrase(name: str, side: str | None = None, location: str | None = None, size_mm: float | None = None) -> str:
    """One call in report words: the location for findings that take one (a lobe, nodal
    station or spine region), else the side for findings that take one, then the finding, then
    its measured size when there is one ("right lower lobe nodule 12 mm")."""
    phrase = _located_phrase(name, side, location)
    return f"{phrase} {float(size_mm):g} mm" if size_mm is not None else phrase


def _located_phrase(name: str, side: str | None, location: str | None) -> str:
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


def finding_prompt(calls: Sequence[tuple[str, str | None, str | None]], by_system: bool = False) -> str:
    """``[(name, side, location), ...]`` (findings called present) -> the prompt line, findings
    in vocabulary order: "Calls: cardiomegaly; right lower lobe nodule." / "Calls: none.".

    ``by_system``: the calls grouped under the Findings' organ-system headings, in report order,
    every system named ("Calls: Lungs and airways: right lower lobe nodule. Pleura: none. Heart
    and mediastinum: cardiomegaly. Bones: none. Upper abdomen: none."), so that the decoder
    writing a system's line finds that system's calls under the same heading it is writing
    (``ModelConfig.finding_prompt_by_system``). A finding outside the vocabulary goes last, under
    no heading."""
    order = {n: i for i, n in enumerate(FINDING_NAMES)}
    ranked = sorted(calls, key=lambda c: order.get(c[0], len(order)))
    if not by_system:
        phrases = [finding_phrase(*c) for c in ranked]
        return f"{LEAD} {'; '.join(phrases) if phrases else NONE}."
    parts = []
    for key, heading in SYSTEMS:
        phrases = [finding_phrase(*c) for c in ranked if c[0] in BY_NAME and BY_NAME[c[0]].system == key]
        parts.append(f"{heading}: {'; '.join(phrases) if phrases else NONE}.")
    other = [finding_phrase(*c) for c in ranked if c[0] not in BY_NAME]
    if other:
        parts.append(f"{'; '.join(other)}.")
    return f"{LEAD} {' '.join(parts)}"


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


# --------------------------------------------------------------------------- the record's locations
# A resected lobe as records name it: "right upper lobectomy", "lobectomy of the left lower lobe",
# "RUL lobectomy" (word boundaries; "bilobectomy" and "segmentectomy" are not lobectomies of one lobe).
_LOBE_ABBR = {"rul": "right upper lobe", "rml": "right middle lobe", "rll": "right lower lobe",
              "lul": "left upper lobe", "lll": "left lower lobe"}
_LOBECTOMY = re.compile(
    r"\b(?:(right|left)\s+(upper|middle|lower)\s+(?:lobe\s+)?lobectomy"
    r"|lobectomy\s+of\s+the\s+(right|left)\s+(upper|middle|lower)\s+lobe"
    r"|(RUL|RML|RLL|LUL|LLL)\s+lobectomy)\b", re.I)
_PLANNED_AFTER = re.compile(r"^[^.\n]{0,30}\b(planned|scheduled|recommended|proposed|considered)\b", re.I)
_NEGATED = re.compile(r"\b(no|not|denies|without|never|declined|considered for|candidate for|planned|scheduled)\b[^.\n]{0,40}$", re.I)


def record_locations(text: str | None) -> dict[str, str]:
    """Where the patient's record locates a finding the image heads may call, as ``{finding:
    location}`` in vocabulary words:

    * the lobe of a lobectomy ("Surgical history: right upper lobectomy in 2015" ->
      ``{"lobectomy": "right upper lobe"}``). The operative history is the authority on which lobe
      was resected; the heads see the staple line and guess the lobe from where it lies (session
      21's demo heads called the lower lobe for 9 of 22 right upper lobectomies);
    * the lobe of a known lung nodule (a prior CT: "There is a 9 mm solid nodule in the left lower
      lobe." -> ``{"nodule": "left lower lobe"}``; :func:`record_nodule_lobe`). A follow-up report
      describes that nodule where it was; the heads named the wrong lobe for 27 of 66 test
      follow-ups (session 23).

    Nothing is returned for a finding when the record names two different lobes, or only in a
    negated or planned mention ("no prior lobectomy", "scheduled for left lower lobectomy"): the
    heads' own location stands then. Pure text rules; no patient data leaves this function."""
    out = {}
    lobectomy = _record_lobectomy_lobe(text)
    if lobectomy:
        out["lobectomy"] = lobectomy
    nodule = record_nodule_lobe(text)
    if nodule:
        out["nodule"] = nodule
    return out


def _record_lobectomy_lobe(text: str | None) -> str | None:
    found: set[str] = set()
    for m in _LOBECTOMY.finditer(text or ""):
        line_start = max(text.rfind("\n", 0, m.start()), text.rfind(".", 0, m.start())) + 1
        if _NEGATED.search(text[line_start:m.start()]) or _PLANNED_AFTER.search(text[m.end():]):
            continue
        if m.group(5):
            found.add(_LOBE_ABBR[m.group(5).lower()])
        else:
            side, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            found.add(f"{side.lower()} {part.lower()} lobe")
    found = {lobe for lobe in found if not (lobe.startswith("left") and " middle " in lobe)}  # no left middle lobe
    return found.pop() if len(found) == 1 else None


# A lobe named in a sentence ("right upper lobe", "RUL"; not "right upper lobectomy"), and a denied
# nodule ("no pulmonary nodules", "without nodularity").
_LOBE = re.compile(r"\b(?:(right|left)\s+(upper|middle|lower)\s+lobe|(RUL|RML|RLL|LUL|LLL))\b", re.I)
_NO_NODULE = re.compile(r"\b(no|without|negative\s+for|resolved)\b[^.\n]{0,30}\bnodul", re.I)
_SIZE_MM = re.compile(r"(\d+(?:\.\d+)?)\s*mm\b", re.I)
_LUNG_WORDS = re.compile(r"\b(lobe|lobes|lung|lungs|pulmonary|lingula\w*|RUL|RML|RLL|LUL|LLL)\b", re.I)
_NOT_LUNG = re.compile(r"\b(thyroid|liver|hepatic|renal|kidney|adrenal|breast|skin|cutaneous|parotid|pancrea\w*)\b", re.I)


def _lung_nodule_sentences(text: str | None) -> list[str]:
    """The record's sentences about a lung nodule: "nodule" with a lobe, lung, "pulmonary" or a lobe
    abbreviation, not a thyroid, liver, skin... nodule."""
    from data.labeler import split_sentences

    return [s for s in split_sentences(text or "")
            if "nodul" in s.lower() and _LUNG_WORDS.search(s) and not _NOT_LUNG.search(s)]


def record_nodule_lobe(text: str | None) -> str | None:
    """The lobe of the lung nodule the record describes: the one lobe named in its sentences about a
    pulmonary nodule (the sentences :func:`record_prior_nodule_mm` reads: a "nodule" with a lobe,
    lung or "pulmonary", not a thyroid, liver or skin nodule; a sentence that denies a nodule is
    skipped). None when no such sentence names a lobe, or they name more than one."""
    found: set[str] = set()
    for sent in _lung_nodule_sentences(text):
        if _NO_NODULE.search(sent):
            continue
        for m in _LOBE.finditer(sent):
            found.add(_LOBE_ABBR[m.group(3).lower()] if m.group(3) else f"{m.group(1).lower()} {m.group(2).lower()} lobe")
    found.discard("left middle lobe")
    return found.pop() if len(found) == 1 else None


def with_record_locations(calls: Sequence[tuple[str, str | None, str | None]],
                          record: Mapping[str, str] | None) -> list[tuple[str, str | None, str | None]]:
    """The calls ``[(name, side, location)]`` with the location (and its side) the record states for
    a finding the heads called present (:func:`record_locations`); presence stays the heads' call."""
    if not record:
        return list(calls)
    out = []
    for name, side, location, *rest in calls:
        loc = record.get(name)
        if loc:
            location, side = loc, loc.split()[0] if loc.split()[0] in ("left", "right") else side
        out.append((name, side, location, *rest))
    return out


def known_locations(record: Mapping[str, str] | None, detected: Mapping[str, str] | None
                    ) -> tuple[dict[str, str] | None, tuple[str, ...]]:
    """Where a call of each finding goes: the record's locations (:func:`record_locations`) over a
    detector's (``data.detectors``: a lymph node's station) -> (the merged map or None, the findings
    only a detector placed, for the findings table's provenance)."""
    record, detected = dict(record or {}), dict(detected or {})
    placed = tuple(sorted(set(detected) - set(record)))
    return {**detected, **record} or None, placed


def record_prior_nodule_mm(text: str | None) -> float | None:
    """The size of the lung nodule the record describes (a prior CT: "There is a 9 mm solid nodule
    in the right lower lobe."): the one size stated in the record's sentences about a pulmonary
    nodule (a "nodule" with a lobe, lung or "pulmonary", not a thyroid, liver or skin nodule).
    None when the record states none or more than one (two nodules, or a size that changed
    between priors): then nothing is assumed."""
    sizes = set()
    for sent in _lung_nodule_sentences(text):
        sizes.update(float(m) for m in _SIZE_MM.findall(sent) if 2.0 <= float(m) <= 30.0)
    return sizes.pop() if len(sizes) == 1 else None


MEASURED = ("nodule",)  # findings whose call carries a measured size (data.nodule_measure)


def measured_size(calls: Sequence[tuple], name: str = "nodule") -> float | None:
    """The measured size a call of ``name`` carries (its fourth field, :func:`with_measurements`)."""
    return next((c[3] for c in calls if c[0] == name and len(c) > 3), None)


def with_measurements(calls: Sequence[tuple], sizes_mm: Mapping[str, float] | None) -> list[tuple]:
    """The calls with the measured size appended to a called nodule: the measurement on the called
    side, else the best in either lung (``sizes_mm``: ``data.detectors.read_study``).
    A call without a measurement stays as it was (three fields)."""
    if not sizes_mm:
        return list(calls)
    out = []
    for c in calls:
        name, side = c[0], c[1]
        size = sizes_mm.get(side) if side in ("left", "right") else None
        size = sizes_mm.get("any") if size is None and side not in ("left", "right") else size
        out.append((*c[:3], size) if name in MEASURED and size is not None else tuple(c))
    return out
