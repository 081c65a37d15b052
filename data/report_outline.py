"""A decoding veto that keeps a generated report to the product's outline (``data.report_format``).

Why. The demo decoder, trained for under an hour on a CPU, writes most reports in the outline it
was trained on but breaks it in the reports it finds hard (several findings, an unusual record).
Session 23's shipped model broke it in 28 of the 310 test reports: an organ-system line without
its heading ("Heart enlarged mediastinal or pneumothorax."), a heading outside the Findings
("Pleura: ..." in the Comparison, "Bones: ..." in the Impression), headings repeated or out of
order, impression items numbered "4. 4. 4.". A radiologist reads such a report as broken, and so
do the tools that parse it (``data.report_format.parse_report`` files the stray heading's text
under the wrong section).

What :class:`OutlineVeto` refuses (the decoder then writes its next most likely token; as with
``data.report_consistency``, it writes the text, the veto only refuses, and a veto never stops a
report: when every candidate is refused the generator keeps the unconstrained one):

* **Findings**: every line starts with the next organ-system heading (``data.vocab.SYSTEMS``, in
  report order, each once: "Lungs and airways:", "Pleura:", ...); no heading inside a line; the
  Impression may not start before the last heading is written; no line break after its line.
* **Clinical information, technique, comparison**: one line each (no line break after it); no
  organ-system heading.
* **Impression**: either one unnumbered line (no line break after it), or items numbered 1., 2.,
  3., ... in order, each with text (no bare "4." followed by a new line or the end); no
  organ-system heading.

A line break refused where the section is whole leaves the decoder the next section's marker (or
the end of the report) among its choices, rather than a line it may not write.

Only the line being written is judged (a line that slipped through is not held against later
ones), by its decoded text, so a heading or number split into several tokens is judged at each
piece.
"""
from __future__ import annotations

import re

from data.report_veto import ReportVeto
from data.vocab import SYSTEMS

ONE_LINE_SECTIONS = ("clinical_information", "technique", "comparison")
_ITEM = re.compile(r"(\d+)\.(?!\d)")  # a numbered impression item ("2. ...", "2.Right ...", a bare "2.")
_ITEM_BEGUN = re.compile(r"(\d+)\.(?=\s*[^\d\s])")  # one with its text begun ("2.5 cm mass" is no item)
_DIGITS = re.compile(r"\d+")
_BARE_ITEM = re.compile(r"\d+\.?")


class OutlineVeto(ReportVeto):
    """``veto(tokens) -> bool`` for one report; ``tokens`` are the generated report ids so far, the
    candidate last. ``headings``: the Findings' organ-system headings in report order (without
    the colon); ``every_heading``: the Findings must give each of them, in order (the product's
    outline), rather than any subset in order."""

    def __init__(self, tokenizer, headings: tuple[str, ...] = tuple(h for _, h in SYSTEMS), every_heading: bool = True):
        if not headings:
            raise ValueError("OutlineVeto needs at least one organ-system heading")
        super().__init__(tokenizer)
        self.headings = tuple(h + ":" for h in headings)
        self.every_heading = every_heading
        self._heading_in = re.compile(r"\b(" + "|".join(re.escape(h) for h in headings) + r")\s*:")

    # -- the rules ---------------------------------------------------------------------------
    def breaks(self, tokens: list[int]) -> bool:
        """Whether the last token of ``tokens`` breaks the outline."""
        if not tokens:
            return False
        marks = [i for i, t in enumerate(tokens) if t in self.section_of]
        if tokens[-1] in self.section_of:  # a new section: the one it closes must be whole
            if len(marks) >= 2 and self.section_of[tokens[marks[-2]]] == "findings":
                return self._findings_missing(self._text(tokens, marks[-2] + 1, len(tokens) - 1))
            return False
        if not marks:
            return False
        section = self.section_of[tokens[marks[-1]]]
        ends = tokens[-1] == self.eos_id
        lines = self._text(tokens, marks[-1] + 1, len(tokens) - ends).split("\n")
        done, cur = [ln.strip() for ln in lines[:-1] if ln.strip()], lines[-1].strip()
        if section == "findings":
            return self._findings_line(done, cur, new_line=len(lines) > 1 and not cur)
        if section == "impression":
            return self._impression_line(done, cur, just_broke=len(lines) > 1 and not cur, ends=ends)
        if section in ONE_LINE_SECTIONS:  # no second line: not even its line break
            return bool(done) or bool(self._heading_in.search(cur))
        return False

    def _text(self, tokens: list[int], start: int, stop: int) -> str:
        return self.tok.decode(tokens[start:stop])

    def _heading_of(self, line: str) -> int | None:
        return next((k for k, h in enumerate(self.headings) if line.startswith(h)), None)

    def _used(self, done: list[str]) -> int:
        """Index of the last heading the written lines gave (-1: none)."""
        ks = [k for k in map(self._heading_of, done) if k is not None]
        return max(ks) if ks else -1

    def _findings_missing(self, text: str) -> bool:
        if not self.every_heading:
            return False
        return self._used([ln.strip() for ln in text.split("\n") if ln.strip()]) < len(self.headings) - 1

    def _findings_line(self, done: list[str], cur: str, new_line: bool) -> bool:
        nxt = self._used(done) + 1
        if nxt == len(self.headings) and new_line:
            return True  # the last system's line is written: no line break after it
        if not cur:
            return False
        allowed = self.headings[nxt: nxt + 1] if self.every_heading else self.headings[nxt:]
        for h in allowed:
            if h.startswith(cur):  # still writing the heading
                return False
            if cur.startswith(h):  # the line's text: no second heading in it
                return bool(self._heading_in.search(cur[len(h):]))
        return True

    def _impression_line(self, done: list[str], cur: str, just_broke: bool, ends: bool) -> bool:
        if self._heading_in.search(cur):
            return True
        if ends and _BARE_ITEM.fullmatch(cur):
            return True  # the report may not end on an item without text ("4.")
        if just_broke and done and _BARE_ITEM.fullmatch(done[-1]):
            return True  # nor leave one for a new line
        if just_broke and done and _ITEM.match(done[0]) is None:
            return True  # an unnumbered impression is one line: no line break after it
        if not cur:
            return False
        if not done:  # the first line: an item, if any, is item 1 ("9 mm nodule ..." is no item)
            m = _ITEM_BEGUN.match(cur)
            return m is not None and m.group(1) != "1"
        if _ITEM.match(done[0]) is None:
            return True  # an unnumbered impression is one line
        last = 0
        for ln in done:
            m = _ITEM.match(ln)
            last = int(m.group(1)) if m else last
        want = str(last + 1)
        m = _DIGITS.match(cur)
        if m is None:
            return True  # an unnumbered line inside a numbered list
        if m.end() == len(cur):  # the number still being written
            return not want.startswith(m.group())
        return m.group() != want or cur[m.end()] != "."
