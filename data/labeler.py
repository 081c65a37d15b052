"""Rule-based report labeller (NegEx-style) over the finding vocabulary.

``label_report(text)`` reads a report (ours, or real chest X-ray / CT language) and returns one
:class:`~data.vocab.Label` per vocabulary finding the report mentions, with ``present`` True,
False (negated: "no pleural effusion", "has resolved") or None (uncertain: "cannot exclude",
"may represent"), plus side, location, size and attributes read from the same clause.

How it works, per sentence: find mentions of each finding with regular expressions (some
phrasings carry their own polarity, e.g. "heart size is normal" -> no cardiomegaly); then the
nearest negation or uncertainty cue before the mention (within 12 words, not across "but",
"however", ...) or after it ("is not seen", "cannot be excluded") decides the polarity. Report
level: a finding is present if any mention is, else uncertain if any is, else absent.
Hand-written because the maintained NegEx ports (negspacy, pyConTextNLP) need spaCy models or
an ontology the project cannot download; this is a few dozen rules over our own vocabulary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from data.report_format import parse_report
from data.vocab import FINDING_NAMES, NODE_STATION_SIDE, NODE_STATIONS, Label

_W = r"(?:[\w/-]+\s+)"  # one word and its trailing space

# finding -> list of (regex, polarity). polarity True: the phrase asserts the finding (subject
# to cues); False: the phrase itself says it is absent; None: the phrase itself is a hedge.
_PATTERNS: dict[str, list[tuple[str, bool | None]]] = {
    "cardiomegaly": [
        (r"\bborderline\s+(?:cardiomegaly|heart size|cardiac size|enlarge\w*(?:\s+(?:heart|cardiac silhouette))?)", None),
        (r"\b(?:heart|cardiac)\s+(?:size\s+)?(?:is\s+|appears\s+)?borderline(?:\s+enlarged|\s+in size)?", None),
        (r"\bnormal(?:-sized)?\s+(?:heart|cardiac|cardiomediastinal|cardiopericardial)\b(?:\s+(?:size|silhouette|contours?|shadow))?", False),
        (r"\bnormal\s+size\s+(?:and\s+\w+\s+)?of\s+the\s+(?:heart|cardiac\s+silhouette)\b", False),
        (r"\b(?:heart|cardiac|cardiomediastinal|cardiopericardial)\b(?:(?!enlarg|cardiomegaly|large\b|prominen)[^.;]){0,70}?"
         r"\b(?:within normal limits|normal(?:\s+in\s+size)?|unremarkable|not\s+enlarged|upper limits? of normal|top normal|"
         r"stable and normal|normal limits|negative)\b", False),
        (r"\bcardiomegaly\b|\bcardiac\s+enlargement\b|\benlargement\s+of\s+the\s+(?:heart|cardiac silhouette)\b", True),
        (r"\benlarged\s+(?:heart|cardiac\s+(?:silhouette|shadow|size))\b", True),
        (r"\b(?:heart|cardiac\s+silhouette|cardiac\s+shadow|heart\s+size|cardiac\s+size|cardiomediastinal\s+silhouette)\b"
         r"[^.;]{0,30}?\b(?:enlarged|enlargement|large|prominent)\b", True),
    ],
    "pericardial_effusion": [
        (r"\bpericardial\s+(?:or\s+pleural\s+|and\s+pleural\s+)?(?:effusions?|fluid)\b", True),
        (r"\bpleural\s+(?:or|and|,)\s+pericardial\s+effusions?\b", True),
        (r"\beffusion\s+in\s+the\s+pericardium\b", True),
    ],
    "pleural_effusion": [
        (r"\bblunt(?:ing|ed)\s+of\s+(?:the\s+)?(?:\w+\s+){0,2}costophrenic\s+(?:angles?|recess(?:es)?|sulc(?:us|i))\b", None),
        (r"\b(?:costophrenic\s+(?:angles?|recess(?:es)?|sulc(?:us|i)))\s+(?:is|are)\s+blunt(?:ed|ing)?\b", None),
        (r"\b(?:costophrenic|posterior|lateral)\s+(?:angle|sulc(?:us|i))\s+blunting\b", None),
        (r"\bpleural\s+(?:or\s+pericardial\s+|and\s+pericardial\s+)?effusions?\b", True),
        (r"(?<!pericardial\s)(?<!pericardial or\s)(?<!pericardial and\s)\beffusions?\b(?!\s+in\s+the\s+pericardium)", True),
        (r"\bpleural\s+fluid\b|\bhydrothora(?:x|ces)\b", True),
    ],
    "pneumothorax": [(r"\bpneumothora(?:x|ces)\b|\bptx\b", True)],
    "consolidation": [
        (r"\bconsolidati(?:on|ons|ve)\b|\bconsolidated\b", True),
        (r"\bair[\s-]?space\s+(?:disease|opacit(?:y|ies)|process|consolidation|filling)\b", True),
        (r"\bfocal\s+air[\s-]?space\b", True),
        (r"\binfiltrates?\b|\bpneumonias?\b|\bbronchopneumonia\b", True),
    ],
    "ground_glass_opacity": [(r"\bground[\s-]glass\b(?![\w\s-]{0,30}\bnodul)", True)],
    "nodule": [
        (r"(?<!thyroid\s)\b(?:micro)?nodules?\b|\bnodular\s+(?:opacit(?:y|ies)|densit(?:y|ies)|lesions?|focus|foci)\b", True),
        (r"\bgranulomas?\b|\bgranulomata\b", True),
    ],
    "mass": [(r"\bmass(?:es)?\b(?!\s+effect)|\bmasslike\b|\bmass-like\b", True)],
    "atelectasis": [(r"\batelecta(?:sis|ses|tic)\b", True)],
    "emphysema": [(r"\bemphysema(?:tous)?\b|\bcopd\b|\bchronic\s+obstructive\s+pulmonary\s+disease\b", True)],
    "lobectomy": [(r"\blobectom(?:y|ies)\b|\bpneumonectomy\b", True)],
    "lymphadenopathy": [
        (r"\blymph\s+nodes?\s+(?:are|is)\s+(?:not\s+enlarged|normal(?:\s+in\s+size)?|within normal limits|unremarkable)", False),
        (r"\b(?:lymph)?adenopath(?:y|ies)\b", True),
        (r"\benlarged\s+(?:\w+\s+){0,4}?(?:lymph\s+)?nodes?\b", True),
        (r"\blymph\s+nodes?\s+(?:\w+\s+){0,3}?(?:enlargement|enlarged|is\s+enlarged|are\s+enlarged)\b", True),
        (r"\blymph\s+node\s+enlargement\b", True),
    ],
    "hiatal_hernia": [(r"\bhiat(?:al|us)\s+hernias?\b", True)],
    "fracture": [
        (r"\b(?:bony|osseous|skeletal)\s+(?:structures|thorax|findings)?[^.;]{0,30}?\b(?:(?:are|is|appears?)\s+)?"
         r"(?:grossly\s+)?(?:intact|unremarkable|normal|within normal limits)\b", False),
        (r"\b(?:bony|osseous|skeletal)\b[^.;]{0,100}?\bwithout\s+(?:an?\s+)?acute\s+(?:abnormalit(?:y|ies)|fractures?|findings?)\b", False),
        (r"\b(?:bony|osseous|skeletal)\s+(?:structures|thorax)\s+(?:grossly\s+)?(?:intact|unremarkable|normal)\b", False),
        (r"\bno\s+(?:acute\s+|displaced\s+|focal\s+)?(?:bony|osseous|skeletal)\s+(?:abnormalit(?:y|ies)|injur(?:y|ies)|findings?|changes?|"
         r"lesions?\s+or\s+fractures?)\b", False),
        (r"\bfractur(?:e|es|ed)\b|\b(?:compression|wedge|wedging)\s+(?:\w+\s+)?deformit(?:y|ies)\b", True),
    ],
    "bone_lesion": [
        (r"\b(?:lytic|sclerotic|blastic|osteolytic|destructive|aggressive|suspicious)\s+(?:\w+\s+){0,2}?(?:bone\s+|osseous\s+|bony\s+)?lesions?\b", True),
        (r"\b(?:bone|osseous|bony)\s+(?:lesions?|metastas[ie]s)\b|\bosseous\s+metastatic\b", True),
    ],
}
_COMPILED = {f: [(re.compile(p, re.IGNORECASE), pol) for p, pol in pats] for f, pats in _PATTERNS.items()}

_NEG_PRE = re.compile(
    r"\b(?:no|not|without|negative\s+for|free\s+of|clear\s+of|absence\s+of|absent|resolution\s+of|resolved|neither|nor|"
    r"no\s+evidence\s+of|no\s+signs?\s+of|ruled\s+out|removal\s+of|interval\s+resolution\s+of)\b", re.IGNORECASE)
_UNC_PRE = re.compile(
    r"\b(?:may|might|possible|possibly|probable|probably|likely|questionable|question\s+of|cannot\s+(?:be\s+)?exclude[d]?|"
    r"can\s+not\s+(?:be\s+)?exclude[d]?|cannot\s+rule\s+out|can\s+not\s+rule\s+out|not\s+(?:be\s+)?excluded|"
    r"suspicious\s+for|suspicion\s+(?:of|for)|concerning\s+for|suggestive\s+of|suggesting|suggests?|could|versus|vs\.?|"
    r"equivocal|indeterminate|rule\s+out|r/o|differential(?:\s+diagnosis)?\s+includes?|presumed|suspected)\b", re.IGNORECASE)
_PSEUDO = re.compile(
    r"\b(?:no\s+(?:significant\s+)?(?:interval\s+)?change|not\s+(?:significantly\s+)?changed|no\s+(?:significant\s+)?increase|"
    r"no\s+(?:significant\s+)?decrease|not\s+only|without\s+(?:significant\s+)?(?:interval\s+)?change|not\s+increased|"
    r"no\s+longer\s+increasing)\b", re.IGNORECASE)
_NEG_POST = re.compile(
    r"^\W*(?:(?:is|are|was|were|has\s+been|have\s+been)\s+)?(?:not\s+(?:seen|identified|present|visualized|demonstrated|"
    r"appreciated|evident|noted|detected|enlarged)|absent|(?:has|have)?\s*resolved|no\s+longer\s+(?:seen|visualized|present|"
    r"evident|identified))\b", re.IGNORECASE)
_UNC_POST = re.compile(
    r"^\W*(?:(?:is|are)\s+)?(?:(?:cannot|can\s+not|could\s+not|not)\s+(?:be\s+)?(?:excluded|ruled\s+out)|possible|suspected|"
    r"questioned|likely|(?:is|are)\s+(?:possible|suspected|likely)|not\s+excluded|could\s+be\s+present|may\s+be\s+present)\b",
    re.IGNORECASE)
_TERMINATOR = re.compile(
    r"\b(?:but|however|although|though|except|aside\s+from|apart\s+from|whereas|while|which)\b|,\s*(?:and\s+)?there\b|"
    r"\bthere\s+(?:is|are)\s+(?!no\b)", re.IGNORECASE)

_SCOPE_WORDS = 12  # radiology lists are long: "No focal airspace consolidation, pleural effusion or pneumothorax"
_POST_WORDS = 6

_LOBE_RE = re.compile(r"\b(right|left)\s+(upper|middle|lower)\s+lob(?:e|ar|ectomy)\b|\b(lingula|lingular)\b", re.IGNORECASE)
_SIDE_RE = re.compile(r"\b(right|left|bilateral(?:ly)?|both|bibasilar|bibasal)\b", re.IGNORECASE)
_SIZE_RE = re.compile(r"\b(\d+(?:\.\d+)?)\s*(?:-\s*)?(mm|cm|millimeters?|centimeters?)\b", re.IGNORECASE)
_FROM_TO_RE = re.compile(r"\bfrom\s+\d+(?:\.\d+)?\s*(?:mm|cm)\s+to\s+(\d+(?:\.\d+)?)\s*(mm|cm)\b", re.IGNORECASE)
_LEVEL_RE = re.compile(r"\b([TL])(\d{1,2})\b")
_AMOUNT_RE = re.compile(r"\b(small|moderate|large|trace|tiny|minimal|massive)\b", re.IGNORECASE)
_DENSITY_RE = re.compile(r"\b(part[\s-]solid|ground[\s-]glass|calcified|solid|granulomas?)\b", re.IGNORECASE)
_SEVERITY_RE = re.compile(r"\b(mild|moderate|severe|advanced|marked)\b", re.IGNORECASE)
_STATION_RE = re.compile("|".join(re.escape(s) for s in sorted(NODE_STATIONS, key=len, reverse=True)) + r"|\bsubcarinal\b",
                         re.IGNORECASE)

_AMOUNT_MAP = {"trace": "small", "tiny": "small", "minimal": "small", "massive": "large"}
_SEVERITY_MAP = {"advanced": "severe", "marked": "severe"}


@dataclass
class Mention:
    finding: str
    start: int
    end: int
    present: bool | None
    sentence: str


def split_sentences(text: str) -> list[str]:
    """Sentences and list items of a report (numbering and organ-system headings removed)."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*\d+[.)]\s+", "", line)
        line = re.sub(r"^\s*(?:lungs and airways|pleura|heart and mediastinum|bones|upper abdomen|lungs|airways|"
                      r"mediastinum|heart)\s*:\s*", "", line, flags=re.IGNORECASE)
        for s in re.split(r"(?<=[.!?;])\s+", line):
            if s.strip():
                out.append(s.strip())
    return out


