"""The finding prompt: calls in report words, vocabulary order, location / side rules."""
from __future__ import annotations

import pytest

from data.finding_prompt import finding_phrase, finding_prompt


def test_phrases_use_location_then_side_where_the_finding_takes_them():
    assert finding_phrase("nodule", "right", "right lower lobe") == "right lower lobe nodule"
    assert finding_phrase("nodule", "right", "unspecified") == "right nodule"
    assert finding_phrase("pleural_effusion", "left", "right lower lobe") == "left pleural effusion"  # no location
    assert finding_phrase("cardiomegaly", "left", "subcarinal") == "cardiomegaly"  # neither
    assert finding_phrase("emphysema", "left", None) == "emphysema"  # side not allowed for it
    assert finding_phrase("ground_glass_opacity", "none", "left upper lobe") == "left upper lobe ground-glass opacity"
    assert finding_phrase("fracture", "none", "lower thoracic spine") == "lower thoracic spine fracture"
    assert finding_phrase("not_in_vocabulary", "left", "subcarinal") == "not in vocabulary"
    # a lobectomy is named as the procedure, the words the reports use
    assert finding_phrase("lobectomy", "right", "right upper lobe") == "right upper lobectomy"
    assert finding_phrase("lobectomy", "left", "unspecified") == "left lobectomy"


def test_prompt_orders_calls_as_the_vocabulary_and_says_none():
    calls = [("cardiomegaly", "none", "unspecified"), ("nodule", "right", "right middle lobe")]
    assert finding_prompt(calls) == "Calls: right middle lobe nodule; cardiomegaly."
    assert finding_prompt(list(reversed(calls))) == finding_prompt(calls)
    assert finding_prompt([]) == "Calls: none."


def test_prompt_by_system_gives_each_findings_line_its_calls():
    """ModelConfig.finding_prompt_by_system: the calls under the organ-system headings in report
    order, every system named; the training and inference prompts (config_prompt_ids) agree."""
    from multimodal.model import config_prompt_ids
    from multimodal.presets import ModelConfig

    calls = [("hiatal_hernia", None, None), ("lobectomy", "left", "left upper lobe"), ("cardiomegaly", None, None),
             ("nodule", "right", "right lower lobe", 12.0), ("fracture", "right", "T7")]
    assert finding_prompt(calls, by_system=True) == (
        "Calls: Lungs and airways: right lower lobe nodule 12 mm; left upper lobectomy. Pleura: none. "
        "Heart and mediastinum: cardiomegaly. Bones: T7 fracture. Upper abdomen: hiatal hernia.")
    assert finding_prompt([], by_system=True) == ("Calls: Lungs and airways: none. Pleura: none. "
                                                  "Heart and mediastinum: none. Bones: none. Upper abdomen: none.")
    assert finding_prompt([("goitre", None, None)], by_system=True).endswith("Upper abdomen: none. goitre.")

    class Tok:  # the prompt's text, one "id" per character
        class tk:
            @staticmethod
            def encode(text, add_special_tokens=False):
                return type("E", (), {"ids": [ord(c) for c in text]})

    cfg = ModelConfig(finding_prompt=True, finding_prompt_by_system=True)
    assert "".join(map(chr, config_prompt_ids(Tok, cfg, calls[:1], None))) == finding_prompt(calls[:1], by_system=True)
    assert ModelConfig.from_dict(cfg.to_dict()).finding_prompt_by_system is True


def test_contrast_from_the_header_then_the_study_description():
    from data.finding_prompt import contrast_from_metadata

    assert contrast_from_metadata({"contrast_agent_stated": True, "contrast_agent_present": True}) is True
    assert contrast_from_metadata({"contrast_agent_stated": True, "contrast_agent_present": False,
                                   "study_description": "CT CHEST WITH CONTRAST"}) is False  # the header's "NONE" wins
    assert contrast_from_metadata({"contrast_agent_present": False, "study_description": "CT CHEST WITHOUT CONTRAST"}) is False
    assert contrast_from_metadata({"study_description": "CT THORAX W/O"}) is False
    assert contrast_from_metadata({"study_description": "CT Thorax non-contrast"}) is False
    assert contrast_from_metadata({"study_description": "CT CHEST W/ CONTRAST"}) is True
    assert contrast_from_metadata({"study_description": "CTA chest (pulmonary angiogram)"}) is True
    assert contrast_from_metadata({"study_description": "CT CHEST"}) is None  # says nothing
    assert contrast_from_metadata({}) is None  # NIfTI, PNG


