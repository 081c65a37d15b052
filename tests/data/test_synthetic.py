"""Synthetic generator: truth sampling, phantom, DICOM, histories, reports, dictation, writer."""
from __future__ import annotations

import json
import re

import numpy as np
import pydicom
import pytest

from data.report_format import format_report, parse_report
from data.synthetic import dictation
from data.synthetic.dicom_writer import write_series
from data.synthetic.findings import sample_case
from data.synthetic.histories import approx_tokens, write_history
from data.synthetic.phantom import below_resolution, render
from data.synthetic.reports import T, pool_of, variants, write_sections
from data.synthetic.writer import DatasetConfig, write_dataset
from data.vocab import FINDING_NAMES


def _case(i, size="tiny", **force):
    return sample_case(np.random.default_rng(i), f"t{i}", i, "train", size, force=force or None)


def test_sampling_is_deterministic_and_varied():
    a, b = _case(3), _case(3)
    assert a.labels == b.labels and a.anatomy == b.anatomy and a.acquisition == b.acquisition
    cases = [_case(i) for i in range(300)]
    normal = sum(1 for c in cases if not c.labels) / len(cases)
    assert 0.15 < normal < 0.4
    seen = {lab.finding for c in cases for lab in c.labels}
    assert len(seen) >= 12
    assert any(len(c.labels) >= 2 for c in cases)


def test_sizes_follow_the_contract():
    assert _case(1, "tiny").acquisition["shape"] == (16, 64, 64)
    assert _case(1, "demo").acquisition["shape"] == (64, 128, 128)
    full = _case(1, "full").acquisition
    assert full["shape"][1:] == (512, 512) and 40 <= full["shape"][0] <= 400
    assert 0.6 <= full["pixel_spacing"] <= 0.9 and 1 <= full["slice_thickness"] <= 5


def test_phantom_hu_and_anatomy():
    ph = render(_case(2, "demo", normal=True))
    hu = ph.hu
    assert hu.shape == (64, 128, 128) and hu.dtype == np.int16
    assert hu[:, 0, 0].mean() < -950  # air outside the body
    mid = hu[40]
    lungish = ((mid > -950) & (mid < -700)).mean()
    assert lungish > 0.1  # lung parenchyma present
    assert (hu > 300).any()  # bone
    assert ph.lesions == [] and ph.labels == []


def test_nodule_is_rendered_at_its_recorded_centre():
    case = _case(5, "demo", findings=["nodule"], prior_nodule=False)
    nod = case.labels[0]
    nod.size_mm, nod.attributes["density"] = 20.0, "solid"
    ph = render(case)
    les = ph.lesions[0]
    z, y, x = (int(round(c / s)) for c, s in zip(les["center_zyx_mm"], ph.spacing))
    assert les["finding"] == "nodule" and les["radius_mm"] == 10.0
    assert ph.hu[z, y, x] > -200  # soft tissue where the lung would be ~ -850
    assert "below_resolution" not in ph.labels[0].attributes


def test_below_resolution_marks_small_findings():
    assert below_resolution(6.0, (10.0, 5.5, 5.5))
    assert not below_resolution(20.0, (5.0, 2.7, 2.7))
    case = _case(7, "tiny", findings=["nodule"], prior_nodule=False)
    case.labels[0].size_mm = 5.0
    assert render(case).labels[0].attributes.get("below_resolution") is True


def test_every_generated_finding_renders_a_lesion():
    for i, name in enumerate(["mass", "consolidation", "ground_glass_opacity", "atelectasis", "emphysema",
                              "pleural_effusion", "pneumothorax", "cardiomegaly", "pericardial_effusion",
                              "lymphadenopathy", "hiatal_hernia", "fracture", "bone_lesion"]):
        ph = render(_case(20 + i, "tiny", findings=[name], prior_nodule=False, lobectomy=False))
        assert {les["finding"] for les in ph.lesions} == {name}, name  # bilateral effusion: one per side
        les = ph.lesions[0]
        assert les["radius_mm"] > 0 and all(np.isfinite(les["center_zyx_mm"]))


