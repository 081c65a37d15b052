"""CallsVeto: a report may not deny a finding its table calls, nor assert one it does not."""
from __future__ import annotations

import pytest

from data.datasets import read_manifest
from data.report_consistency import CallsVeto
from data.tokenizer import ReportTokenizer

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def tok():
    entries = read_manifest(EXAMPLES / "manifest.jsonl")
    return ReportTokenizer.train([e.report for e in entries], vocab_size=400, min_frequency=1)


def _ids(tok, **sections):
    """Report ids up to the end of the last given section (no later markers)."""
    from data.report_format import SECTION_KEYS

    ids = []
    for key, sid in zip(SECTION_KEYS, tok.section_ids):
        if key in sections:
            ids.append(sid)
            ids += tok.encode(sections[key])
    return ids


def test_denying_a_called_finding_or_asserting_an_uncalled_one_is_refused(tok):
    veto = CallsVeto(tok, ["cardiomegaly"])
    assert veto(_ids(tok, findings="Heart and mediastinum: The heart is normal"))
    assert veto(_ids(tok, findings="Heart and mediastinum: Heart size is normal"))
    assert not veto(_ids(tok, findings="Heart and mediastinum: The heart is enlarged"))
    assert not veto(_ids(tok, findings="Heart and mediastinum: The heart is"))  # nothing said yet
    assert veto(_ids(tok, findings="Pleura: There is a small right pleural effusion"))  # not called
    assert not veto(_ids(tok, findings="Pleura: No pleural effusion or pneumothorax."))
    assert not veto(_ids(tok, findings="Lungs and airways: Cannot exclude a small nodule"))  # uncertain
    assert veto(_ids(tok, findings="Heart and mediastinum: Cardiomegaly.", impression="1. No cardiomegaly"))
    assert veto.refused == 4  # the four refusals above


def test_only_the_sentence_being_written_and_only_findings_and_impression(tok):
    veto = CallsVeto(tok, ["cardiomegaly"])
    # an earlier sentence is not re-judged; the new one is
    assert not veto(_ids(tok, findings="Heart and mediastinum: The heart is enlarged. No pericardial effusion"))
    # clinical information and technique are the record's words: not checked
    assert not veto(_ids(tok, clinical_information="No cardiomegaly on the prior radiograph"))
    assert not veto([])
    called = CallsVeto(tok, [])
    assert called(_ids(tok, impression="1. Cardiomegaly"))
    with pytest.raises(ValueError, match="unknown report section"):
        CallsVeto(tok, [], sections=("summary",))
