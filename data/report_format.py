"""The structured report format: section names and headings, formatting, tolerant parsing,
and the text cleaning used for BLEU.

A report is a dict ``{section_key: text}`` with keys ``SECTION_KEYS``. The Findings text holds
one line per organ system, ``"Lungs and airways: ..."`` (headings in ``data.vocab.SYSTEMS``).
"""
from __future__ import annotations

import re

from data.vocab import SYSTEMS

SECTIONS: tuple[tuple[str, str], ...] = (
    ("clinical_information", "CLINICAL INFORMATION"),
    ("technique", "TECHNIQUE"),
    ("comparison", "COMPARISON"),
    ("findings", "FINDINGS"),
    ("impression", "IMPRESSION"),
)
SECTION_KEYS: tuple[str, ...] = tuple(k for k, _ in SECTIONS)
SECTION_HEADINGS: dict[str, str] = dict(SECTIONS)

# Headings other reports use for the same sections (lower case, without the colon).
_ALIASES: dict[str, str] = {
    "clinical information": "clinical_information",
    "clinical history": "clinical_information",
    "clinical indication": "clinical_information",
    "history": "clinical_information",
    "indication": "clinical_information",
    "indications": "clinical_information",
    "reason for exam": "clinical_information",
    "technique": "technique",
    "procedure": "technique",
    "examination": "technique",
    "comparison": "comparison",
    "comparisons": "comparison",
    "prior studies": "comparison",
    "findings": "findings",
    "finding": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "summary": "impression",
}
_HEADING_RE = re.compile(
    r"^[ \t]*(" + "|".join(sorted((re.escape(a) for a in _ALIASES), key=len, reverse=True)) + r")[ \t]*:[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_SYSTEM_RE = re.compile(
    r"^[ \t]*(" + "|".join(re.escape(h) for _, h in SYSTEMS) + r")[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE
)


def empty_sections() -> dict[str, str]:
    return {k: "" for k in SECTION_KEYS}


def format_findings(systems: dict[str, str]) -> str:
    """One line per organ system that has text, in report order: ``"Pleura: No effusion."``."""
    lines = [f"{heading}: {systems[key].strip()}" for key, heading in SYSTEMS if systems.get(key, "").strip()]
    return "\n".join(lines)


def split_findings(findings: str) -> dict[str, str]:
    """Inverse of :func:`format_findings`. Text before any sub-heading goes to key ``"other"``."""
    out: dict[str, str] = {}
    by_heading = {h.lower(): k for k, h in SYSTEMS}
    matches = list(_SYSTEM_RE.finditer(findings))
    head = findings[: matches[0].start()] if matches else findings
    if head.strip():
        out["other"] = head.strip()
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(findings)
        out[by_heading[m.group(1).lower()]] = findings[m.end():end].strip()
    return out


def format_report(sections: dict[str, str]) -> str:
    """The report as text: ``HEADING:`` lines followed by the section text, blank line between.

    Empty sections are written as "None." except Findings/Impression which are always present.
    Unknown keys raise ValueError.
    """
    unknown = set(sections) - set(SECTION_KEYS)
    if unknown:
        raise ValueError(f"unknown report sections {sorted(unknown)}; expected {SECTION_KEYS}")
    blocks = []
    for key, heading in SECTIONS:
        text = (sections.get(key) or "").strip()
        if not text and key in ("clinical_information", "technique", "comparison"):
            text = "None."
        blocks.append(f"{heading}:\n{text}")
    return "\n\n".join(blocks) + "\n"


def parse_report(text: str) -> dict[str, str]:
    """Sections of a report written by :func:`format_report` or by someone else.

    Headings are matched case-insensitively at line starts, with a colon, including common
    aliases (INDICATION, HISTORY, CONCLUSION, ...). Text before the first heading, or a report
    with no headings at all, is taken as Findings. Missing sections come back as "".
    """
    out = empty_sections()
    matches = list(_HEADING_RE.finditer(text))
    head = text[: matches[0].start()] if matches else text
    if head.strip():
        out["findings"] = head.strip()
    for i, m in enumerate(matches):
        key = _ALIASES[m.group(1).lower()]
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end():end].strip()
        if key in ("clinical_information", "technique", "comparison") and body.lower() in ("none.", "none"):
            body = ""
        out[key] = (out[key] + "\n" + body).strip() if out[key] else body
    return out


_ITEM_RE = re.compile(r"^\s*(\d+)\.\s*(.*\S)\s*$")


def drop_repeated_items(text: str) -> str:
    """A numbered list (every non-empty line "N. item", as an impression) without the items that
    repeat an earlier one (same words, case and spacing aside), renumbered from 1; any other text
    as it is. A decoder that loops writes "1. Left lower lobe atelectasis. 2. Left lower lobe
    atelectasis." (18-34 of 310 test reports in session 18); a radiologist never lists an item twice."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    items = [_ITEM_RE.match(ln) for ln in lines]
    if not lines or not all(items):
        return text
    seen: set[str] = set()
    kept: list[str] = []
    for m in items:
        key = " ".join(m.group(2).lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(m.group(2))
    if len(kept) == len(items):
        return text
    return "\n".join(f"{i}. {item}" for i, item in enumerate(kept, 1))


_PUNCT_RE = re.compile(r"([^\w\s])")


def clean_for_bleu(text: str) -> list[str]:
    """Tokens for BLEU: lower case, every punctuation character split off as its own token,
    whitespace split. ``"No effusion. 9-mm nodule."`` -> ``["no", "effusion", ".", "9", "-", "mm", "nodule", "."]``.
    """
    return _PUNCT_RE.sub(r" \1 ", text.lower()).split()


def findings_impression(sections: dict[str, str], keep_subheadings: bool = False) -> str:
    """The text BLEU scores by default: Findings then Impression. Organ-system sub-headings
    ("Pleura:") are structure every report repeats, so they are dropped unless asked for."""
    findings = sections.get("findings", "")
    if not keep_subheadings:
        findings = _SYSTEM_RE.sub("", findings)
    return "\n".join(t.strip() for t in (findings, sections.get("impression", "")) if t.strip())