def test_contrast_allergy_changes_image_and_technique():
    hu_c = render(_case(9, "tiny", normal=True, contrast_allergy=False, has_history=True)).hu
    case_n = _case(9, "tiny", normal=True, contrast_allergy=True, has_history=True)
    hu_n = render(case_n).hu
    assert hu_c.max() > 0 and (hu_c > 180).sum() > (hu_n > 180).sum()  # enhanced blood pool
    tech = write_sections(case_n, np.random.default_rng(0))["technique"]
    assert "without intravenous contrast" in tech


def test_dicom_series_is_valid_and_deterministic(tmp_path):
    case = _case(4, "tiny")
    ph = render(case)
    paths = write_series(case, ph.hu, ph.spacing, tmp_path / "a")
    write_series(case, ph.hu, ph.spacing, tmp_path / "b")
    assert len(paths) == 16
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in paths)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
    assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1 and ds.BitsAllocated == 16
    assert str(ds.PatientName) == "SYNTHETIC^PATIENT"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == 16
    # Our fast writer produces exactly what pydicom's own save_as writes for the same dataset.
    ref = tmp_path / "ref.dcm"
    ds.save_as(ref, enforce_file_format=True)
    assert ref.read_bytes() == paths[0].read_bytes()
    # Sorted by position the stored slices are the phantom (z ascending = inferior first).
    dss = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array.astype(np.int32) - 1024 for d in dss])
    assert np.array_equal(vol, ph.hu)


def test_loader_reads_the_series(tmp_path):
    study = pytest.importorskip("data.study")
    case = _case(6, "tiny")
    ph = render(case)
    write_series(case, ph.hu, ph.spacing, tmp_path)
    s = study.load_study(tmp_path)
    assert s.shape == ph.hu.shape
    assert np.allclose(s.spacing_mm, ph.spacing, atol=1e-3)


def test_history_length_and_fact_offsets():
    case = _case(11, "tiny", prior_nodule=True, malignancy=True, lobectomy=True, contrast_allergy=True, has_history=True)
    for target in (300, 5000, 30000):
        text, facts = write_history(case, np.random.default_rng(1), target)
        n = approx_tokens(text)
        assert target <= n <= target * 1.15 + 400
        kinds = {f.kind for f in facts}
        assert {"indication", "prior_nodule", "malignancy", "lobectomy", "contrast_allergy", "distractor"} <= kinds
        for f in facts:
            assert text[f.char_offset:f.char_offset + len(f.text)] == f.text
    offsets = [f.char_offset for f in write_history(case, np.random.default_rng(2), 30000)[1]]
    assert max(offsets) - min(offsets) > 5000  # planted at different depths


@pytest.mark.parametrize("split", ["train", "test"])
def test_planted_facts_reach_the_report_and_distractors_do_not(split):
    for i in range(40):
        rng = np.random.default_rng(100 + i)
        case = sample_case(rng, f"f{i}", 100 + i, split, "tiny", force={
            "has_history": True, "prior_nodule": i % 2 == 0, "malignancy": i % 3 == 0, "lobectomy": i % 4 == 0,
            "contrast_allergy": i % 5 == 0})
        _, facts = write_history(case, np.random.default_rng(i), 400)
        sections = write_sections(case, np.random.default_rng(i))
        report = format_report(sections)
        for f in facts:
            if f.kind == "distractor":
                assert f.must_not_appear.lower() not in report.lower()
            else:
                assert f.expect_in_report.lower() in sections[f.section].lower(), (f.kind, f.expect_in_report)


def test_prior_nodule_phrase_example():
    case = _case(12, "tiny", prior_nodule=True, has_history=True)
    case.prior_nodule_mm, case.labels[-1].size_mm = 6.0, 9.0
    nod = case.present("nodule")
    nod.size_mm = 9.0
    text = format_report(write_sections(case, np.random.default_rng(0)))
    assert "increased from 6 mm to 9 mm" in text
    assert case.prior_date in text