def _clause_bounds(sentence: str, pos: int) -> tuple[int, int]:
    """Start and end of the clause around ``pos`` (terminators end a cue's scope)."""
    start, end = 0, len(sentence)
    for m in _TERMINATOR.finditer(sentence):
        if m.end() <= pos:
            start = m.end()
        elif m.start() >= pos:
            end = m.start()
            break
    return start, end


def _nwords(s: str) -> int:
    return len(re.findall(r"[\w/-]+", s))


def _polarity(sentence: str, start: int, end: int) -> bool | None:
    c0, c1 = _clause_bounds(sentence, start)
    before = sentence[c0:start]
    pseudo = [(m.start(), m.end()) for m in _PSEUDO.finditer(before)]
    unc = [(m.start(), m.end(), None) for m in _UNC_PRE.finditer(before)]
    neg = [(m.start(), m.end(), False) for m in _NEG_PRE.finditer(before)
           if not any(u0 <= m.start() < u1 for u0, u1, _ in unc) and not any(p0 <= m.start() < p1 for p0, p1 in pseudo)]
    cues = [c for c in unc + neg if _nwords(before[c[1]:]) <= _SCOPE_WORDS]
    if cues:
        cue = max(cues, key=lambda c: c[1])  # the nearest cue before the mention
        # "no opacity to suggest pneumonia": a hedge inside a negated clause stays negated.
        if cue[2] is None and re.match(r"sugges", before[cue[0]:cue[1]], re.I) and any(c[2] is False for c in cues):
            return False
        return cue[2]
    after = sentence[end:c1]
    words = after.split()
    window = " ".join(words[:_POST_WORDS + 2])
    if _UNC_POST.search(window):
        return None
    if _NEG_POST.search(window):
        return False
    return True