def test_acquisition_line():
    from types import SimpleNamespace as NS

    from data.finding_prompt import acquisition_phrase, study_acquisition

    assert acquisition_phrase(True, 2.5) == "Acquisition: IV contrast, 2.5 mm slices."
    assert acquisition_phrase(False, 5.0) == "Acquisition: no IV contrast, 5 mm slices."
    assert acquisition_phrase(None, 1.25) == "Acquisition: 1.25 mm slices."
    assert acquisition_phrase(None, None) == acquisition_phrase(None, 0.0) == "Acquisition: unknown."
    md = {"contrast_agent_stated": True, "contrast_agent_present": True, "slice_thickness_mm": 3.0}
    assert study_acquisition(NS(metadata=md, kind="volume", spacing_mm=(2.0, 1.0, 1.0))) == "Acquisition: IV contrast, 3 mm slices."  # header thickness first
    assert study_acquisition(NS(metadata={}, kind="volume", spacing_mm=(1.5, 1.0, 1.0))) == "Acquisition: 1.5 mm slices."  # NIfTI: the slice spacing
    assert study_acquisition(NS(metadata={}, kind="radiograph", spacing_mm=(1.0, 1.0, 1.0))) == "Acquisition: unknown."


def test_acquisition_line_without_thickness():
    """ModelConfig.acquisition_thickness False: the contrast stays, the thickness goes; a line with
    nothing else left (or an unknown one) says unknown; training and inference prompts agree."""
    from data.finding_prompt import acquisition_phrase, without_thickness
    from multimodal.model import config_prompt_ids
    from multimodal.presets import ModelConfig

    assert without_thickness(acquisition_phrase(True, 10.0)) == "Acquisition: IV contrast."
    assert without_thickness(acquisition_phrase(False, 2.5)) == "Acquisition: no IV contrast."
    assert without_thickness(acquisition_phrase(None, 1.25)) == "Acquisition: unknown."
    assert without_thickness(acquisition_phrase(None, None)) == "Acquisition: unknown."
    assert without_thickness("not an acquisition line") == "not an acquisition line"

    class Tok:  # the prompt's text, one "id" per character
        class tk:
            @staticmethod
            def encode(text, add_special_tokens=False):
                return type("E", (), {"ids": [ord(c) for c in text]})

    def text(**kw):
        cfg = ModelConfig(acquisition_prompt=True, **kw)
        return "".join(map(chr, config_prompt_ids(Tok, cfg, [], acquisition_phrase(True, 10.0))))

    assert text() == "Acquisition: IV contrast, 10 mm slices."
    assert text(acquisition_thickness=False) == "Acquisition: IV contrast."
    assert ModelConfig.from_dict({**ModelConfig(acquisition_thickness=False).to_dict()}).acquisition_thickness is False


def test_synthetic_dicom_header_gives_the_truth(tmp_path):
    """The synthetic writer states the agent for contrast studies and only the description for
    the others (like many scanners): both must read back as the case's truth."""
    import numpy as np

    from data.finding_prompt import study_acquisition
    from data.study import load_study
    from data.synthetic.dicom_writer import write_series
    from data.synthetic.findings import sample_case
    from data.synthetic.phantom import render

    for allergy in (False, True):
        case = sample_case(np.random.default_rng(3), "t3", 3, "train", "tiny", force={"contrast_allergy": allergy, "has_history": True})
        ph = render(case)
        write_series(case, ph.hu, ph.spacing, tmp_path / str(allergy))
        study = load_study(tmp_path / str(allergy))
        thk = f"{case.acquisition['slice_thickness']:g}"
        want = f"Acquisition: {'no IV contrast' if allergy else 'IV contrast'}, {thk} mm slices."
        assert study_acquisition(study) == want


@pytest.mark.parametrize("text, expected", [
    ("SURGICAL HISTORY\nSurgical history: right upper lobectomy in 2015. Recovery uncomplicated.", "right upper lobe"),
    ("s/p RLL lobectomy (2010)", "right lower lobe"),
    ("Lobectomy of the left lower lobe for carcinoid.", "left lower lobe"),
    ("Right Upper Lobe Lobectomy 2001", "right upper lobe"),
    ("Right upper lobectomy 2001.\nFollow-up after right upper lobectomy: no recurrence.", "right upper lobe"),
    # nothing when the record is silent, ambiguous, negated or only planning the operation
    ("No prior thoracic surgery.", None),
    ("Right upper lobectomy 2001. Left lower lobectomy 2012.", None),
    ("No prior lobectomy. Denies right upper lobectomy.", None),
    ("Candidate for left upper lobectomy after staging.", None),
    ("Right upper lobectomy is planned next month.", None),
    ("", None),
    (None, None),
])
def test_record_locations_reads_the_lobe_of_a_lobectomy(text, expected):
    from data.finding_prompt import record_locations

    assert record_locations(text) == ({"lobectomy": expected} if expected else {})


