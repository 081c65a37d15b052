"""A decoding veto that keeps every called finding in the report, under its own organ system.

Why. The demo decoder, trained for under an hour on a CPU, reads the findings table (the calls
line before ``[REPORT]`` and the finding-context tokens) but often writes the normal line of an
organ system that has a finding, or files a finding under the wrong system. Session 24 replaced
the heads' calls with the labels (oracle calls) and still read reports such as:

* "Upper abdomen: The visualized upper abdomen is unremarkable." with a hiatal hernia called;
* "Lungs and airways: No focal consolidation, mass or suspicious nodule." with emphysema called
  (the impression then said "Severe emphysema": the findings left it out);
* "Lungs and airways: There is a right paratracheal lymph node ..." (a mediastinal finding).

What :class:`CoverageVeto` refuses (as with ``data.report_consistency`` and
``data.report_outline``, the decoder writes the text; the veto only refuses, the decoder then
takes its next most likely token, and when every candidate is refused the generator keeps the
unconstrained one, so a veto never stops a report):

* **Findings, a line may not end without its calls**: the line break (or the next section's
  marker) that ends an organ-system line is refused while a finding the table calls present in
  that system is not mentioned in the line (asserted or hedged, as the labeller
  ``data.labeler`` reads it). The decoder then goes on writing that line.
* **Findings, a finding under its own system**: a sentence of an organ-system line may not
  assert a finding of another system ("Pleura: There is a small pericardial effusion.").
* **Impression, no called finding left out**: the report may not end while a called finding
  is not mentioned in the Impression.

Each is given up for a line (or the impression) once it has ``max_words`` words: a decoder that
cannot find the words should not run on to the token limit.

Which finding belongs to which system is ``data.vocab.FINDINGS[..].system``; the synthetic
reports (``data.synthetic.reports``) follow the same map and mention every present finding in
its system's line and in the impression.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from data.labeler import label_sentence, split_sentences
from data.report_veto import ReportVeto
from data.vocab import FINDINGS, SYSTEMS

SYSTEM_OF: dict[str, str] = {f.name: f.system for f in FINDINGS}
_HEADING_RE = re.compile(r"^\s*(" + "|".join(re.escape(h) for _, h in SYSTEMS) + r")\s*:", re.IGNORECASE)
_SYSTEM_OF_HEADING = {h.lower(): k for k, h in SYSTEMS}


def mentioned(text: str) -> set[str]:
    """Findings a text mentions as present or uncertain (not the ones it denies)."""
    return {lab.finding for s in split_sentences(text) for lab in label_sentence(s) if lab.present is not False}


class CoverageVeto(ReportVeto):
    """``veto(tokens) -> bool`` for one report; ``tokens`` are the generated report ids so far,
    the candidate last. ``called``: the finding names the report's table calls present (names
    outside the vocabulary are ignored). ``placement``: also refuse a finding asserted under
    another organ system."""

    def __init__(self, tokenizer, called: Iterable[str], placement: bool = True, impression: bool = True,
                 max_words: int = 60):
        super().__init__(tokenizer)
        self.called = frozenset(c for c in called if c in SYSTEM_OF)
        self.by_system: dict[str, frozenset[str]] = {
            k: frozenset(c for c in self.called if SYSTEM_OF[c] == k) for k, _ in SYSTEMS}
        self.placement = placement
        self.impression = impression
        self.max_words = max_words

    # -- the rules ---------------------------------------------------------------------------
    def breaks(self, tokens: list[int]) -> bool:
        """Whether the last token of ``tokens`` leaves a called finding out or misplaces one."""
        if not tokens:
            return False
        if self.closes(tokens):  # closes the section being written
            section, text = self.closed_section(tokens)
            if section == "findings":
                line = self.last_line(text)
                return line is not None and self._line_uncovered(line)
            if section == "impression" and self.impression and tokens[-1] == self.eos_id:
                return self._short(text) and bool(self.called - mentioned(text))
            return False
        at = self.findings_line(tokens)
        if at is None:
            return False
        line, ended = at
        if ended:  # the candidate ends the line being written (its text included)
            return self._line_uncovered(line)
        return self.placement and self._misplaced(line)

    def _short(self, text: str) -> bool:
        return len(text.split()) < self.max_words

    def _system(self, line: str) -> tuple[str | None, str]:
        m = _HEADING_RE.match(line)
        if m is None:
            return None, line
        return _SYSTEM_OF_HEADING[m.group(1).lower()], line[m.end():]

    def _line_uncovered(self, line: str) -> bool:
        system, body = self._system(line)
        if system is None or not self.by_system.get(system) or not self._short(body):
            return False
        return bool(self.by_system[system] - mentioned(body))

    def _misplaced(self, line: str) -> bool:
        system, body = self._system(line)
        if system is None or not self._short(body):
            return False
        sentences = split_sentences(body)
        if not sentences:
            return False
        return any(lab.present is True and SYSTEM_OF.get(lab.finding, system) != system
                   for lab in label_sentence(sentences[-1]))


_RESECTION_FACT = re.compile(r"\b(?:lobectomy|pneumonectomy)\b")


class RecordVeto(ReportVeto):
    """``veto(tokens) -> bool`` keeping the patient record's facts in the report: ``facts`` are the
    lower-case phrases ``data.history_digest.record_facts`` reads from the record (a known
    malignancy: "prostate cancer", "cell carcinoma"; a prior lung resection: "right upper
    lobectomy"). A radiologist states a known cancer in the clinical information and answers it in
    the impression, and describes a resection in the lungs. So:

    * **Clinical information** may not close (the next section's marker is refused) before it
      names every known malignancy;
    * **Findings**: the lungs line may not end before it names every resection;
    * **Impression** (``impression=True``; off by default): the report may not end before the
      Impression names every known malignancy. Off: on the 84 val studies whose record names a
      cancer or a resection (session 27) the demo decoder, refused its end, appended broken items
      ("No fracture, small.", "node, suspicious for malignancy. Known melanoma.").

    As with :class:`CoverageVeto` the decoder writes the words (refused, it takes its next most
    likely token), and each rule is given up once its section or line has ``max_words`` words.
    ``facts`` outside those two kinds are ignored; with none left the veto never refuses."""

    def __init__(self, tokenizer, facts: Iterable[str], max_words: int = 40, impression: bool = False):
        super().__init__(tokenizer)
        self.impression = impression
        facts = [f.lower().strip() for f in facts if f and f.strip()]
        self.resections = tuple(f for f in facts if _RESECTION_FACT.search(f))
        self.malignancies = tuple(f for f in facts if f not in self.resections)
        self.max_words = max_words

    def _missing(self, text: str, facts: tuple[str, ...]) -> bool:
        low = " ".join(text.lower().split())
        return len(text.split()) < self.max_words and any(f not in low for f in facts)

    def breaks(self, tokens: list[int]) -> bool:
        """Whether the last token of ``tokens`` closes a section or line that leaves a fact out."""
        if not tokens or not (self.malignancies or self.resections):
            return False
        if self.closes(tokens):  # closes the section being written
            section, text = self.closed_section(tokens)
            if section == "clinical_information":
                return self._missing(text, self.malignancies)
            if section == "impression" and tokens[-1] == self.eos_id and self.impression:
                return self._missing(text, self.malignancies)
            if section == "findings":
                line = self.last_line(text)
                return line is not None and self._lungs_line_short_of_resection(line)
            return False
        at = self.findings_line(tokens) if self.resections else None
        return at is not None and at[1] and self._lungs_line_short_of_resection(at[0])  # the candidate ends the line

    def _lungs_line_short_of_resection(self, line: str) -> bool:
        m = _HEADING_RE.match(line)
        if m is None or _SYSTEM_OF_HEADING[m.group(1).lower()] != "lungs":
            return False
        return self._missing(line[m.end():], self.resections)
