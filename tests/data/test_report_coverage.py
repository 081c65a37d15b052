"""CoverageVeto: every called finding is written in its organ system's line and in the impression,
and no finding is asserted under another system."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report_ids import EXAMPLES, TwoScripts, examples_tokenizer, report_ids as _ids  # noqa: E402

from core.generate import GenerationConfig, generate  # noqa: E402
from data.datasets import read_manifest  # noqa: E402
from data.report_coverage import SYSTEM_OF, CoverageVeto, RecordVeto, mentioned  # noqa: E402
from data.report_format import SECTION_KEYS, format_report, parse_report  # noqa: E402
from data.vocab import FINDING_NAMES, SYSTEMS  # noqa: E402

NORMAL = ("Lungs and airways: Clear lungs.\nPleura: No effusion.\nHeart and mediastinum: Normal heart size.\n"
          "Bones: No fracture.\nUpper abdomen: Unremarkable.")
IMPRESSION = SECTION_KEYS.index("impression")
TECHNIQUE = SECTION_KEYS.index("technique")


@pytest.fixture(scope="module")
def tok():
    return examples_tokenizer()


def _first_refusal(veto, ids):
    return next((i for i in range(1, len(ids) + 1) if veto(ids[:i])), None)


def test_every_finding_has_a_system_and_the_bundled_references_pass(tok):
    """The map covers the vocabulary, and no token of a bundled reference report is refused
    with its own labels as the calls."""
    assert set(SYSTEM_OF) == set(FINDING_NAMES) and set(SYSTEM_OF.values()) <= {k for k, _ in SYSTEMS}
    for e in read_manifest(EXAMPLES / "manifest.jsonl"):
        called = [lab.finding for lab in e.labels if lab.present]
        ids = tok.encode_report(parse_report(e.report)) + [tok.eos_id]
        veto = CoverageVeto(tok, called)
        assert _first_refusal(veto, ids) is None, e.id
        assert veto.refused == 0


def test_a_line_may_not_end_without_its_system_calls(tok):
    veto = CoverageVeto(tok, ["emphysema", "hiatal_hernia"])
    nl = tok.encode("\n")
    lungs = _ids(tok, findings="Lungs and airways: No focal consolidation or nodule.")
    assert veto(lungs + nl)  # emphysema called, the lungs line leaves it out
    assert not veto(_ids(tok, findings="Lungs and airways: Moderate emphysema.") + nl)
    # a system without a call may end as it likes
    assert not veto(_ids(tok, findings="Lungs and airways: Moderate emphysema.\nPleura: No effusion.") + nl)
    # the last line is ended by the Impression's marker
    assert veto(_ids(tok, findings=NORMAL) + [tok.section_ids[IMPRESSION]])
    ok = NORMAL.replace("Upper abdomen: Unremarkable.", "Upper abdomen: Small hiatal hernia.")
    assert not veto(_ids(tok, findings=ok) + [tok.section_ids[IMPRESSION]])
    # mid-line tokens are not judged for coverage
    assert not veto(lungs)
    # a denial does not cover the call; a hedge does
    assert veto(_ids(tok, findings="Lungs and airways: No emphysema.") + nl)
    assert not veto(_ids(tok, findings="Lungs and airways: Possible mild emphysema.") + nl)
    assert veto.refused == 3


def test_a_finding_is_not_asserted_under_another_system(tok):
    veto = CoverageVeto(tok, ["pericardial_effusion"])
    ids = _ids(tok, findings="Lungs and airways: Clear lungs.\nPleura: There is a small pericardial effusion.")
    at = _first_refusal(veto, ids)
    assert at is not None
    assert "pericardial effusion" in tok.decode(ids[:at]) and "pericardial effusion" not in tok.decode(ids[:at - 1])
    # under its own system it passes, and a denial of another system's finding passes too
    heart = "Lungs and airways: Clear lungs.\nPleura: No effusion.\nHeart and mediastinum: Small pericardial effusion."
    assert _first_refusal(CoverageVeto(tok, ["pericardial_effusion"]), _ids(tok, findings=heart)) is None
    assert _first_refusal(CoverageVeto(tok, []), _ids(tok, findings="Pleura: No pleural or pericardial effusion.")) is None
    # placement=False leaves it
    assert _first_refusal(CoverageVeto(tok, ["pericardial_effusion"], placement=False), ids) is None


def test_the_impression_may_not_end_without_every_call(tok):
    veto = CoverageVeto(tok, ["nodule", "emphysema"])
    eos = [tok.eos_id]
    assert veto(_ids(tok, impression="1. Right lower lobe nodule.") + eos)
    assert not veto(_ids(tok, impression="1. Right lower lobe nodule.\n2. Emphysema.") + eos)
    assert not veto(_ids(tok, impression="1. Right lower lobe nodule."))  # not at its end yet
    assert not CoverageVeto(tok, ["nodule", "emphysema"], impression=False)(
        _ids(tok, impression="1. Right lower lobe nodule.") + eos)
    assert not CoverageVeto(tok, [])(_ids(tok, impression="No acute abnormality.") + eos)


def test_a_long_line_is_let_go_and_unknown_names_are_ignored(tok):
    """A decoder that cannot find the words is not held to the token limit: past ``max_words``
    words the line (or the impression) may end."""
    long = "Lungs and airways: " + " ".join(["The airways are patent."] * 4)
    nl = tok.encode("\n")
    assert CoverageVeto(tok, ["emphysema"], max_words=30)(_ids(tok, findings=long) + nl)
    assert not CoverageVeto(tok, ["emphysema"], max_words=10)(_ids(tok, findings=long) + nl)
    assert not CoverageVeto(tok, ["emphysema"], max_words=3)(
        _ids(tok, impression="No acute abnormality in the chest.") + [tok.eos_id])
    assert CoverageVeto(tok, ["not_a_finding"]).called == frozenset()


def test_mentioned_reads_assertions_and_hedges_not_denials():
    assert mentioned("Moderate emphysema. No pleural effusion.") == {"emphysema"}
    assert "consolidation" in mentioned("Cannot exclude pneumonia.")
    assert mentioned("No pneumothorax.") == set()


def test_greedy_decoding_with_the_veto_writes_the_called_finding(tok):
    """Through core.generate: the decoder's first choice writes the normal upper-abdomen line
    although a hiatal hernia is called, its second writes the hernia; with the veto the report
    carries the call, without it the call is lost."""
    good = {"technique": "CT chest.", "findings": NORMAL.replace("Unremarkable.", "Unremarkable. Small hiatal hernia."),
            "impression": "Small hiatal hernia."}
    bad = {**good, "findings": NORMAL}
    g = tok.encode_report(good) + [tok.eos_id]
    b = tok.encode_report(bad) + [tok.eos_id]
    cfg = GenerationConfig(max_new_tokens=len(g) + 5, eos_id=tok.eos_id)
    dec = TwoScripts(tok.vocab_size, b, g)
    assert generate(dec, [[tok.bos_id]], None, None, cfg) == [b]
    assert generate(dec, [[tok.bos_id]], None, None, cfg, vetoes=[CoverageVeto(tok, ["hiatal_hernia"])]) == [g]
    assert "Upper abdomen: Unremarkable. Small hiatal hernia." in format_report(tok.decode_report(g))


# -- RecordVeto: the record's known malignancies and resections ---------------------------------

def test_record_veto_keeps_a_known_cancer_in_the_clinical_information_and_the_impression(tok):
    veto = RecordVeto(tok, ["prostate cancer"], impression=True)
    tech = [tok.section_ids[TECHNIQUE]]
    assert veto(_ids(tok, clinical_information="Follow-up of pulmonary nodule.") + tech)
    assert not veto(_ids(tok, clinical_information="Follow-up of pulmonary nodule. Known prostate cancer.") + tech)
    assert not veto(_ids(tok, clinical_information="Follow-up of pulmonary nodule."))  # not closed yet
    eos = [tok.eos_id]
    assert veto(_ids(tok, impression="1. Right lower lobe nodule.") + eos)
    assert not veto(_ids(tok, impression="1. Right lower lobe nodule.\n2. No evidence of metastatic disease "
                                         "from the known prostate cancer.") + eos)
    # other sections close as they like; the Findings are not held to a cancer
    assert not veto(_ids(tok, findings=NORMAL) + [tok.section_ids[IMPRESSION]])
    assert veto.refused == 2
    # by default the impression is left to the decoder (it appended broken items when held to it)
    assert not RecordVeto(tok, ["prostate cancer"])(_ids(tok, impression="1. Right lower lobe nodule.") + eos)


def test_record_veto_keeps_a_resection_in_the_lungs_line(tok):
    veto = RecordVeto(tok, ["right upper lobectomy"])
    nl = tok.encode("\n")
    assert veto(_ids(tok, findings="Lungs and airways: The lungs are clear.") + nl)
    assert not veto(_ids(tok, findings="Lungs and airways: Status post right upper lobectomy.") + nl)
    assert not veto(_ids(tok, findings="Lungs and airways: Status post right upper lobectomy.\nPleura: No effusion.") + nl)
    # the Findings closed by the Impression's marker with the lungs line last
    assert veto(_ids(tok, findings="Lungs and airways: The lungs are clear.") + [tok.section_ids[IMPRESSION]])
    # a resection is not asked of the clinical information or the impression
    assert not veto(_ids(tok, clinical_information="Cough.") + [tok.section_ids[TECHNIQUE]])
    assert not veto(_ids(tok, impression="No acute abnormality.") + [tok.eos_id])


def test_record_veto_lets_long_sections_go_and_passes_the_bundled_references(tok):
    long = "Lungs and airways: " + " ".join(["The airways are patent."] * 6)
    nl = tok.encode("\n")
    assert RecordVeto(tok, ["left lower lobectomy"], max_words=40)(_ids(tok, findings=long) + nl)
    assert not RecordVeto(tok, ["left lower lobectomy"], max_words=10)(_ids(tok, findings=long) + nl)
    assert not RecordVeto(tok, [])(_ids(tok, impression="No acute abnormality.") + [tok.eos_id])
    assert RecordVeto(tok, ["Breast Cancer", "left pneumonectomy"]).malignancies == ("breast cancer",)
    # the bundled examples whose record names a cancer or a resection: their references pass
    from data.history_digest import record_facts
    checked = 0
    for e in read_manifest(EXAMPLES / "manifest.jsonl"):
        text = e.path(e.history).read_text(encoding="utf-8") if e.history else e.history_text
        facts = record_facts(text)
        if not facts:
            continue
        ids = tok.encode_report(parse_report(e.report)) + [tok.eos_id]
        assert _first_refusal(RecordVeto(tok, facts), ids) is None, (e.id, facts)
        checked += 1
    assert checked >= 1


def test_greedy_decoding_with_the_record_veto_writes_the_known_cancer(tok):
    """Through core.generate: the decoder's first choice closes the clinical information on the
    indication, its second goes on to the known cancer; with the veto the report names it."""
    good = {"clinical_information": "Cough. Known breast cancer.", "technique": "CT chest.", "findings": NORMAL,
            "impression": "No evidence of metastatic disease from the known breast cancer."}
    bad = {**good, "clinical_information": "Cough."}
    g = tok.encode_report(good) + [tok.eos_id]
    b = tok.encode_report(bad) + [tok.eos_id]
    cfg = GenerationConfig(max_new_tokens=len(g) + 5, eos_id=tok.eos_id)
    dec = TwoScripts(tok.vocab_size, b, g)
    assert generate(dec, [[tok.bos_id]], None, None, cfg) == [b]
    assert generate(dec, [[tok.bos_id]], None, None, cfg, vetoes=[RecordVeto(tok, ["breast cancer"])]) == [g]
