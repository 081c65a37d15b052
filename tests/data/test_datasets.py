"""Manifests and dataset adapters (each tested on a fixture in exactly the source layout)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.datasets import (ManifestEntry, ManifestError, add_training_studies, ct_rate_volume_path, from_ct_rate, from_r2gen, from_table,
                           read_manifest, validate_entry, write_manifest)
from data.vocab import Label

FIX = Path(__file__).parent / "fixtures"


def _present(entry):
    return {lab.finding: lab.present for lab in entry.labels}


def test_manifest_roundtrip_and_validation(tmp_path):
    (tmp_path / "s1").mkdir()
    e = ManifestEntry(id="a", split="train", study="s1", report="FINDINGS:\nx", labels=[Label("nodule", True, "left")],
                      root=tmp_path)
    m = write_manifest([e], tmp_path / "manifest.jsonl")
    back = read_manifest(m, check_files=True)
    assert back[0].to_dict() == e.to_dict() and back[0].study_path == tmp_path / "s1"
    d = e.to_dict()
    assert set(d) == {"id", "split", "study", "history", "history_text", "audio", "report", "sections", "labels",
                      "lesions", "facts"}
    assert validate_entry({**d, "split": "dev"}, tmp_path) == ["split 'dev' not in ('train', 'val', 'test')"]
    assert any("unknown finding" in p for p in validate_entry({**d, "labels": [{"finding": "x", "present": True}]}, tmp_path))
    assert any("not found" in p for p in validate_entry({**d, "study": "nope"}, tmp_path))
    assert validate_entry({"id": "a"}) == ["missing keys ['split', 'study', 'report', 'sections', 'labels']"]


def test_read_manifest_errors_name_the_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"id": "a", "split": "train", "study": "s", "report": "", "sections": {}, "labels": []}\nnot json\n')
    with pytest.raises(ManifestError, match=r"m.jsonl line 2 is not valid JSON"):
        read_manifest(p)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "missing.jsonl")


def test_r2gen_iu_layout(tmp_path):
    entries = from_r2gen(FIX / "r2gen_iu" / "annotation.json", FIX / "r2gen_iu" / "images")
    assert [e.split for e in entries] == ["train", "train", "val", "test"]
    e0 = entries[0]
    assert e0.study == "images/CXR1_1_IM-0001" and e0.study_path.is_dir()
    assert sorted(p.name for p in e0.study_path.iterdir()) == ["0.png", "1.png"]
    assert e0.sections["findings"].startswith("The cardiac silhouette") and e0.sections["impression"] == ""
    assert _present(entries[1]) == {"cardiomegaly": True, "pleural_effusion": True, "pneumothorax": False}
    assert _present(entries[3])["pleural_effusion"] is None and _present(entries[3])["nodule"] is True
    out = write_manifest(entries, tmp_path / "m.jsonl")
    assert len(read_manifest(out)) == 4
    assert all(validate_entry(e) == [] for e in entries)


def test_r2gen_mimic_layout():
    entries = from_r2gen(FIX / "r2gen_mimic" / "annotation.json", FIX / "r2gen_mimic" / "images")
    assert [e.split for e in entries] == ["train", "test"]
    assert entries[0].study == "images/p10/p10000032/s50414267" and entries[0].study_path.is_dir()
    assert _present(entries[1]) == {"pneumothorax": True, "pleural_effusion": False, "cardiomegaly": False}
    assert all(validate_entry(e) == [] for e in entries)


def test_r2gen_bad_layout(tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps([{"id": 1}]))
    with pytest.raises(ManifestError, match="R2Gen layout"):
        from_r2gen(bad, tmp_path)


def test_r2gen_real_iu_xray(shared_data, tmp_path):
    entries = from_r2gen(shared_data / "iu_xray_annotation.json", tmp_path / "images", label=False)
    counts = {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")}
    assert counts == {"train": 2069, "val": 296, "test": 590}
    assert all(e.sections["findings"] for e in entries)
    assert all(validate_entry(e, check_files=False) == [] for e in entries)
    labelled = from_r2gen(shared_data / "iu_xray_annotation.json", tmp_path / "images")[:200]
    assert sum(any(lab.present for lab in e.labels) for e in labelled) > 10


def test_ct_rate_layout():
    assert ct_rate_volume_path("train_1_a_1.nii.gz") == Path("train/train_1/train_1_a/train_1_a_1.nii.gz")
    assert ct_rate_volume_path("valid_12_b_2.nii.gz") == Path("valid/valid_12/valid_12_b/valid_12_b_2.nii.gz")
    root = FIX / "ct_rate" / "dataset"
    train = from_ct_rate(root / "train_reports.csv", root)
    val = from_ct_rate(root / "validation_reports.csv", root)
    assert [e.id for e in train] == ["train_1_a_1", "train_1_a_2", "train_2_a_1"]
    assert {e.split for e in train} == {"train"} and val[0].split == "val"
    assert all(e.study_path.is_file() for e in train + val)
    assert train[2].sections["clinical_information"] == "" and train[2].sections["technique"] == ""
    assert train[2].history_text is None and train[0].history_text == "Cough and fever for one week."
    assert "None." in train[2].report  # empty sections print as None.
    assert _present(train[0]) == {"consolidation": True, "pleural_effusion": False, "cardiomegaly": False}
    lab = {x.finding: x for x in train[2].labels}
    assert lab["nodule"].location == "left upper lobe" and lab["nodule"].size_mm == 7.0
    assert _present(val[0])["cardiomegaly"] is True and _present(val[0])["pericardial_effusion"] is False
    assert all(validate_entry(e) == [] for e in train + val)


def test_ct_rate_missing_columns(tmp_path):
    p = tmp_path / "x_reports.csv"
    p.write_text("VolumeName,Findings_EN\na,b\n")
    with pytest.raises(ManifestError, match="CT-RATE reports need columns"):
        from_ct_rate(p, tmp_path)


def test_generic_csv_and_jsonl():
    g = FIX / "generic"
    rows = from_table(g / "studies.csv", columns={"id": "accession", "study": "folder"})
    assert [e.id for e in rows] == ["A1", "A2"] and [e.split for e in rows] == ["train", "test"]
    assert rows[0].study_path.is_dir() and rows[0].sections["impression"] == "Left pneumothorax."
    assert _present(rows[0]) == {"pneumothorax": True, "pleural_effusion": False}
    js = from_table(g / "studies.jsonl")
    assert js[0].sections["findings"] == "Moderate cardiomegaly." and _present(js[0]) == {"cardiomegaly": True}
    with pytest.raises(ManifestError, match="needs 'id'"):
        from_table(g / "studies.csv")


def test_add_training_studies_keeps_the_held_out_splits_and_rewrites_paths(tmp_path):
    """A second dataset's studies join the first's as training studies: the first's entries are
    unchanged, the added ones get a prefixed id, split "train" and paths that still find their
    files from the new manifest's folder; an id clash is an error that names the fix."""
    def dataset(root: Path, splits: list[str]) -> Path:
        entries = []
        for i, split in enumerate(splits):
            (root / "studies" / f"syn{i:05d}").mkdir(parents=True)
            (root / "studies" / f"syn{i:05d}" / "history.txt").write_text("h")
            entries.append(ManifestEntry(id=f"syn{i:05d}", split=split, study=f"studies/syn{i:05d}",
                                         history=f"studies/syn{i:05d}/history.txt", report="FINDINGS:\nx", root=root))
        return write_manifest(entries, root / "manifest.jsonl")

    demo = dataset(tmp_path / "demo", ["train", "val", "test"])
    tiny = dataset(tmp_path / "demo_tiny", ["test", "val"])
    out, added = add_training_studies(demo, tiny, tmp_path / "demo" / "manifest_mixed.jsonl", "tiny-")
    assert added == 2
    mixed = read_manifest(out, check_files=True)
    assert [e.id for e in mixed] == ["syn00000", "syn00001", "syn00002", "tiny-syn00000", "tiny-syn00001"]
    assert [e.split for e in mixed] == ["train", "val", "test", "train", "train"]
    assert mixed[3].study == "../demo_tiny/studies/syn00000"
    assert mixed[4].path(mixed[4].history).read_text() == "h"
    assert [json.loads(x) for x in demo.read_text().splitlines()] == \
        [json.loads(x) for x in out.read_text().splitlines()[:3]]  # the first dataset's lines as they were
    with pytest.raises(ManifestError, match="another id prefix"):
        add_training_studies(demo, demo, tmp_path / "clash.jsonl", "")
