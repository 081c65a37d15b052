"""The common part of the decoding vetoes that judge a report by its sections
(``data.report_outline.OutlineVeto``, ``data.report_coverage.CoverageVeto``).

A veto is called by ``core.generate`` with a row's generated report ids (the candidate last) and
returns True to refuse that continuation; it counts its refusals for the report's provenance.
"""
from __future__ import annotations

from data.report_format import SECTION_KEYS


class ReportVeto:
    """``veto(tokens) -> bool``: subclasses define :meth:`breaks`; ``section_of`` maps each section
    marker id of ``tokenizer`` to its section key, ``eos_id`` is its end-of-report id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.section_of = {sid: key for key, sid in zip(SECTION_KEYS, tokenizer.section_ids)}
        self.eos_id = tokenizer.eos_id
        self.refused = 0  # continuations refused so far (for the report's provenance)

    def __call__(self, tokens: list[int]) -> bool:
        bad = self.breaks(tokens)
        self.refused += bad
        return bad

    def breaks(self, tokens: list[int]) -> bool:
        """Whether the last token of ``tokens`` is to be refused."""
        raise NotImplementedError

    # -- where the last token is (shared by the vetoes that judge whole sections and lines) ---
    def closes(self, tokens: list[int]) -> bool:
        """Whether the last token closes the section being written (the next marker, or EOS)."""
        return tokens[-1] in self.section_of or tokens[-1] == self.eos_id

    def closed_section(self, tokens: list[int]) -> tuple[str | None, str]:
        """For a last token that :meth:`closes`: (the closed section's key, its text); (None, "")
        when no section was open."""
        marks = [i for i, t in enumerate(tokens) if t in self.section_of]
        if len(marks) - (tokens[-1] in self.section_of) < 1:
            return None, ""
        m = marks[-2] if tokens[-1] in self.section_of else marks[-1]
        return self.section_of[tokens[m]], self.tok.decode(tokens[m + 1: len(tokens) - 1])

    def findings_line(self, tokens: list[int]) -> tuple[str, bool] | None:
        """While the Findings are written (the last token does not close them): (the line the last
        token writes in, or ends with its text included; whether it ends it); None elsewhere."""
        marks = [i for i, t in enumerate(tokens) if t in self.section_of]
        if not marks or self.section_of[tokens[marks[-1]]] != "findings":
            return None
        before = self.tok.decode(tokens[marks[-1] + 1: -1])
        after = self.tok.decode(tokens[marks[-1] + 1:])
        n = before.count("\n")
        if after.count("\n") > n:
            return after.split("\n")[n], True
        return after.split("\n")[-1], False

    @staticmethod
    def last_line(text: str) -> str | None:
        """The last non-empty line of ``text``, or None."""
        lines = [ln for ln in text.split("\n") if ln.strip()]
        return lines[-1] if lines else None
