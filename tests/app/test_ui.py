"""UI handlers as plain functions (app/ui.py), with the tiny untrained model: structure, not quality."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import EXAMPLES, tiny_model_dir  # noqa: E402

from app import NOT_FOR_CLINICAL_USE  # noqa: E402
from app.pipeline import PipelineConfig, ReportPipeline  # noqa: E402
from app.ui import (  # noqa: E402
    NO_HEATMAP, Session, UIConfig, build_app, cleanup_session, context_summary, example_inputs, export_report,
    findings_table, key_slice_choices, list_examples, load_for_viewer, parse_key_slice, read_reference,
    render_slice, run_generation, score_markdown, score_report, slab_of_z, split_companions, warm_up,
)
from data.errors import MedreportError  # noqa: E402
from data.report_format import SECTION_KEYS  # noqa: E402

CFG = PipelineConfig(max_new_tokens=12, max_evidence_findings=2, evidence_threshold=0.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> ReportPipeline:
    return ReportPipeline.from_dir(tiny_model_dir(tmp_path_factory), CFG)


@pytest.fixture(scope="module")
def generated(pipe):
    """(viewer, report, example inputs, progress stages) for example syn00000 with history + dictation."""
    ex = example_inputs(EXAMPLES, "syn00000")
    viewer = load_for_viewer(str(ex.study_dir))
    stages: list[str] = []
    report = run_generation(pipe, viewer, ex.history_text, None, ex.dictation, progress=lambda s, f: stages.append(s))
    return viewer, report, ex, stages


def test_examples_are_listed_and_load(repo_root):
    ex = list_examples(repo_root / "examples")
    assert len(ex) >= 3
    st = load_for_viewer(str(ex[0]))
    assert st.facts["modality"] == "CT" and len(st.facts["shape_zyx"]) == 3
    # de-identified: no UID or patient field among the facts shown
    flat = repr(st.facts).lower()
    assert "patientname" not in flat and st.study.study_uid not in repr(st.facts)


def test_example_click_fills_history_dictation_reference():
    ex = example_inputs(EXAMPLES, "syn00001")
    assert ex.study_dir.name == "syn00001"
    assert ex.history_text.strip() and ex.reference_text.startswith("CLINICAL INFORMATION")
    assert ex.dictation and Path(ex.dictation).suffix == ".wav"
    with pytest.raises(MedreportError, match="no example study"):
        example_inputs(EXAMPLES, "nope")


def test_uploaded_companions_are_split(tmp_path):
    names = ["IM1.dcm", "History.txt", "dictation.wav", "reference.json", "scan.nii.gz"]
    imgs, hist, dic = split_companions([str(tmp_path / n) for n in names])
    assert [p.name for p in imgs] == ["IM1.dcm", "scan.nii.gz"]
    assert hist.name == "History.txt" and dic.name == "dictation.wav"
    with pytest.raises(MedreportError, match="companion"):
        load_for_viewer([str(tmp_path / "history.txt")])


def test_windows_render_differently(repo_root):
    st = load_for_viewer(str(list_examples(repo_root / "examples")[0]))
    z = st.study.volume.shape[0] // 2
    lung, bone = render_slice(st, z, "lung"), render_slice(st, z, "bone")
    assert lung.dtype == np.uint8 and lung.shape == st.study.volume.shape[1:]
    assert np.abs(lung.astype(int) - bone.astype(int)).mean() > 5
    assert render_slice(None, 0, "lung") is None
    assert render_slice(st, 10_000, "lung").shape == lung.shape  # z clipped, no IndexError


def test_empty_and_bad_uploads_give_clear_errors(tmp_path):
    with pytest.raises(MedreportError, match="Nothing was uploaded"):
        load_for_viewer(None)
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(MedreportError):
        load_for_viewer([str(bad)])


def test_generation_reports_stages_findings_and_context(generated):
    viewer, report, ex, stages = generated
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == ["loading", "encoding", "generating", "evidence"]
    assert set(report.sections) == set(SECTION_KEYS) and report.status == "preliminary"
    rows = findings_table(report)
    assert len(rows) == len(report.findings)
    probs = [r[1] for r in rows]
    assert probs == sorted(probs, reverse=True) and all(0.0 <= p <= 1.0 for p in probs)
    for row, f in zip(rows, sorted(report.findings, key=lambda r: -r.probability)):
        assert (row[2] == "UNCERTAIN") == (0.3 <= f.probability <= 0.7)
        assert row[2] in ("UNCERTAIN", "present", "absent") and len(row) == 5
        assert row[2] != "present" or f.present
    md = context_summary(report)
    assert "PRELIMINARY" in md and NOT_FOR_CLINICAL_USE in md
    assert f"{report.history['tokens_total']:,} tokens" in md  # history contribution stated
    assert f"weight {report.gates['audio']:.2f}" in md and "no transcript" in md  # dictation, honestly
    assert ex.study_dir.name not in md and viewer.study.study_uid not in md


def test_heatmap_overlay_and_key_slice_jump(generated):
    viewer, report, _, _ = generated
    keys = key_slice_choices(report)
    assert keys, "evidence_threshold=0 must give key slices"
    name, z = parse_key_slice(keys[0][1])
    assert name in report.heatmaps and 0 <= z < viewer.study.volume.shape[0]
    assert slab_of_z(report, z) is not None
    plain = render_slice(viewer, z, "lung")
    over = render_slice(viewer, z, "lung", report, name)
    assert over.shape == (*plain.shape, 3) and over.dtype == np.uint8
    heat = report.heatmaps[name][slab_of_z(report, z)]
    if heat.max() > 0.05:  # a heatmap with heat must change the picture
        assert np.abs(over.astype(int) - plain[..., None].astype(int)).max() > 0
    assert render_slice(viewer, z, "lung", report, NO_HEATMAP).ndim == 2  # unknown finding: plain slice
    assert parse_key_slice(None) is None and parse_key_slice("x") is None


def test_edits_export_all_formats_and_keep_the_original(generated, tmp_path):
    _, report, _, _ = generated
    edited = dict(report.sections, impression="No acute cardiopulmonary abnormality (edited).")
    paths = export_report(report, edited, tmp_path)
    assert [p.name.split(".", 1)[1] for p in paths] == ["txt", "json", "fhir.json", "sr.dcm"]
    data = json.loads(paths[1].read_text())
    assert data["edited"] and data["final_sections"]["impression"].endswith("(edited).")
    assert data["generated_sections"] == report.sections and data["status"] == "preliminary"
    assert "(edited)." in paths[0].read_text()
    fhir = json.loads(paths[2].read_text())
    assert fhir["resourceType"] == "DiagnosticReport" and fhir["status"] == "preliminary"
    import pydicom

    sr = pydicom.dcmread(paths[3])
    assert sr.Modality == "SR" and str(sr.get("PatientName", "")).strip("^") in ("", "ANONYMOUS")
    assert report.final_sections is None  # the generated report itself is untouched


def test_scoring_against_reference_highlights_differences(generated, tmp_path):
    _, report, ex, _ = generated
    ref = ex.reference_text
    same = score_report(report, dict(report.sections, findings=ref), ref)  # not identical text: only findings
    assert 0.0 <= same["finding_agreement"] <= 1.0 and "bleu4" in same
    perfect = score_report(report, _sections_of(ref), ref)
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["finding_agreement"] == 1.0
    md = score_markdown(perfect)
    assert "agree on every finding" in md
    other = "FINDINGS:\nLungs and airways: Large right pneumothorax.\n\nIMPRESSION:\nRight pneumothorax."
    diff = score_report(report, _sections_of(other), ref)
    assert any(d["finding"] == "pneumothorax" for d in diff["findings_that_differ"])
    assert "<mark>**pneumothorax**</mark>" in score_markdown(diff)
    assert score_report(report, None, "  ") is None and "No reference" in score_markdown(None)
    f = tmp_path / "ref.txt"
    f.write_text(ref)
    assert read_reference(str(f)) == ref and read_reference(None) == ""
    assert read_reference(str(ex.study_dir / "reference.json")).strip()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MedreportError, match="not valid JSON"):
        read_reference(str(tmp_path / "bad.json"))


def _sections_of(text: str) -> dict[str, str]:
    from data.report_format import parse_report

    return {k: v for k, v in parse_report(text).items() if k in SECTION_KEYS}


def test_session_folder_is_deleted_on_cleanup():
    s = Session()
    d = s.dir()
    (d / "report.txt").write_text("x")
    cleanup_session(s)
    assert not d.exists() and s.workdir is None
    cleanup_session(None)  # a session that never made a folder: no error


def test_app_builds_with_and_without_model(repo_root, pipe):
    assert build_app(repo_root / "examples") is not None  # viewer only
    app = build_app(repo_root / "examples", pipeline=pipe, config=UIConfig(concurrency_limit=1))
    assert "generate" in {d.api_name for d in app.fns.values()}


def test_serve_flags(tmp_path):
    from app.commands.serve import parse_auth, resolve_model_dir

    assert parse_auth(None) is None and parse_auth("ann:secret") == [("ann", "secret")]
    f = tmp_path / "auth.txt"
    f.write_text("# users\nann:pw1\nbob:pw:2\n")
    assert parse_auth(str(f)) == [("ann", "pw1"), ("bob", "pw:2")]
    with pytest.raises(MedreportError, match="user:password"):
        parse_auth("no-colon")
    with pytest.raises(MedreportError, match="make demo-model"):
        resolve_model_dir(tmp_path / "missing")
    assert resolve_model_dir(tmp_path) == tmp_path


def test_serve_decodes_as_the_model_folder_chose_unless_told(tmp_path):
    """serve's decoding: the folder's decoding.json (MBR here) by default; --strategy greedy keeps
    the folder's other settings and decodes greedily; a folder without the file decodes greedily."""
    from app.commands.serve import serve_config
    from app.decoding import write_decoding

    assert serve_config(tmp_path).strategy == "greedy"
    write_decoding(tmp_path, {"strategy": "mbr", "num_samples": 4, "temperature": 0.7, "mbr_from": "report"}, [], "val", 1)
    cfg = serve_config(tmp_path)
    assert (cfg.strategy, cfg.num_samples, cfg.temperature) == ("mbr", 4, 0.7)
    fast = serve_config(tmp_path, "greedy")
    assert fast.strategy == "greedy" and fast.num_samples == 4


