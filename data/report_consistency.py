"""A decoding veto that keeps a generated report consistent with its own findings table.

The decoder reads the heads' calls ("Calls: cardiomegaly.") but, trained for under an hour on a
CPU, it still writes the normal template for some organ systems: session 13's demo model wrote
"The heart is normal in size." in 41 of the 41 test reports whose table said cardiomegaly (and put
"Cardiomegaly." in the impression). :class:`CallsVeto` is passed to ``core.generate.generate`` as a
per-study veto: while the report is in the Findings or Impression section, a continuation is
refused when the sentence it is writing, read by the rule-based labeller
(:mod:`data.labeler`), **denies a finding the table calls present** or **asserts one it does not
call**. Uncertain mentions ("cannot exclude") and sentences without a finding pass. The decoder
then takes its next most likely token; it writes the text, the veto only refuses. A veto never
stops a report (the generator keeps the unconstrained token when every candidate is refused).
"""
from __future__ import annotations

import re
from typing import Iterable

from data.finding_prompt import contrast_of_line
from data.labeler import label_report, label_sentence, presence, split_sentences
from data.report_format import SECTION_KEYS, findings_impression, format_report, parse_report
from data.vocab import FINDING_NAMES

CHECKED_SECTIONS = ("findings", "impression")


class CallsVeto:
    """``veto(tokens) -> bool`` for one study; ``tokens`` are the generated report ids so far,
    the candidate last. ``called``: the finding names the report's table calls present."""

    def __init__(self, tokenizer, called: Iterable[str], sections: Iterable[str] = CHECKED_SECTIONS):
        self.tok = tokenizer
        self.called = frozenset(called)
        self.section_of = {sid: key for key, sid in zip(SECTION_KEYS, tokenizer.section_ids)}
        self.sections = frozenset(sections)
        unknown = self.sections - set(SECTION_KEYS)
        if unknown:
            raise ValueError(f"unknown report section(s) {sorted(unknown)}; use names from {list(SECTION_KEYS)}")
        self.refused = 0  # continuations refused so far (for the report's provenance)

    def contradicts(self, sentence: str) -> bool:
        """Whether ``sentence`` denies a called finding or asserts an uncalled one."""
        for lab in label_sentence(sentence):
            if lab.present is False and lab.finding in self.called:
                return True
            if lab.present is True and lab.finding not in self.called:
                return True
        return False

    def current_sentence(self, tokens: list[int]) -> str | None:
        """The sentence being written (text after the last sentence end of the current section),
        or None outside the checked sections."""
        start, section = None, None
        for i in range(len(tokens) - 1, -1, -1):
            if tokens[i] in self.section_of:
                start, section = i + 1, self.section_of[tokens[i]]
                break
        if section not in self.sections:
            return None
        text = self.tok.decode(tokens[start:])
        sentences = split_sentences(text)
        return sentences[-1] if sentences else ""

    def __call__(self, tokens: list[int]) -> bool:
        sentence = self.current_sentence(tokens)
        if not sentence:
            return False
        bad = self.contradicts(sentence)
        self.refused += bad
        return bad


# The first word that commits a Technique sentence to one side (word prefixes, so that a word split
# into several tokens is refused at its first piece): "following / after intravenous contrast",
# "Contrast-enhanced", "with IV contrast" state contrast; "without", "Non-enhanced", "unenhanced",
# "no IV contrast", "contrast allergy" state none.
_STATES_CONTRAST = re.compile(r"\b(follow|after|post-?contrast)|(?<!non-)(?<!non)(?<!un)\benhanc|^\W*contrast\b|"
                              r"\bwith (iv|intravenous|contrast)\b", re.I)
_STATES_NONE = re.compile(r"\b(without|w/o|unenhanc|non-?enhanc|non-?contrast|allerg)|^\W*non\b|"
                          r"\bno (iv|intravenous)\b", re.I)