def find_mentions(sentence: str) -> list[Mention]:
    """Every vocabulary mention in one sentence with its polarity."""
    mentions: list[Mention] = []
    for finding, pats in _COMPILED.items():
        taken: list[tuple[int, int]] = []
        for rx, pol in pats:
            for m in rx.finditer(sentence):
                if any(m.start() < e and s < m.end() for s, e in taken):
                    continue
                taken.append((m.start(), m.end()))
                if pol is True:
                    p = _polarity(sentence, m.start(), m.end())
                elif pol is None:
                    p = None
                else:
                    p = False
                mentions.append(Mention(finding, m.start(), m.end(), p, sentence))
    # "pleural or pericardial effusion": the generic "effusion" inside a pericardial phrase is not pleural.
    peri = [(m.start, m.end) for m in mentions if m.finding == "pericardial_effusion"]
    mentions = [m for m in mentions if not (m.finding == "pleural_effusion" and any(
        s <= m.start and m.end <= e for s, e in peri) and not re.search(r"pleural", sentence[m.start:m.end], re.I)
        and not re.search(r"pleural\s+(?:or|and|,)\s+pericardial", sentence, re.I))]
    return mentions


def _nearest(rx: re.Pattern, sentence: str, start: int, end: int, max_dist: int = 60):
    best, dist = None, None
    for m in rx.finditer(sentence):
        d = start - m.end() if m.end() <= start else m.start() - end if m.start() >= end else 0
        if d < 0:
            d = 0
        if d <= max_dist and (dist is None or d < dist or (d == dist and m.end() <= start)):
            best, dist = m, d
    return best


