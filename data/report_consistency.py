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
from data.labeler import label_sentence, split_sentences
from data.report_format import SECTION_KEYS

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


class AcquisitionVeto(CallsVeto):
    """``veto(tokens) -> bool`` that keeps the Technique section to the scan's contrast, as the
    acquisition line the decoder reads states it from the DICOM header (``data.finding_prompt``):
    with ``contrast`` False a Technique sentence may not say the contrast was given ("following
    intravenous contrast"), with True it may not say none was ("without intravenous contrast").
    Session 21's demo decoder read "Acquisition: no IV contrast." and still wrote a contrast
    sentence for 8 of 39 contrast-allergic test patients (0 with this veto). As with :class:`CallsVeto`, the
    decoder writes the text and takes its next choice where a word is refused; a veto never stops
    a report."""

    def __init__(self, tokenizer, contrast: bool):
        super().__init__(tokenizer, (), sections=("technique",))
        self.contrast = bool(contrast)

    def contradicts(self, sentence: str) -> bool:
        if self.contrast:
            return bool(_STATES_NONE.search(sentence))
        return bool(_STATES_CONTRAST.search(sentence)) and not _STATES_NONE.search(sentence)


def acquisition_veto(tokenizer, line: str | None) -> AcquisitionVeto | None:
    """The veto for a study whose decoder reads acquisition ``line`` ("Acquisition: no IV
    contrast."); None when the line does not say whether contrast was given (or there is none)."""
    contrast = contrast_of_line(line)
    return None if contrast is None else AcquisitionVeto(tokenizer, contrast)