# "CT chest with" commits a sentence to the contrast template ("CT chest with IV contrast"); a
# non-contrast scan's Technique says "without" there. Refusing the "with" (session 22's demo run
# wrote "CT chest with" for 15 of 39 contrast-allergic patients and, refused "IV contrast" after
# it, went on with "no fracture") lets the decoder take "without" while it still can.
_EXAM_WITH = re.compile(r"\b(chest|thorax)\s+with$", re.I)


def technique_states(text: str, contrast: bool) -> bool:
    """Whether a Technique ``text`` states the contrast the DICOM header gives: with ``contrast``
    True that it was given ("following intravenous contrast") and nowhere that it was not; with False
    that none was ("without intravenous contrast", "non-enhanced", "contrast allergy")."""
    if contrast:
        return bool(_STATES_CONTRAST.search(text)) and not _STATES_NONE.search(text)
    return bool(_STATES_NONE.search(text))


class AcquisitionVeto(CallsVeto):
    """``veto(tokens) -> bool`` that keeps the Technique section to the scan's contrast, as the
    acquisition line the decoder reads states it from the DICOM header (``data.finding_prompt``):
    with ``contrast`` False a Technique sentence may not say the contrast was given ("following
    intravenous contrast"), with True it may not say none was ("without intravenous contrast").
    Session 21's demo decoder read "Acquisition: no IV contrast." and still wrote a contrast
    sentence for 8 of 39 contrast-allergic test patients (0 with this veto). As with :class:`CallsVeto`, the
    decoder writes the text and takes its next choice where a word is refused; a veto never stops
    a report."""

    def __init__(self, tokenizer, contrast: bool, require: bool = False):
        super().__init__(tokenizer, (), sections=("technique",))
        self.contrast = bool(contrast)
        self.require = require

    def contradicts(self, sentence: str) -> bool:
        if self.contrast:
            return bool(_STATES_NONE.search(sentence))
        if _EXAM_WITH.search(sentence.rstrip()):
            return True
        return bool(_STATES_CONTRAST.search(sentence)) and not _STATES_NONE.search(sentence)

    def states(self, text: str) -> bool:
        """Whether ``text`` (the Technique so far) states the header's contrast."""
        return technique_states(text, self.contrast)

    def __call__(self, tokens: list[int]) -> bool:
        if self.require and self._closes_unstated(tokens):
            self.refused += 1
            return True
        return super().__call__(tokens)

    def _closes_unstated(self, tokens: list[int]) -> bool:
        """``require``: the Technique's first sentence may not end, nor the section close, before
        it has stated whether IV contrast was given (as the header says). "CT chest." for a
        contrast-allergic patient's non-contrast scan is refused at the ".", so the decoder goes on
        to "without intravenous contrast" while the sentence is open."""
        marks = [i for i, t in enumerate(tokens) if t in self.section_of]
        if not marks:
            return False
        closing = tokens[-1] in self.section_of or tokens[-1] == self.tok.eos_id
        at = marks[-2] if tokens[-1] in self.section_of and len(marks) >= 2 else marks[-1]
        if self.section_of[tokens[at]] != "technique":
            return False
        text = self.tok.decode(tokens[at + 1: len(tokens) - closing])
        if self.states(text) or not text.strip():
            return False
        return closing or bool(re.search(r"[.;\n]\s*$", text)) and len(split_sentences(text)) <= 1


_NUM = r"(\d+(?:\.\d+)?)"
# a change phrase whose new size has just been written ("increased from 9 mm to 12"), at the end
_CHANGE_TAIL = re.compile(rf"\b(increased|decreased)\s+(?:in size\s+)?from\s+{_NUM}\s*mm\s+to\s+{_NUM}$", re.I)
# a completed change phrase anywhere ("decreased from 12 mm to 9 mm")
_CHANGE_DONE = re.compile(rf"\b(increased|decreased)\s+(?:in size\s+)?from\s+{_NUM}\s*mm\s+to\s+{_NUM}\s*mm", re.I)
_SIZE = re.compile(rf"{_NUM}\s*mm\b", re.I)
# the direction word of a change, just completed, and the directions of completed changes. "remained"
# ("has remained unchanged at 9 mm", "has remained stable") says "unchanged" one word early: judged
# only at "unchanged", a decoder that had written "remained" where the size changed was left with
# nothing it could write and looped ("has remained remained remained ...", session 23).
_DIRECTION_WORDS = ("increased", "decreased", "unchanged", "remained")
_DIRECTION_TAIL = re.compile(r"\b(increased|decreased|unchanged|remained)$", re.I)
_DIRECTION_DONE = re.compile(_CHANGE_DONE.pattern + rf"|\b(unchanged)\s+(?:in size\s+)?at\s+{_NUM}\s*mm", re.I)


