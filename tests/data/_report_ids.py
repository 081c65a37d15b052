"""Shared by the decoding-veto tests: a small tokenizer trained on the bundled examples' reports,
and a report's token ids written section by section."""
from __future__ import annotations

from pathlib import Path

from data.datasets import read_manifest
from data.report_format import SECTION_KEYS
from data.tokenizer import ReportTokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def examples_tokenizer() -> ReportTokenizer:
    """A 400-token BPE trained on the bundled examples' reports (splits many words: vetoes are
    then judged on word pieces)."""
    entries = read_manifest(EXAMPLES / "manifest.jsonl")
    return ReportTokenizer.train([e.report for e in entries], vocab_size=400, min_frequency=1)


def report_ids(tok, **sections) -> list[int]:
    """Report ids up to the end of the last given section (no later markers)."""
    ids = []
    for key, sid in zip(SECTION_KEYS, tok.section_ids):
        if key in sections:
            ids.append(sid)
            ids += tok.encode(sections[key])
    return ids