def _attributes(m: Mention) -> Label:
    s, f = m.sentence, m.finding
    c0, c1 = _clause_bounds(s, m.start)
    lab = Label(f, m.present)
    lobe = _nearest(_LOBE_RE, s, m.start, m.end, 60)
    if lobe and f in ("nodule", "mass", "consolidation", "ground_glass_opacity", "atelectasis", "lobectomy"):
        if lobe.group(3):
            lab.location = "left upper lobe"
        else:
            lab.location = f"{lobe.group(1).lower()} {lobe.group(2).lower()} lobe"
        lab.side = lab.location.split()[0]
    if f == "lymphadenopathy":
        st = _nearest(_STATION_RE, s, m.start, m.end, 60)
        if st:
            lab.location = st.group(0).lower()
            lab.side = NODE_STATION_SIDE.get(lab.location)
    if lab.side is None and f not in ("cardiomegaly", "pericardial_effusion", "hiatal_hernia", "emphysema"):
        side = _nearest(_SIDE_RE, s, m.start, m.end, 60)
        if side:
            w = side.group(1).lower()
            lab.side = "bilateral" if w.startswith(("bilateral", "both", "bibas")) else w
    if f == "emphysema":
        lab.side = "bilateral"
    if f in ("nodule", "mass", "lymphadenopathy", "bone_lesion"):
        ft = _FROM_TO_RE.search(s)
        size_m = ft if ft else _nearest(_SIZE_RE, s, m.start, m.end, 60)
        if size_m:
            v = float(size_m.group(1))
            lab.size_mm = v * 10 if size_m.group(2).lower().startswith("c") else v
    if f in ("fracture", "bone_lesion"):
        lv = _nearest(_LEVEL_RE, s, m.start, m.end, 60)
        if lv:
            lab.location = f"{lv.group(1)}{int(lv.group(2))}"
    if f in ("pleural_effusion", "pneumothorax", "pericardial_effusion", "hiatal_hernia"):
        a = _nearest(_AMOUNT_RE, s[c0:c1], m.start - c0, m.end - c0, 30)
        if a:
            lab.attributes["amount"] = _AMOUNT_MAP.get(a.group(1).lower(), a.group(1).lower())
    if f == "nodule":
        d = _nearest(_DENSITY_RE, s, m.start, m.end, 30)
        if d:
            v = re.sub(r"\s", "-", d.group(1).lower())
            lab.attributes["density"] = "calcified" if v.startswith("granuloma") else v
    if f == "emphysema":
        sv = _nearest(_SEVERITY_RE, s, m.start, m.end, 30)
        if sv:
            lab.attributes["severity"] = _SEVERITY_MAP.get(sv.group(1).lower(), sv.group(1).lower())
    if f == "fracture" and re.search(r"compression|wedge", s, re.I):
        lab.attributes["type"] = "compression"
    if f == "bone_lesion":
        t = re.search(r"\b(lytic|osteolytic|sclerotic|blastic)\b", s, re.I)
        if t:
            lab.attributes["type"] = "lytic" if "lytic" in t.group(1).lower() else "sclerotic"
    return lab