def _against_direction(direction: str, prior: float, new: float) -> bool:
    """Whether "<direction> from <prior> mm to <new> mm" contradicts itself."""
    return (direction == "increased") != (new > prior) or new == prior


class MeasurementVeto(CallsVeto):
    """``veto(tokens) -> bool`` that keeps a nodule's stated change to its own numbers, in the
    Findings and the Impression. When the decoder has just written the new size of a change phrase
    ("... increased from 9 mm to 12"), the number is refused when

    * it contradicts the direction: "increased from 12 mm to 10", "decreased from 9 mm to 9";
    * the same sentence stated a size before the phrase, agreeing with the direction, and the new
      size differs from it ("12 mm solid nodule in the right lower lobe, increased from 9 mm to 10");
    * an earlier sentence of the report already stated the change from the same prior size to
      another new size (the Findings say "to 12", the Impression may not say "to 10").

    and the word that gives a change's direction ("increased", "decreased", "unchanged", or
    "remained", which says "unchanged") is refused when an earlier sentence stated the nodule's
    change the other way.

    Given the nodule's size on the prior study, as the record states it (``prior_mm``;
    ``data.finding_prompt.record_prior_nodule_mm``), and today's, as measured and read by the
    decoder in its calls (``measured_mm``; ``data.nodule_measure``), the change is known: a
    direction word that contradicts the two is refused, and so is a new size other than the
    measured one in a change from the prior size. The decoder still writes every word.

    Session 21's demo decoder contradicted itself in 60 of the 113 change phrases it wrote on the
    test split: it does not know today's size (no head measures it) and guesses. The veto does not
    tell it the size; it keeps the report from stating two. As with :class:`CallsVeto`, the decoder
    takes its next most likely token where a number is refused, and a veto never stops a report."""

    def __init__(self, tokenizer, prior_mm: float | None = None, measured_mm: float | None = None):
        super().__init__(tokenizer, ())
        self._piece: dict[int, str] = {}
        self.prior_mm = None if prior_mm is None else float(prior_mm)
        self.measured_mm = None if measured_mm is None else float(measured_mm)
        self.direction = None  # the direction the record and the measurement give, when both are known
        if self.prior_mm is not None and self.measured_mm is not None:
            self.direction = ("increased" if self.measured_mm > self.prior_mm else
                              "decreased" if self.measured_mm < self.prior_mm else "unchanged")

    def _text(self, token: int) -> str:
        t = self._piece.get(token)
        if t is None:
            t = self._piece[token] = self.tok.decode([token]).strip()
        return t

    def __call__(self, tokens: list[int]) -> bool:
        if not tokens:
            return False
        piece = self._text(tokens[-1])
        if piece and any(w.endswith(piece.lower()) for w in _DIRECTION_WORDS):  # perhaps a direction word's end
            sentence = self.current_sentence(tokens)
            d = _DIRECTION_TAIL.search(sentence or "")
            if d is not None:
                word = d.group(1).lower().replace("remained", "unchanged")
                if self.direction is not None and "nodul" in sentence.lower():
                    bad = word != self.direction
                else:
                    earlier = self._earlier_text(tokens, sentence)
                    stated = [(m.group(1) or m.group(4)).lower() for m in _DIRECTION_DONE.finditer(earlier)]
                    bad = bool(stated) and stated[0] != word
                self.refused += bad
                return bad
        if piece[:1].isdigit():  # a number being written: refuse it when no way of finishing it fits
            sentence, complete = self.current_sentence(tokens), False
        elif piece == ".":  # a decimal point or the sentence's end: judged at the next piece
            return False
        else:  # the number before this piece is complete
            sentence, complete = self.current_sentence(tokens[:-1]), True
        m = _CHANGE_TAIL.search(sentence or "")
        if m is None:
            return False
        bad = not any(self.fits(m, v, sentence[: m.start()], self._earlier_text(tokens, sentence))
                      and (self.measured_mm is None or float(m.group(2)) != self.prior_mm
                           or _may_become(m.group(3), self.measured_mm, complete))
                      for v in _finishes(m.group(3), complete))
        self.refused += bad
        return bad

    def _earlier_text(self, tokens: list[int], sentence: str) -> str:
        text = self.tok.decode(tokens)
        cut = text.rfind(sentence)
        return text[:cut] if cut >= 0 else ""

    @staticmethod
    def fits(m: re.Match, new: float, before: str, earlier: str) -> bool:
        """Whether ``new`` as the new size of change phrase ``m`` agrees with its direction, a size
        stated earlier in its sentence (``before``) and an earlier change from the same prior."""
        direction, prior = m.group(1).lower(), float(m.group(2))
        if _against_direction(direction, prior, new):
            return False
        agrees = [float(x) for x in _SIZE.findall(before)
                  if (float(x) > prior) == (direction == "increased") and float(x) != prior]
        if agrees and new != agrees[-1]:
            return False
        return all(float(d.group(3)) == new for d in _CHANGE_DONE.finditer(earlier) if float(d.group(2)) == prior)


