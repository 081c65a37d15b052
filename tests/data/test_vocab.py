from data.vocab import (BY_NAME, FINDING_NAMES, FINDINGS, LOBES, SYSTEMS, Label, finding, findings_in_system,
                        validate_label, vocabulary_table)

import pytest


def test_names_unique_and_systems_known():
    assert len(set(FINDING_NAMES)) == len(FINDING_NAMES)
    systems = {k for k, _ in SYSTEMS}
    assert all(f.system in systems for f in FINDINGS)
    assert sum(len(findings_in_system(s)) for s in systems) == len(FINDINGS)


def test_at_least_ten_generated_types_with_required_ones():
    generated = {f.name for f in FINDINGS if f.generated}
    assert len(generated) >= 10
    for name in ("nodule", "mass", "consolidation", "ground_glass_opacity", "pleural_effusion", "pneumothorax",
                 "emphysema", "cardiomegaly", "pericardial_effusion", "lymphadenopathy", "fracture", "bone_lesion",
                 "hiatal_hernia"):
        assert name in generated


def test_label_roundtrip_and_validation():
    lab = Label("nodule", True, "right", "right upper lobe", 9.0, {"density": "solid"})
    assert Label.from_dict(lab.to_dict()) == lab
    assert validate_label(lab) == []
    assert validate_label(Label("nodule", True, "upper", None)) != []
    assert validate_label(Label("nodule", True, None, "left kidney")) != []
    assert validate_label(Label("nodule", True, attributes={"density": "fluffy"})) != []
    assert validate_label(Label("unicorn", True)) == ["unknown finding 'unicorn'"]


def test_lookup_and_table():
    assert finding("nodule") is BY_NAME["nodule"]
    with pytest.raises(KeyError, match="known"):
        finding("unicorn")
    table = vocabulary_table()
    assert [r["name"] for r in table] == list(FINDING_NAMES)
    assert set(BY_NAME["nodule"].locations) == set(LOBES)
