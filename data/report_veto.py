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