def test_warm_up_runs_the_loading_stage_and_never_raises(pipe, tmp_path):
    assert warm_up(pipe, EXAMPLES) > 0.0
    assert warm_up(pipe, tmp_path) >= 0.0  # no examples: nothing to do
    (tmp_path / "studies" / "broken").mkdir(parents=True)
    (tmp_path / "studies" / "broken" / "IM1.dcm").write_bytes(b"junk")
    assert warm_up(pipe, tmp_path) >= 0.0  # a loader error is swallowed (logged by class name only)


def test_digest_model_reads_and_shows_the_relevant_history(tmp_path, pipe):
    """A model trained with a history digest: the pipeline appends the digest to the history it
    reads (counted in the report), and the UI shows the sentences it was given; a model without
    one shows nothing extra."""
    import dataclasses

    import torch

    from app.ui import digest_markdown
    from multimodal.model import ReportModel
    from multimodal.presets import ModelConfig

    tok = pipe.tokenizer
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, history_digest_words=64)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, copy=True))
    torch.manual_seed(0)
    ReportModel(cfg, tokenizer=tok).save_pretrained(tmp_path / "m", tok)
    dpipe = ReportPipeline.from_dir(tmp_path / "m", CFG)
    ex = example_inputs(EXAMPLES, "syn00000")
    viewer = load_for_viewer(str(ex.study_dir))
    report = run_generation(dpipe, viewer, ex.history_text, None, None)
    assert report.history["digest_tokens"] > 0 and report.sections
    md = digest_markdown(dpipe, ex.history_text)
    assert "Relevant history the model read" in md and "Reason for exam" in md
    assert "Reason for exam" not in json.dumps(report.history)  # counts only: record text stays out of report files
    assert digest_markdown(pipe, ex.history_text) == ""  # the plain model reads no digest
    assert digest_markdown(dpipe, "   ") == ""