@pytest.mark.parametrize("text, expected", [
    ("PRIOR CT (2021)\nThere is a 9 mm solid nodule in the left lower lobe.\n"
     "Impression: 9 mm left lower lobe nodule. Follow-up CT recommended.", "left lower lobe"),
    ("Stable 6 mm RUL nodule.", "right upper lobe"),
    ("Pulmonary nodule, right middle lobe, 5 mm. Status post left upper lobectomy.", "right middle lobe"),
    # not a lung nodule, denied, two lobes, or no lobe: nothing
    ("Thyroid nodule in the right lobe.", None),
    ("No pulmonary nodules in the right upper lobe.", None),
    ("A 5 mm RUL nodule. A 4 mm nodule in the left lower lobe.", None),
    ("Reason for exam: follow-up of pulmonary nodule.", None),
    (None, None),
])
def test_record_locations_reads_the_lobe_of_a_known_nodule(text, expected):
    from data.finding_prompt import record_locations, record_nodule_lobe

    assert record_nodule_lobe(text) == expected
    assert record_locations(text).get("nodule") == expected


def test_record_locations_on_the_synthetic_follow_ups():
    """Every test-split follow-up record of a fresh synthetic sample states its prior nodule's
    lobe, and record_locations reads exactly the labelled lobe (the histories' distractors, e.g. a
    thyroid nodule, are not read)."""
    import numpy as np

    from data.finding_prompt import record_locations
    from data.synthetic.findings import sample_case
    from data.synthetic.histories import write_history

    n = 0
    for seed in range(40):
        case = sample_case(np.random.default_rng(seed), f"f{seed}", seed, "test", "tiny",
                           force={"prior_nodule": True, "has_history": True})
        text = write_history(case, np.random.default_rng(seed), 3000)[0]
        lab = next(x for x in case.labels if x.finding == "nodule")
        assert record_locations(text).get("nodule") == lab.location
        n += 1
    assert n == 40


def test_with_record_locations_moves_a_called_lobectomy_to_the_recorded_lobe():
    from data.finding_prompt import finding_prompt, with_record_locations

    calls = [("lobectomy", "right", "right lower lobe"), ("nodule", "left", "left upper lobe")]
    out = with_record_locations(calls, {"lobectomy": "right upper lobe"})
    assert out == [("lobectomy", "right", "right upper lobe"), ("nodule", "left", "left upper lobe")]
    assert finding_prompt(out) == "Calls: left upper lobe nodule; right upper lobectomy."
    # the side follows the recorded lobe; presence stays the heads' call (no call, no finding)
    assert with_record_locations([("lobectomy", "left", "left upper lobe")], {"lobectomy": "right lower lobe"}) == \
        [("lobectomy", "right", "right lower lobe")]
    assert with_record_locations([("nodule", "left", "left upper lobe")], {"lobectomy": "right upper lobe"}) == \
        [("nodule", "left", "left upper lobe")]
    assert with_record_locations(calls, None) == calls


def test_a_measured_nodule_call_carries_its_size():
    from data.finding_prompt import finding_phrase, finding_prompt, measured_size, with_measurements

    assert finding_phrase("nodule", "right", "right lower lobe", 12.0) == "right lower lobe nodule 12 mm"
    assert finding_phrase("nodule", "right", "right lower lobe", 7.5) == "right lower lobe nodule 7.5 mm"
    calls = [("nodule", "right", "right lower lobe"), ("cardiomegaly", "none", "unspecified")]
    sizes = {"any": 14.0, "left": 14.0, "right": 9.0}
    out = with_measurements(calls, sizes)
    assert out == [("nodule", "right", "right lower lobe", 9.0), ("cardiomegaly", "none", "unspecified")]
    assert finding_prompt(out) == "Calls: right lower lobe nodule 9 mm; cardiomegaly."
    assert measured_size(out) == 9.0 and measured_size(calls) is None
    # no measurement on the called side: no size (the other lung's nodule is not this one)
    assert with_measurements(calls, {"any": 14.0, "left": 14.0}) == calls
    # a call without a side takes the best in either lung
    assert with_measurements([("nodule", "none", "unspecified")], {"any": 14.0})[0][3] == 14.0
    assert with_measurements(calls, None) == calls


def test_known_locations_put_the_record_over_a_detector():
    from data.finding_prompt import known_locations

    rec = {"lobectomy": "right upper lobe", "lymphadenopathy": "subcarinal"}
    assert known_locations(rec, {"lymphadenopathy": "left hilar"}) == (rec, ())
    merged, placed = known_locations({"lobectomy": "right upper lobe"}, {"lymphadenopathy": "left hilar"})
    assert merged == {"lobectomy": "right upper lobe", "lymphadenopathy": "left hilar"} and placed == ("lymphadenopathy",)
    assert known_locations(None, {}) == (None, ()) and known_locations({}, None) == (None, ())
