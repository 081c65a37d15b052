"""CallsVeto: a report may not deny a finding its table calls, nor assert one it does not."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report_ids import examples_tokenizer, report_ids as _ids  # noqa: E402

from data.report_consistency import CallsVeto  # noqa: E402
from data.report_format import SECTION_KEYS  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return examples_tokenizer()


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
    # "CT chest with" commits to the contrast template: refused for a non-contrast scan at the "with"
    assert none(_ids(tok, technique="CT chest with")) and not given(_ids(tok, technique="CT chest with"))
    assert not none(_ids(tok, technique="Axial CT of the chest without intravenous contrast (5 mm), with"))
    # neutral words, other sections: not judged
    assert not none(_ids(tok, technique="CT of the chest"))
    assert not none(_ids(tok, findings="Lungs and airways: Enhancing mass following the prior CT"))
    # the veto follows the acquisition line; none when it does not state the contrast
    assert acquisition_veto(tok, "Acquisition: no IV contrast, 5 mm slices.").contrast is False
    assert acquisition_veto(tok, "Acquisition: IV contrast.").contrast is True
    assert acquisition_veto(tok, "Acquisition: unknown.") is None
    assert acquisition_veto(tok, "Acquisition: 1.5 mm slices.") is None
    assert acquisition_veto(tok, None) is None


def test_acquisition_veto_can_require_the_technique_to_state_the_contrast(tok):
    """AcquisitionVeto(require=True): the Technique's first sentence may not end, nor the section
    close, before it states the header's contrast; once stated, or from the second sentence on,
    it may; and every reference wording of the right kind passes whole."""
    from data.labeler import split_sentences
    from data.report_consistency import AcquisitionVeto, acquisition_veto
    from data.synthetic.reports import T

    comparison = tok.section_ids[SECTION_KEYS.index("comparison")]
    none = AcquisitionVeto(tok, contrast=False, require=True)
    given = AcquisitionVeto(tok, contrast=True, require=True)
    for veto in (none, given):
        assert veto(_ids(tok, technique="CT chest."))  # the sentence ends unstated
        assert veto(_ids(tok, technique="CT chest;"))
        assert veto(_ids(tok, technique="CT chest") + [comparison])  # the section closes unstated
        assert not veto(_ids(tok, technique="CT chest"))  # still open
    assert not none(_ids(tok, technique="CT of the chest without intravenous contrast."))
    assert not none(_ids(tok, technique="CT of the chest without intravenous contrast.") + [comparison])
    assert not given(_ids(tok, technique="CT chest with IV contrast; 5 mm axial images.") + [comparison])
    assert given(_ids(tok, technique="CT of the chest without intravenous contrast."))  # contradicts
    # without require, the unstated sentence passes (the veto only refuses contradictions)
    assert not AcquisitionVeto(tok, contrast=False)(_ids(tok, technique="CT chest.") + [comparison])
    assert acquisition_veto(tok, "Acquisition: no IV contrast.", require=True).require is True
    # a reference wording of the right kind: require refuses none of its prefixes that the plain
    # veto lets through (with this small tokenizer "with|out" is judged at "with" by both), and
    # the section may close after it
    for key, ok, plain in (("technique_contrast", given, AcquisitionVeto(tok, True)),
                           ("technique_noncontrast", none, AcquisitionVeto(tok, False))):
        for variant in T[key]:
            ids = _ids(tok, technique=variant.format(thk=5))
            assert [ok(ids[:i]) for i in range(1, len(ids) + 1)] == [plain(ids[:i]) for i in range(1, len(ids) + 1)], variant
            assert not ok(ids + [comparison]), variant


def test_any_veto_refuses_what_either_refuses():
    from core.generate import any_veto

    a, b = (lambda t: 1 in t), (lambda t: 2 in t)
    both = any_veto([a, None, b])
    assert both([1]) and both([2]) and not both([3])
    assert any_veto([None, a]) is a and any_veto([None, None]) is None


def _refused(veto, tok, sections: dict, continuation: str) -> bool:
    """Whether the veto refuses any piece of ``continuation`` written after ``sections``."""
    base, new = _ids(tok, **sections), tok.encode(continuation)
    return any(veto(base + new[: i + 1]) for i in range(len(new)))


@pytest.mark.parametrize("sections, continuation, refused", [
    ({"findings": "The solid nodule in the right lower lobe has increased from 9 mm to"}, " 12 mm", False),
    ({"findings": "The solid nodule in the right lower lobe has increased from 12 mm to"}, " 10 mm", True),
    ({"findings": "The nodule has decreased from 9 mm to"}, " 9 mm", True),
    ({"findings": "The nodule has decreased from 9 mm to"}, " 7.5 mm", False),
    ({"findings": "The nodule has increased from 9 mm to"}, " 9.5 mm", False),
    # a size stated earlier in the sentence, agreeing with the direction, is the new size
    ({"impression": "1. 12 mm solid nodule in the right lower lobe, increased from 9 mm to"}, " 10 mm", True),
    ({"impression": "1. 12 mm solid nodule in the right lower lobe, increased from 9 mm to"}, " 12 mm", False),
    ({"impression": "1. 8 mm solid nodule in the right lower lobe, increased from 9 mm to"}, " 10 mm", False),
    # the Impression repeats the change the Findings stated from the same prior
    ({"findings": "The nodule has increased from 9 mm to 12 mm since 2020.",
      "impression": "1. Right lower lobe nodule, increased from 9 mm to"}, " 11 mm", True),
    ({"findings": "The nodule has increased from 9 mm to 12 mm since 2020.",
      "impression": "1. Right lower lobe nodule, increased from 9 mm to"}, " 12 mm", False),
    ({"findings": "The nodule has increased from 9 mm to"}, " 1 mm", True),  # a number finished by " mm"
    # the direction word keeps to the change the report already stated
    ({"findings": "The nodule has increased from 8 mm to 10 mm since 2019.",
      "impression": "1. Left upper lobe solid nodule, 8 mm,"}, " decreased from", True),
    ({"findings": "The nodule has increased from 8 mm to 10 mm since 2019.",
      "impression": "1. Left upper lobe solid nodule, 8 mm,"}, " increased from", False),
    ({"findings": "The nodule has remained unchanged at 9 mm since 2019.", "impression": "1. Nodule has"},
     " increased from", True),
    ({"findings": "The nodule has decreased from 9 mm to 7 mm since 2019.", "impression": "1. Nodule has"},
     " remained", True),
    ({"impression": "1. Nodule has"}, " increased from", False),
    ({"technique": "increased from 12 mm to"}, " 10 mm", False),  # outside Findings and Impression
    ({"findings": "The nodule has increased from 9 mm to 12 mm"}, " since", False),
])
def test_measurement_veto_keeps_a_nodule_change_to_its_own_numbers(tok, sections, continuation, refused):
    """MeasurementVeto, fed piece by piece (this tokenizer splits numbers into digits, the demo
    model's keeps "12" whole): a number that cannot be finished consistently is refused."""
    from data.report_consistency import MeasurementVeto

    veto = MeasurementVeto(tok)
    assert _refused(veto, tok, sections, continuation) is refused
    assert veto.refused == int(refused)


@pytest.mark.parametrize("sections, continuation, prior, measured, refused", [
    # the record's prior (12 mm) and the measurement (5 mm) give the direction and the new size
    ({"findings": "The solid nodule in the right upper lobe has"}, " increased from", 12, 5, True),
    ({"findings": "The solid nodule in the right upper lobe has"}, " decreased from", 12, 5, False),
    ({"findings": "The solid nodule in the right upper lobe has"}, " increased from", 9, 9, True),
    ({"findings": "The solid nodule in the right upper lobe has remained"}, " unchanged at", 9, 9, False),
    # "remained" already says "unchanged": refused where the size changed, before the decoder is stuck
    ({"findings": "The solid nodule in the right upper lobe has"}, " remained", 18, 16, True),
    ({"findings": "The solid nodule in the right upper lobe has"}, " remained", 9, 9, False),
    ({"findings": "The solid nodule in the right upper lobe has"}, " decreased", 18, 16, False),
    ({"findings": "The solid nodule in the right upper lobe has decreased from 12 mm to"}, " 8 mm", 12, 5, True),
    ({"findings": "The solid nodule in the right upper lobe has decreased from 12 mm to"}, " 5 mm", 12, 5, False),
    ({"findings": "The solid nodule in the right upper lobe has increased from 9 mm to"}, " 13 mm", 9, 12, True),
    # a change from another prior size is held to its own numbers only; without a prior, no direction
    ({"findings": "The solid nodule in the right upper lobe has increased from 7 mm to"}, " 13 mm", 9, 12, False),
    ({"findings": "The solid nodule in the right upper lobe has"}, " increased from", None, 5, False),
])
def test_measurement_veto_follows_the_record_and_the_measurement(tok, sections, continuation, prior, measured, refused):
    from data.report_consistency import MeasurementVeto

    assert _refused(MeasurementVeto(tok, prior, measured), tok, sections, continuation) is refused


def test_record_prior_nodule_size():
    from data.finding_prompt import record_prior_nodule_mm

    prior_ct = ("PRIOR CT (2021)\nThere is a 9 mm solid nodule in the right lower lobe. Heart size is normal.\n"
                "Impression: 9 mm right lower lobe nodule. Follow-up CT recommended.\n")
    assert record_prior_nodule_mm(prior_ct) == 9.0
    assert record_prior_nodule_mm(prior_ct + "Thyroid ultrasound: 14 mm thyroid nodule in the right lobe.") == 9.0
    assert record_prior_nodule_mm(prior_ct + "A 5 mm nodule in the left upper lobe.") is None  # two nodules
    assert record_prior_nodule_mm("Renal ultrasound: 6 mm nonobstructing kidney stone.") is None
    assert record_prior_nodule_mm(None) is None


def test_change_contradictions_counts_what_the_veto_prevents():
    from data.report_consistency import change_contradictions

    assert change_contradictions("Nodule has increased from 12 mm to 10 mm.") == (1, 1)
    assert change_contradictions("Decreased from 9 mm to 9 mm.") == (1, 1)
    text = ("The nodule has increased from 9 mm to 12 mm since 2020.\nIMPRESSION:\n"
            "1. Nodule, increased from 9 mm to 11 mm.")
    assert change_contradictions(text) == (1, 2)  # the second disagrees with the first
    assert change_contradictions("Decreased from 9 mm to 7 mm. Decreased from 9 mm to 7 mm.") == (0, 2)
    assert change_contradictions("Remained unchanged at 9 mm. Decreased from 9 mm to 7 mm.") == (1, 2)
    assert change_contradictions("No nodule.") == (0, 0)


def test_calls_agreement_scores_a_candidate_report_by_the_findings_table(tok):
    """CallsAgreement (the MBR rerank): weight x the share of the 15 findings on which the
    labeller's reading of a candidate (Findings and Impression) agrees with the calls; a hedge
    counts as not stated; the clinical information is not read."""
    from data.report_consistency import CallsAgreement
    from data.vocab import FINDING_NAMES

    K = len(FINDING_NAMES)
    score = CallsAgreement(tok, ["cardiomegaly"], weight=2.0)
    says = _ids(tok, clinical_information="Effusion on the prior radiograph.",
                findings="Heart and mediastinum: The heart is enlarged.", impression="1. Cardiomegaly.")
    denies = _ids(tok, findings="Heart and mediastinum: The heart is normal in size.", impression="1. No acute findings.")
    adds = _ids(tok, findings="Heart and mediastinum: The heart is enlarged. Pleura: There is a small right pleural effusion.",
                impression="1. Cardiomegaly.")
    hedges = _ids(tok, findings="Lungs and airways: Cannot exclude a small nodule.", impression="1. Cardiomegaly.")
    assert score(says) == pytest.approx(2.0)
    assert score(denies) == pytest.approx(2.0 * (K - 1) / K)
    assert score(adds) == pytest.approx(2.0 * (K - 1) / K)
    assert score(hedges) == pytest.approx(2.0)
    assert CallsAgreement(tok, []).agreement("FINDINGS:\nHeart and mediastinum: The heart is enlarged.") == pytest.approx((K - 1) / K)
    with pytest.raises(ValueError, match="unknown finding"):
        CallsAgreement(tok, ["heart_attack"])


def test_record_agreement_scores_the_record_facts_a_candidate_carries(tok):
    """RecordAgreement (the MBR rerank): weight x the share of the record's facts named in the
    Findings or Impression (the clinical information does not count); 0 without facts, and 0 for a
    sample that never ended (a runaway that hit the length cap)."""
    from data.report_consistency import RecordAgreement

    score = RecordAgreement(tok, ["Prostate cancer", "right upper lobectomy"], weight=3.0)
    both = _ids(tok, clinical_information="Staging.", findings="Lungs and airways: Changes of prior right upper lobectomy.",
                impression="1. No metastatic disease from the known prostate cancer.") + [tok.eos_id]
    one = _ids(tok, clinical_information="History of prostate cancer.",
               findings="Lungs and airways: Changes of prior right upper lobectomy.", impression="1. No acute findings.") + [tok.eos_id]
    none = _ids(tok, findings="Lungs and airways: Clear.", impression="1. No acute findings.") + [tok.eos_id]
    assert score(both) == pytest.approx(3.0)
    assert score(one) == pytest.approx(1.5)
    assert score(none) == 0.0
    assert score(both[:-1]) == 0.0  # the same text, unfinished: no credit
    assert RecordAgreement(tok, [])(both) == 0.0


def test_acquisition_agreement_scores_a_technique_that_states_the_scans_contrast(tok):
    """AcquisitionAgreement (the MBR rerank): weight when the Technique states the header's
    contrast, 0 when it leaves it out, states the opposite, or the sample never ended; words
    elsewhere in the report do not count."""
    from data.report_consistency import AcquisitionAgreement, technique_states

    def ids(technique, findings="Lungs and airways: Clear."):
        return _ids(tok, technique=technique, findings=findings, impression="1. No acute findings.") + [tok.eos_id]

    plain = AcquisitionAgreement(tok, contrast=False, weight=2.0)
    without = ids("Axial CT of the chest without intravenous contrast (5 mm).")
    garbled = ids("CT chest dated 2023 at 5 mm.")
    enhanced = ids("CT of the chest following intravenous contrast, 5 mm slices.")
    assert plain(without) == pytest.approx(2.0)
    assert plain(garbled) == 0.0  # the contrast left out: what the veto cannot refuse
    assert plain(enhanced) == 0.0
    assert plain(without[:-1]) == 0.0  # unfinished: no credit
    # the contrast allergy named outside the Technique does not count
    assert plain(ids("CT chest.", findings="Lungs and airways: Clear. Known contrast allergy.")) == 0.0
    given = AcquisitionAgreement(tok, contrast=True, weight=1.0)
    assert given(enhanced) == pytest.approx(1.0)
    assert given(without) == 0.0 and given(garbled) == 0.0
    assert given.states("TECHNIQUE:\nContrast-enhanced CT of the chest.") and not given.states("TECHNIQUE:\nCT chest.")
    # the rule the veto uses
    assert technique_states("Non-enhanced CT of the chest.", False) and not technique_states("CT of the chest.", False)