def test_reserved_templates_are_test_only():
    for key, opts in T.items():
        tr, te = set(variants(opts, "train")), set(variants(opts, "test"))
        if len(opts) >= 3:
            assert tr and te and not (tr & te), key
            assert tr | te == set(opts)
    assert pool_of("test") == "test" and pool_of("val") == "train"
    lung_train, lung_test = set(variants(T["lungs_normal"], "train")), set(variants(T["lungs_normal"], "test"))
    for i in range(30):
        case = sample_case(np.random.default_rng(i), "n", i, "test", "tiny",
                           force={"normal": True, "prior_nodule": False, "lobectomy": False})
        lungs = parse_report(format_report(write_sections(case, np.random.default_rng(i))))["findings"].splitlines()[0]
        assert any(s in lungs for s in lung_test) and not any(s in lungs for s in lung_train)


def test_no_history_no_prior_facts():
    case = _case(13, "tiny", has_history=False)
    assert case.prior_nodule_mm is None and case.cancer is None and case.contrast


@pytest.mark.skipif(not dictation.available(), reason="no eSpeak NG (pip install espeakng-loader) on this machine")
def test_dictation_audio_is_16k_and_deterministic():
    a = dictation.synthesize("Sixty year old man with cough.", np.random.default_rng(0))
    b = dictation.synthesize("Sixty year old man with cough.", np.random.default_rng(0))
    c = dictation.synthesize("Sixty year old man with cough.", np.random.default_rng(1))
    assert a.dtype == np.float32 and 0.8 < len(a) / dictation.SAMPLE_RATE < 10
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a).max() <= 1.0


