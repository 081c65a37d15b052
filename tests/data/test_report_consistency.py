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


def test_acquisition_veto_keeps_the_technique_to_the_header(tok):
    """AcquisitionVeto: a non-contrast scan's Technique may not say contrast was given, from the
    first word that commits to it ("following", "after", "Contrast-enhanced", "with IV"); a
    contrast scan's may not say none was. Other sections and the right wording pass."""
    from data.report_consistency import AcquisitionVeto, acquisition_veto
    from data.synthetic.reports import T

    none = AcquisitionVeto(tok, contrast=False)
    given = AcquisitionVeto(tok, contrast=True)
    for text in ("CT of the chest following", "Axial CT images of the chest were obtained after",
                 "Contrast-enhanced CT of the chest", "CT chest with IV"):
        assert none(_ids(tok, technique=text)), text
        assert not given(_ids(tok, technique=text)), text
    for text in ("CT of the chest without", "Non-enhanced CT of the chest", "Axial CT of the chest without intravenous"):
        assert given(_ids(tok, technique=text)), text
        assert not none(_ids(tok, technique=text)), text
    # every reference wording of each kind passes its own side and is refused by the other (the
    # veto reads the sentence being written: here each variant's first, which states the contrast)
    from data.labeler import split_sentences

    for key, ok, bad in (("technique_contrast", given, none), ("technique_noncontrast", none, given)):
        for variant in T[key]:
            ids = _ids(tok, technique=split_sentences(variant.format(thk=5))[0])
            assert not ok(ids) and bad(ids), variant
    # neutral words, other sections: not judged
    assert not none(_ids(tok, technique="CT of the chest"))
    assert not none(_ids(tok, findings="Lungs and airways: Enhancing mass following the prior CT"))
    # the veto follows the acquisition line; none when it does not state the contrast
    assert acquisition_veto(tok, "Acquisition: no IV contrast, 5 mm slices.").contrast is False
    assert acquisition_veto(tok, "Acquisition: IV contrast.").contrast is True
    assert acquisition_veto(tok, "Acquisition: unknown.") is None
    assert acquisition_veto(tok, "Acquisition: 1.5 mm slices.") is None
    assert acquisition_veto(tok, None) is None


def test_any_veto_refuses_what_either_refuses():
    from core.generate import any_veto

    a, b = (lambda t: 1 in t), (lambda t: 2 in t)
    both = any_veto([a, None, b])
    assert both([1]) and both([2]) and not both([3])
    assert any_veto([None, a]) is a and any_veto([None, None]) is None