def test_findings_table_says_where_a_location_or_size_came_from():
    """A lobe taken from the record and an automatic nodule measurement are labelled as such."""
    from app.report import FindingRow

    rows = [FindingRow(name="lobectomy", display="Lobectomy", probability=0.9, present=True, uncertain=False,
                       side="right", location="right upper lobe", location_from_record=True),
            FindingRow(name="nodule", display="Nodule", probability=0.8, present=True, uncertain=False,
                       side="left", location="left lower lobe", size_mm=12.0),
            FindingRow(name="mass", display="Mass", probability=0.1, present=False, uncertain=False)]

    class R:
        findings = rows

    where = {r[0]: r[3] for r in findings_table(R())}
    assert where == {"Lobectomy": "right upper lobe (from the record)",
                     "Nodule": "left lower lobe, 12 mm (auto-measured)", "Mass": ""}


def test_fast_draft_decodes_one_report_greedily(pipe):
    """The "fast draft" box: that one report is decoded greedily although the server decodes by MBR;
    the server's own decoding is left as it was, and the report says which decoding wrote it."""
    import dataclasses

    mbr = pipe.with_config(strategy="mbr", num_samples=2)
    assert mbr.model is pipe.model and pipe.config.strategy == CFG.strategy  # shared model, own config
    ex = example_inputs(EXAMPLES, "syn00001")
    viewer = load_for_viewer(str(ex.study_dir))
    draft = run_generation(mbr, viewer, ex.history_text, fast_draft=True)
    full = run_generation(mbr, viewer, ex.history_text)
    assert draft.provenance["generation"]["strategy"] == "greedy" and mbr.config.strategy == "mbr"
    assert full.provenance["generation"]["strategy"] == "mbr" and full.provenance["generation"]["num_samples"] == 2
    assert "**Decoding**: greedy" in context_summary(draft)
    assert "**Decoding**: MBR over 2 sampled reports" in context_summary(full)
    rec = run_generation(pipe.with_config(strategy="mbr", num_samples=2, calls_agreement=0.0, record_agreement=0.5),
                         viewer, ex.history_text)
    assert ("**Decoding**: MBR over 2 sampled reports, the choice favouring the record's known cancers and "
            "resections answered.") in context_summary(rec)
    assert "favouring" not in context_summary(draft)
    # all three weights: named in a list (the UI's pipe reads the acquisition line only when its model
    # does, so the provenance is what the line is written from)
    three = dataclasses.replace(rec, provenance={**rec.provenance, "generation": {
        **rec.provenance["generation"], "calls_agreement": 1.0, "acquisition_agreement": 1.0}})
    assert ("the choice favouring agreement with the findings table, the record's known cancers and resections "
            "answered and a Technique that states the scan's contrast.") in context_summary(three)
    with pytest.raises(Exception, match="quantize cannot change"):
        pipe.with_config(quantize=True)
    assert dataclasses.replace(CFG, strategy="greedy") == pipe.with_config(strategy="greedy").config


def test_the_generate_api_takes_the_fast_draft_box_last():
    """/generate's inputs end with the fast-draft checkbox (default off), so that API callers who
    send the first eight inputs keep working."""
    import gradio as gr

    app = build_app(EXAMPLES, config=UIConfig(examples_dir=EXAMPLES))
    dep = next(d for d in app.config["dependencies"] if d.get("api_name") == "generate")
    comps = {c["id"]: c for c in app.config["components"]}
    last = comps[dep["inputs"][-1]]
    assert last["type"] == "checkbox" and last["props"]["value"] is False
    assert last["props"]["elem_id"] == "fast-draft"
    assert isinstance(gr.Checkbox(), gr.components.Component)