@pytest.mark.integration
def test_dataset_is_identical_for_any_worker_count(tmp_path):
    cfg = DatasetConfig(n=4, seed=5, size="tiny", history_tokens=(200, 800), audio=dictation.available())
    m1 = write_dataset(tmp_path / "w1", cfg, workers=1, progress=False)
    m2 = write_dataset(tmp_path / "w2", cfg, workers=2, progress=False)
    assert m1.read_bytes() == m2.read_bytes()
    files1 = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file())
    assert files1 == files2
    assert all((tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes() for f in files1)
    entry = json.loads(m1.read_text().splitlines()[0])
    assert [lab["finding"] for lab in entry["labels"]] == list(FINDING_NAMES)
    ref = json.loads((tmp_path / "w1" / entry["study"] / "reference.json").read_text())
    assert ref["sections"] == entry["sections"] and ref["labels"] == entry["labels"]
    assert (tmp_path / "w1" / entry["study"] / "reference.txt").read_text() == entry["report"]
    assert re.match(r"syn\d{5}$", entry["id"])


def test_growing_a_dataset_keeps_written_studies_and_equals_a_fresh_build(tmp_path):
    cfg = DatasetConfig(n=2, seed=9, size="tiny", history_tokens=(200, 400), audio=False)
    grown = tmp_path / "grown"
    write_dataset(grown, cfg, workers=1, progress=False)
    first = grown / "studies" / "syn00000" / "reference.txt"
    stamp = first.stat().st_mtime_ns
    m = write_dataset(grown, DatasetConfig(n=3, seed=9, size="tiny", history_tokens=(200, 400), audio=False),
                      workers=1, progress=False)
    assert first.stat().st_mtime_ns == stamp  # reused, not rewritten
    fresh = write_dataset(tmp_path / "fresh", DatasetConfig(n=3, seed=9, size="tiny", history_tokens=(200, 400),
                                                            audio=False), workers=1, progress=False)
    assert m.read_bytes() == fresh.read_bytes()
    # other settings: nothing is reused (every study rewritten)
    write_dataset(grown, DatasetConfig(n=3, seed=10, size="tiny", history_tokens=(200, 400), audio=False),
                  workers=1, progress=False)
    assert first.stat().st_mtime_ns != stamp


def test_split_option_puts_every_study_in_one_split_with_its_templates(tmp_path):
    with pytest.raises(ValueError, match="split"):
        DatasetConfig(split="holdout")
    cfg = DatasetConfig(n=4, seed=3, size="tiny", history_tokens=(200, 400), audio=False, split="test")
    m = write_dataset(tmp_path / "t", cfg, workers=1, progress=False)
    entries = [json.loads(line) for line in m.read_text().splitlines()]
    assert [e["split"] for e in entries] == ["test"] * 4
    mixed = write_dataset(tmp_path / "m", DatasetConfig(n=4, seed=3, size="tiny", history_tokens=(200, 400), audio=False),
                          workers=1, progress=False)
    usual = {e["id"]: e for e in map(json.loads, mixed.read_text().splitlines())}
    assert {e["split"] for e in usual.values()} != {"test"}  # the usual mix
    for e in entries:  # the same cases (labels), only the split (and so the template pool) differs
        assert e["labels"] == usual[e["id"]]["labels"]
    assert json.loads((tmp_path / "t" / "dataset_config.json").read_text())["split"] == "test"
    assert "split" not in json.loads((tmp_path / "m" / "dataset_config.json").read_text())


def _node_contrast(version: int, station: str = "subcarinal") -> float:
    """Mediastinal-window contrast of an enlarged lymph node against the ring around it, in the
    slab the encoder sees (mean of the node's slab, 128 x 128, window W350/L50)."""
    from data.preprocess import _resize_hw, slab_ranges, window_stack

    cases = (_case(i, "demo", findings=["lymphadenopathy"], prior_nodule=False, lobectomy=False, contrast_allergy=False)
             for i in range(40, 400))  # the first one at this station
    case = next(c for c in cases if c.labels[0].location == station)
    ph = render(case, version)
    (les,) = ph.lesions
    thk, px, _ = ph.spacing
    cz, cy, cx = les["center_zyx_mm"]
    ranges = slab_ranges(ph.hu.shape[0], 16)
    s = int(np.searchsorted(ranges[:, 1], int(cz / thk), side="right"))
    a, b = ranges[s]
    img = window_stack(_resize_hw(ph.hu[a:b].astype(np.float32).mean(0, keepdims=True), (128, 128)), ("mediastinum",))[0, 0]
    f = ph.hu.shape[1] / 128
    yi, xi, r = cy / px / f, cx / px / f, les["radius_mm"] / px / f
    yy, xx = np.ogrid[:128, :128]
    d = np.hypot(yy - yi, xx - xi)
    return float(img[d <= 0.5 * r].mean() - np.median(img[(d >= r + 1.5) & (d <= r + 4)]))


def test_phantom_v2_makes_enlarged_lymph_nodes_visible():
    """Version 1 (the shipped data) draws a 42 HU node in 35 HU mediastinal tissue: a subcarinal
    node has no contrast (paratracheal and hilar ones show against the lung or airway). Version 2
    puts mediastinal fat around it, as in a real chest."""
    v1, v2 = _node_contrast(1), _node_contrast(2)
    assert abs(v1) < 0.1, v1
    assert v2 > 0.25, v2


def test_phantom_version_is_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="phantom version"):
        render(_case(1, "tiny"), 3)
    with pytest.raises(ValueError, match="phantom_version"):
        DatasetConfig(n=1, phantom_version=0)
    from data.synthetic.writer import _config_key

    assert "phantom_version" not in _config_key(DatasetConfig(n=1))  # version 1 datasets stay reusable
    assert _config_key(DatasetConfig(n=1, phantom_version=2))["phantom_version"] == 2
    # version 2 changes the mediastinum only above the diaphragm; the lungs are untouched
    case = _case(5, "tiny", normal=True)
    h1, h2 = render(case, 1).hu, render(case, 2).hu
    changed = h1 != h2
    assert changed.any()
    assert (h1[changed] > -60).mean() > 0.9 and (h2[changed] < -30).mean() > 0.9  # soft tissue became fat
    assert not changed[h1 < -500].any()  # lungs and air untouched (same noise draws)