def label_sentence(sentence: str) -> list[Label]:
    """Labels of one sentence (one per mention, not merged)."""
    return [_attributes(m) for m in find_mentions(sentence)]


def _merge(labels: list[Label]) -> list[Label]:
    by: dict[str, list[Label]] = {}
    for lab in labels:
        by.setdefault(lab.finding, []).append(lab)
    out = []
    for name in FINDING_NAMES:
        labs = by.get(name)
        if not labs:
            continue
        for state in (True, None, False):
            group = [lab for lab in labs if lab.present is state]
            if group:
                break
        merged = Label(name, state)
        sides = {lab.side for lab in group if lab.side}
        if len(sides) > 1 and name not in ("nodule", "mass", "lymphadenopathy"):
            merged.side = "bilateral"
        for lab in group:
            merged.side = merged.side or lab.side
            merged.location = merged.location or lab.location
            merged.size_mm = merged.size_mm if merged.size_mm is not None else lab.size_mm
            for k, v in lab.attributes.items():
                merged.attributes.setdefault(k, v)
        out.append(merged)
    return out


def label_text(text: str) -> list[Label]:
    """Labels of free text (no section handling), merged per finding."""
    labels: list[Label] = []
    for sent in split_sentences(text):
        labels.extend(label_sentence(sent))
    return _merge(labels)


def label_report(text: str, sections: tuple[str, ...] = ("findings", "impression")) -> list[Label]:
    """Labels of a report. When the text has section headings only ``sections`` are read (the
    indication in Clinical information names findings the patient may not have); without
    headings the whole text is read. One Label per mentioned finding, in vocabulary order."""
    parsed = parse_report(text)
    has_headings = any(parsed[k] for k in parsed if k != "findings") or bool(
        re.search(r"^\s*findings\s*:", text, re.IGNORECASE | re.MULTILINE))
    body = "\n".join(parsed[k] for k in sections if parsed.get(k)) if has_headings else text
    return label_text(body)


def presence(labels: list[Label]) -> dict[str, bool | None]:
    """``{finding: present}`` for every vocabulary finding; unmentioned findings are False."""
    got = {lab.finding: lab.present for lab in labels}
    return {name: got.get(name, False) for name in FINDING_NAMES}


assert set(_PATTERNS) == set(FINDING_NAMES), "every vocabulary finding needs labeller patterns"