def _may_become(number: str, value: float, complete: bool) -> bool:
    """Whether the number written so far is, or can still become, ``value``."""
    target = f"{value:g}"
    return number == target if complete else target.startswith(number)


def _finishes(number: str, complete: bool) -> list[float]:
    """The values a number written so far can still become: itself when complete; else one more
    digit (sizes under 100 mm) or one decimal, whatever the tokenizer splits numbers into."""
    out = [float(number)]
    if complete:
        return out
    if "." in number:
        return out + ([float(number + str(d)) for d in range(10)] if number.endswith(".") else [])
    out += [float(f"{number}.{d}") for d in range(1, 10)]
    out += [float(number + str(d)) for d in range(10) if float(number + str(d)) < 100]
    return out


def change_contradictions(report: str) -> tuple[int, int]:
    """(change phrases that contradict themselves, an earlier change from the same prior size or
    the direction of the first change stated, change phrases) in a report's text: what
    :class:`MeasurementVeto` prevents, counted. "Unchanged at 9 mm" counts as a change phrase."""
    bad, seen, first = 0, {}, None
    done = list(_DIRECTION_DONE.finditer(report))
    for d in done:
        if d.group(4):  # "unchanged at B mm"
            wrong = first is not None and first != "unchanged"
            first = first or "unchanged"
            bad += wrong
            continue
        direction, prior, new = d.group(1).lower(), float(d.group(2)), float(d.group(3))
        wrong = _against_direction(direction, prior, new)
        wrong = wrong or (prior in seen and seen[prior] != new) or (first is not None and first != direction)
        seen.setdefault(prior, new)
        first = first or direction
        bad += wrong
    return bad, len(done)


def acquisition_veto(tokenizer, line: str | None, require: bool = False) -> AcquisitionVeto | None:
    """The veto for a study whose decoder reads acquisition ``line`` ("Acquisition: no IV
    contrast."); None when the line does not say whether contrast was given (or there is none).
    ``require``: the Technique must also state it (``AcquisitionVeto.require``)."""
    contrast = contrast_of_line(line)
    return None if contrast is None else AcquisitionVeto(tokenizer, contrast, require=require)



