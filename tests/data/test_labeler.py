"""Report labeller: negation/uncertainty rules, real IU X-Ray sentences, synthetic references."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.labeler import label_report, label_text, presence
from data.report_format import format_report
from data.synthetic.findings import sample_case
from data.synthetic.reports import write_sections
from data.vocab import FINDING_NAMES

FIXTURE = Path(__file__).parent / "fixtures" / "iu_xray_sentences.json"


def _p(text: str) -> dict:
    return {lab.finding: lab.present for lab in label_text(text)}


@pytest.mark.parametrize("text,expected", [
    ("No pneumothorax or pleural effusion.", {"pneumothorax": False, "pleural_effusion": False}),
    ("No focal airspace consolidation, pleural effusion, or pneumothorax.",
     {"consolidation": False, "pleural_effusion": False, "pneumothorax": False}),
    ("Small right pleural effusion.", {"pleural_effusion": True}),
    ("Pneumonia cannot be excluded.", {"consolidation": None}),
    ("Cannot exclude a small left pleural effusion.", {"pleural_effusion": None}),
    ("Left basilar opacity may represent atelectasis.", {"atelectasis": None}),
    ("The previously seen right pneumothorax has resolved.", {"pneumothorax": False}),
    ("Resolved left pleural effusion.", {"pleural_effusion": False}),
    ("Unchanged 9 mm nodule in the right upper lobe.", {"nodule": True}),
    ("No change in the small left pleural effusion.", {"pleural_effusion": True}),
    ("No pleural or pericardial effusion.", {"pleural_effusion": False, "pericardial_effusion": False}),
    ("Heart size is normal.", {"cardiomegaly": False}),
    ("The heart is enlarged.", {"cardiomegaly": True}),
    ("Borderline cardiomegaly.", {"cardiomegaly": None}),
    ("No acute bony abnormality.", {"fracture": False}),
    ("Lungs are clear.", {}),
    ("There is no focal air space opacity to suggest a pneumonia.", {"consolidation": False}),
    ("Mediastinal and hilar lymph nodes are not enlarged.", {"lymphadenopathy": False}),
    ("6 mm ground-glass nodule in the left lower lobe.", {"nodule": True}),
    ("Patchy ground-glass opacity in the right lower lobe.", {"ground_glass_opacity": True}),
    ("Small pleural effusion, but no pneumothorax.", {"pleural_effusion": True, "pneumothorax": False}),
])
def test_polarity(text, expected):
    assert _p(text) == expected


def test_attributes():
    lab = {x.finding: x for x in label_text("The solid nodule in the right upper lobe has increased from 6 mm to 9 mm.")}
    n = lab["nodule"]
    assert (n.present, n.side, n.location, n.size_mm, n.attributes.get("density")) == (True, "right", "right upper lobe", 9.0, "solid")
    e = label_text("There is a moderate left pleural effusion.")[0]
    assert (e.side, e.attributes["amount"]) == ("left", "moderate")
    lad = label_text("Subcarinal lymphadenopathy measuring 2.1 cm.")[0]
    assert (lad.location, lad.size_mm) == ("subcarinal", 21.0)
    fx = label_text("There is a T8 vertebral compression fracture.")[0]
    assert (fx.location, fx.attributes["type"]) == ("T8", "compression")
    assert label_text("Atelectasis in the lingula.")[0].location == "left upper lobe"
    assert label_text("Small bilateral pleural effusions.")[0].side == "bilateral"


def test_report_level_merge_and_sections():
    text = format_report({"clinical_information": "Follow-up of pulmonary nodule; evaluate for pneumonia.",
                          "findings": "Lungs and airways: The lungs are clear.\nPleura: No pleural effusion.",
                          "impression": "No pneumonia."})
    got = {lab.finding: lab.present for lab in label_report(text)}
    assert "nodule" not in got  # the indication is not a finding
    assert got == {"pleural_effusion": False, "consolidation": False}
    merged = {x.finding: x.present for x in label_text("Possible pneumonia. Consolidation in the left lower lobe.")}
    assert merged["consolidation"] is True
    assert presence(label_text("No effusion."))["pneumothorax"] is False
    assert set(presence([])) == set(FINDING_NAMES)


def _fixture():
    return json.loads(FIXTURE.read_text())["sentences"]


def _accuracy(items):
    ok = 0
    for it in items:
        got = {(lab.finding, lab.present) for lab in label_text(it["sentence"])}
        want = {(lab["finding"], lab["present"]) for lab in it["labels"]}
        ok += got == want
    return ok / len(items)


def test_iu_xray_hand_checked_sentences():
    items = _fixture()
    assert len(items) >= 150
    assert _accuracy(items) >= 0.95
    held = [it for it in items if it["set"] == "heldout"]
    assert len(held) >= 50 and _accuracy(held) >= 0.95
    sides = [(it, lab) for it in items for lab in it["labels"] if "side" in lab]
    got = sum(1 for it, lab in sides
              if {x.finding: x.side for x in label_text(it["sentence"])}.get(lab["finding"]) == lab["side"])
    assert got / len(sides) >= 0.9


def test_fixture_sentences_are_real_iu_xray_text(shared_data):
    data = json.loads((shared_data / "iu_xray_annotation.json").read_text())
    corpus = " ".join(e["report"] for split in data.values() for e in split)
    items = _fixture()
    assert sum(it["sentence"] in corpus for it in items) == len(items)


def test_agreement_with_truth_on_test_template_references():
    n = agree = attr_n = attr_ok = 0
    for i in range(400):
        case = sample_case(np.random.default_rng([7, i]), f"a{i}", i, "test", "demo")
        labels = label_report(format_report(write_sections(case, np.random.default_rng([7, i, 1]))))
        got, by = presence(labels), {lab.finding: lab for lab in labels}
        truth = {lab.finding: lab for lab in case.labels if lab.present}
        for name in FINDING_NAMES:
            n += 1
            agree += got[name] == (name in truth)
            if name in truth and name in by:
                attr_n += 1
                t, g = truth[name], by[name]
                attr_ok += (t.side in (None, g.side)) and (t.location in (None, g.location)) and (t.size_mm in (None, g.size_mm))
    assert agree / n >= 0.99
    assert attr_ok / attr_n >= 0.99
