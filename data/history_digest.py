"""Relevant-history digest: the sentences of a patient record that a chest CT report draws on.

Why it exists. A report's clinical information, technique, comparison and impression repeat a
few facts buried anywhere in a record of up to 100K tokens: the reason for the exam, a contrast
allergy, a known cancer, prior thoracic surgery, a prior chest CT finding. The demo decoder is
trained on this CPU with history windows of at most ~1K tokens, and its block-sparse attention
does not reliably pick one sentence out of 16K-100K tokens (issue #4's retrieval numbers). The
digest is placed right before ``[REPORT]`` (``[BOS] record digest [REPORT] ...``), inside the
decoder's local attention window at any record length, and is the source of the decoder's copy
head (``core.decoder.CopyHead``).

How. Rule-based and recall-oriented, no model and no knowledge of how a record was written: the
record is split into lines and sentences; a sentence is kept when it matches one of the
clinical categories below (what a radiologist reads in the requisition and the chart before a
chest CT); repeated sentences (copy-forward text) are kept once, at their last occurrence; each
kept sentence brings the heading of the note it came from (e.g. ``ONCOLOGY NOTE (2021-03-02)``),
which dates it. Over the word budget, categories lower in the list are dropped first and, within
one, older sentences first. What is *not* relevant (a thyroid nodule, a skin cancer, knee
surgery) is often kept too: the decoder, trained on reports, decides what to say.

Pure functions on strings, plus :func:`digest_ids` (the digest's token ids).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# (category, pattern) in priority order: earlier categories survive the word budget first.
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = (
    ("indication", re.compile(
        r"\b(reason for (the )?(exam|examination|study|imaging|referral|scan)|indications?|"
        r"clinical (history|question|concern|information|indication)|imaging (order|request)|"
        r"(requested|ordered) (exam|study|imaging|ct))\b", re.I)),
    ("allergy", re.compile(r"\b(allerg\w*|anaphyla\w*|contrast reaction)\b", re.I)),
    ("oncology", re.compile(
        r"\b(cancer|\w*carcinoma|malignan\w*|lymphoma|metasta\w*|neoplasm|tumou?r|sarcoma|melanoma|"
        r"leuka?emia|myeloma|mesothelioma|chemotherapy|radiotherapy)\b", re.I)),
    ("surgery", re.compile(
        r"\b(surg\w*|\w+ectomy|resection|resected|thoracotomy|sternotomy|transplant\w*|CABG|VATS|"
        r"bypass graft\w*)\b", re.I)),
    ("chest_imaging", re.compile(
        r"\b(nodules?|mass(es)?|opacit\w*|consolidation|effusions?|pneumothorax|emphysema|atelectasis|"
        r"lymphadenopathy|ground[- ]glass|cardiomegaly|hernia|fractures?|bronchiectasis|fibrosis|"
        r"(CT|computed tomography|PET|radiograph|x-?ray)\W+(of the )?chest|chest\W+(CT|radiograph|x-?ray))\b", re.I)),
    ("smoking", re.compile(r"\b(smok\w*|tobacco|pack[- ]years?|cigarettes?)\b", re.I)),
)
CATEGORY_NAMES = tuple(name for name, _ in CATEGORIES)

HEADER = "RELEVANT HISTORY (extracted):"
_WORD = re.compile(r"\w+|[^\w\s]")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
# A note heading: a note's first line, or a line led by an upper-case word of 3+ letters
# (``ONCOLOGY NOTE (2021-03-02)``, ``RADIOLOGY REPORT (...): CT chest``, ``ALLERGIES: ...``).
_HEADING = re.compile(r"^\s*[A-Z][A-Z0-9/&,\- ]{2,}\b")


@dataclass(frozen=True)
class Sentence:
    text: str
    category: str
    position: int  # order in the record (later = more recent in a chronological record)
    heading: str | None


def words(text: str) -> int:
    """Approximate token count (words and punctuation marks)."""
    return len(_WORD.findall(text))


def category_of(sentence: str) -> str | None:
    for name, pat in CATEGORIES:
        if pat.search(sentence):
            return name
    return None


def relevant_sentences(text: str) -> list[Sentence]:
    """Every relevant sentence of ``text`` (deduplicated, last occurrence kept), in record order."""
    found: dict[str, Sentence] = {}
    heading: str | None = None
    blank = True
    pos = 0
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line:  # a blank line ends a note
            blank, heading = True, None
            continue
        is_heading = blank or bool(_HEADING.match(line))
        blank = False
        parts = [p.strip() for p in _SENT_SPLIT.split(line) if p.strip()]
        for i, part in enumerate(parts):
            pos += 1
            cat = category_of(part)
            if cat is None:
                continue
            own_heading = heading if not (is_heading and i == 0) else None
            key = part.lower()
            found.pop(key, None)  # keep the last occurrence (re-inserted at the end)
            found[key] = Sentence(part, cat, pos, own_heading)
        if is_heading:
            # the heading is the line's first sentence (a lone title, or "ALLERGIES: x" lines)
            heading = parts[0] if parts else line
    return sorted(found.values(), key=lambda s: s.position)


def digest(text: str | None, max_words: int = 160) -> str:
    """The relevant-history digest of a record, at most about ``max_words`` words ("" when the
    record holds nothing relevant or ``max_words`` is 0)."""
    if not text or max_words <= 0:
        return ""
    sents = relevant_sentences(text)
    if not sents:
        return ""
    rank = {name: i for i, name in enumerate(CATEGORY_NAMES)}
    budget = max_words - words(HEADER)
    chosen: list[Sentence] = []
    shown_headings: set[str] = set()
    for s in sorted(sents, key=lambda s: (rank[s.category], -s.position)):
        cost = words(s.text) + (words(s.heading) if s.heading and s.heading not in shown_headings else 0)
        if cost > budget:
            continue
        budget -= cost
        chosen.append(s)
        if s.heading:
            shown_headings.add(s.heading)
    lines = [HEADER]
    last_heading = None
    for s in sorted(chosen, key=lambda s: s.position):
        if s.heading and s.heading != last_heading and s.heading != lines[-1]:
            lines.append(s.heading)
        last_heading = s.heading
        lines.append(s.text)
    return "\n".join(lines) if len(lines) > 1 else ""


def digest_ids(tokenizer, text: str | None, max_words: int) -> list[int]:
    """Token ids of :func:`digest` (``[]`` when it is empty); ``tokenizer`` is a
    ``data.tokenizer.ReportTokenizer``."""
    d = digest(text, max_words)
    return tokenizer.encode(d) if d else []


# What a chest CT report should carry from the record (data.report_consistency.RecordAgreement):
# a known malignancy and a prior lung resection.
_CANCER = re.compile(r"\b(?:([a-z]+) )?(cancer|carcinoma|adenocarcinoma|lymphoma|melanoma|myeloma|sarcoma|mesothelioma|"
                     r"leuka?emia)\b", re.I)
_RESECTION = re.compile(r"\b(?:right|left) (?:(?:upper|middle|lower) lobectomy|pneumonectomy)\b", re.I)
_NOT_A_NAME = frozenset("a an the of with and or for from no known history prior metastatic recurrent suspected "
                        "possible family screening".split())
_NOT_RELEVANT = re.compile(r"\b(basal cell|skin|screening|family history|mother|father|brother|sister)\b", re.I)


def record_facts(text: str | None) -> tuple[str, ...]:
    """The facts of a patient record that a chest CT report should carry, as lower-case phrases to
    look for in it: each malignancy an oncology sentence names (the cancer word with the word before
    it when that is part of the name: "prostate cancer", "cell carcinoma", "melanoma"), and each
    prior lung resection a surgery sentence names ("right upper lobectomy"). Left out: a sentence
    about screening, a relative or a skin cancer. Rule-based like the digest; ``()`` when none."""
    if not text:
        return ()
    out: dict[str, None] = {}
    for s in relevant_sentences(text):
        if _NOT_RELEVANT.search(s.text):
            continue
        if s.category == "oncology":
            for m in _CANCER.finditer(s.text):
                before = (m.group(1) or "").lower()
                name = m.group(2).lower()
                out[f"{before} {name}" if before and before not in _NOT_A_NAME else name] = None
        if s.category in ("surgery", "oncology"):
            for m in _RESECTION.finditer(s.text):
                out[m.group(0).lower()] = None
    return tuple(out)