class CallsAgreement:
    """A rerank score for MBR decoding (``core.generate``, ``strategy="mbr"``): ``weight`` times
    the share of the vocabulary's findings on which the labeller's reading of a candidate report
    (Findings and Impression) agrees with the findings table: stated present where it is called,
    absent or unmentioned where it is not (a hedge counts as not stated). Among sampled reports that
    agree about equally with each other, the one that says what the table says wins. Unlike
    :class:`CallsVeto` it never changes a word: it only chooses between whole reports the decoder
    wrote."""

    def __init__(self, tokenizer, called: Iterable[str], weight: float = 1.0):
        self.tok = tokenizer
        self.called = frozenset(called)
        unknown = self.called - set(FINDING_NAMES)
        if unknown:
            raise ValueError(f"unknown finding name(s) {sorted(unknown)}; use names from data.vocab.FINDING_NAMES")
        self.names = FINDING_NAMES
        self.weight = float(weight)

    def agreement(self, text: str) -> float:
        """The share of findings on which ``text`` (a formatted report) agrees with the table."""
        said = presence(label_report(text))
        return sum(bool(said.get(n)) == (n in self.called) for n in self.names) / len(self.names)

    def __call__(self, tokens: list[int]) -> float:
        return self.weight * self.agreement(format_report(self.tok.decode_report(tokens)))


class RecordAgreement:
    """A rerank score for MBR decoding: ``weight`` times the share of the record's facts
    (``data.history_digest.record_facts``: a known malignancy, a prior lung resection) that a
    candidate report names in its Findings or Impression; 0 for every candidate when the record has
    none. Among sampled reports, the one that carries the known cancer into the Impression ("no
    evidence of metastatic disease from the known prostate cancer") and the resection into the
    Findings wins. Like :class:`CallsAgreement` it only chooses between reports the decoder wrote.

    A sample that never ended (no end-of-report token: it ran to the length cap) earns nothing:
    session 26 saw MBR choose such a runaway report because somewhere in it the lobectomy was named."""

    def __init__(self, tokenizer, facts: Iterable[str], weight: float = 1.0):
        self.tok = tokenizer
        self.facts = tuple(f.lower() for f in facts)
        self.weight = float(weight)

    def carried(self, text: str) -> float:
        """The share of the facts that ``text`` (a formatted report) names in its Findings or Impression."""
        if not self.facts:
            return 0.0
        body = findings_impression(parse_report(text)).lower()
        return sum(f in body for f in self.facts) / len(self.facts)

    def __call__(self, tokens: list[int]) -> float:
        if not self.facts or self.tok.eos_id not in tokens:  # no facts, or a runaway sample
            return 0.0
        return self.weight * self.carried(format_report(self.tok.decode_report(tokens)))


class AcquisitionAgreement:
    """A rerank score for MBR decoding: ``weight`` if a candidate's Technique states the scan's
    contrast as the DICOM header gives it (:func:`technique_states`: "without intravenous contrast"
    for a non-contrast scan, "following intravenous contrast" for a contrast one), else 0. The
    acquisition veto only refuses the *opposite* statement, so a sample may still leave the contrast
    out or run the Technique into other words ("CT chest dated 2023 ..."): session 29 lost 4 of the
    test split's contrast allergies that way. Among sampled reports, one that says what the scanner did
    wins. Like :class:`RecordAgreement` it only chooses between reports the decoder wrote, and a
    sample that never ended (no end-of-report token) earns nothing."""

    def __init__(self, tokenizer, contrast: bool, weight: float = 1.0):
        self.tok = tokenizer
        self.contrast = bool(contrast)
        self.weight = float(weight)

    def states(self, text: str) -> bool:
        """Whether ``text`` (a formatted report) states the header's contrast in its Technique."""
        return technique_states(parse_report(text)["technique"], self.contrast)

    def __call__(self, tokens: list[int]) -> float:
        if self.tok.eos_id not in tokens:  # a runaway sample
            return 0.0
        return self.weight * technique_states(self.tok.decode_report(tokens)["technique"], self.contrast)

