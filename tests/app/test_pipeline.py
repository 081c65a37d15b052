"""ReportPipeline on every kind of input: DICOM with/without history and audio, PNG views, NIfTI,
explicit parts; history truncation; consistency; quantization. Tiny untrained model: structure only."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import EXAMPLES, tiny_model_dir  # noqa: E402

from app.pipeline import STAGES, PipelineConfig, ReportPipeline, StudyParts, truncate_history  # noqa: E402
from app.report import UNCERTAIN_BAND, FindingRow, Report, consistency  # noqa: E402
from data.report_consistency import MeasurementVeto  # noqa: E402
from data.report_coverage import CoverageVeto  # noqa: E402
from data.report_format import SECTION_KEYS  # noqa: E402
from data.report_outline import OutlineVeto  # noqa: E402
from data.study import load_study  # noqa: E402
from data.vocab import FINDING_NAMES  # noqa: E402

STUDIES = EXAMPLES / "studies"
CFG = PipelineConfig(max_new_tokens=12, max_evidence_findings=2, evidence_threshold=0.0)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> ReportPipeline:
    return ReportPipeline.from_dir(tiny_model_dir(tmp_path_factory), CFG)


def check_structure(report: Report, n_slices: int, sop_uids=None) -> dict:
    d = json.loads(report.to_json())
    assert d["status"] == "preliminary" and "not for clinical use" in d["notice"]
    assert set(d["sections"]) == set(SECTION_KEYS) == set(d["generated_sections"])
    assert [f["name"] for f in d["findings"]] == list(FINDING_NAMES)
    for f in d["findings"]:
        assert 0.0 <= f["probability"] <= 1.0
        assert f["present"] == (f["probability"] >= 0.5)
        assert f["uncertain"] == (UNCERTAIN_BAND[0] <= f["probability"] <= UNCERTAIN_BAND[1])
    keyed = [f for f in d["findings"] if f["key_slices"]]
    assert len(keyed) == 2  # max_evidence_findings, threshold 0: the two most probable
    top2 = sorted(d["findings"], key=lambda f: -f["probability"])[:2]
    assert {f["name"] for f in keyed} == {f["name"] for f in top2}
    for f in keyed:
        for k in f["key_slices"]:
            assert 0 <= k["z"] < n_slices
            assert k["sop_instance_uid"] == (sop_uids[k["z"]] if sop_uids is not None else None)
        assert report.heatmaps[f["name"]].ndim == 3
    assert set(d["gates"]) == {"image", "audio", "history"}
    assert set(d["provenance"]["timings_s"]) == set(STAGES)
    assert d["provenance"]["model"]["checkpoint_sha256"] and d["provenance"]["model"]["preset"] == "tiny"
    prov = json.dumps(d["provenance"])
    for uid in filter(None, [report.source["study_instance_uid"], report.source["series_instance_uid"]]):
        assert uid not in prov  # provenance describes the input without UIDs
    assert d["consistency"]["n"] == len(FINDING_NAMES) and 0.0 <= d["consistency"]["agreement_rate"] <= 1.0
    assert report.report_text.startswith("CLINICAL INFORMATION:")
    return d


@pytest.mark.parametrize("sid, has_history, has_audio", [
    ("syn00000", True, True),   # DICOM + history + dictation
    ("syn00002", True, False),  # no dictation
    ("syn00003", False, True),  # no history
])
def test_bundled_examples(pipe, sid, has_history, has_audio):
    calls = []
    report = pipe.run(STUDIES / sid, progress=lambda stage, frac: calls.append((stage, frac)))
    study = load_study(STUDIES / sid)
    d = check_structure(report, study.shape[0], study.sop_uids)
    assert d["history"]["given"] is has_history and d["audio"]["given"] is has_audio
    assert d["provenance"]["input"]["dictation"] is has_audio
    assert report.source["study_instance_uid"] == study.study_uid
    fr = [f for _, f in calls]
    assert fr == sorted(fr) and fr[-1] == 1.0
    assert [s for s in dict.fromkeys(s for s, _ in calls)] == list(STAGES)
    if has_history:
        assert d["history"]["tokens_cut"] == 0 and d["history"]["tokens_used"] == d["history"]["tokens_total"] > 0


def test_history_over_limit_keeps_newest_and_says_so(tmp_path_factory):
    small = ReportPipeline.from_dir(tiny_model_dir(tmp_path_factory),
                                    PipelineConfig(max_new_tokens=4, evidence=False, max_history_tokens=50))
    report = small.run(STUDIES / "syn00000")
    h = report.history
    assert h["truncated"] and h["tokens_used"] == 50 and h["tokens_cut"] == h["tokens_total"] - 50 > 0
    assert f"{h['tokens_cut']:,}" in report.to_text() and "cut" in report.to_text()
    assert any("truncated" in w for w in report.warnings)
    assert report.provenance["input"]["history_tokens"] == 50


def test_truncate_history_keeps_the_tail():
    assert truncate_history(list(range(10)), 4) == ([6, 7, 8, 9], 6)
    assert truncate_history([1, 2], 4) == ([1, 2], 0)
    assert truncate_history([1, 2], 0) == ([], 2)


def test_png_radiograph_views(pipe, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("frontal.png", "lateral.png"):
        Image.fromarray(rng.integers(0, 255, (80, 70), dtype=np.uint8)).save(tmp_path / name)
    report = pipe.run(tmp_path)
    check_structure(report, n_slices=2)
    assert report.source["kind"] == "radiograph" and report.source["study_instance_uid"] is None
    assert report.provenance["input"]["slabs"] == 2


def test_nifti_volume(pipe, tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(1).normal(0, 300, (64, 64, 12)).astype(np.float32)  # (x, y, z)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 5.0, 1.0])), tmp_path / "ct.nii.gz")
    report = pipe.run(tmp_path / "ct.nii.gz")
    check_structure(report, n_slices=12)
    assert report.source["source_format"] == "nifti" and not report.history["given"] and not report.audio["given"]


def test_explicit_parts_override_companions(pipe):
    files = sorted((STUDIES / "syn00003").glob("*.dcm"))
    parts = StudyParts(images=files, history_text="Prior CT 2019: small left pleural effusion.",
                       audio_path=STUDIES / "syn00000" / "dictation.wav")
    report = pipe.run(parts)
    assert report.history["given"] and report.history["source"] == "text"
    assert report.history["tokens_total"] < 40
    assert report.audio["given"]


def test_bad_audio_is_a_warning_not_a_failure(pipe, tmp_path):
    bad = tmp_path / "dictation.wav"
    bad.write_bytes(b"RIFF....not audio")
    report = pipe.run(STUDIES / "syn00002", audio_path=bad)
    assert not report.audio["given"] and any("dictation not used" in w for w in report.warnings)


def test_quantized_decoder_runs(tmp_path_factory):
    q = ReportPipeline.from_dir(tiny_model_dir(tmp_path_factory), PipelineConfig(max_new_tokens=6, evidence=False),
                                quantize=True)
    kinds = {type(m).__module__ for m in q.model.decoder.modules()}
    assert any("quantized" in k for k in kinds)
    report = q.run(STUDIES / "syn00002")
    assert report.provenance["model"]["quantized_int8_decoder"] is True
    assert set(report.sections) == set(SECTION_KEYS)


def test_model_with_a_mip_channel_reads_it_in_the_pipeline_and_the_training_cache(tmp_path):
    """A model built with image.mip_windows gets 4-channel slabs from the pipeline (the same
    arrays the training cache stores, under its own cache key) and writes a report."""
    import dataclasses

    import torch

    from app.train_data import PreprocessConfig, StudyCache
    from data.datasets import read_manifest
    from data.tokenizer import ReportTokenizer
    from multimodal.model import ReportModel
    from multimodal.presets import ModelConfig

    entries = read_manifest(EXAMPLES / "manifest.jsonl")
    tok = ReportTokenizer.train([e.report for e in entries], vocab_size=400, min_frequency=1)
    base = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    cfg = dataclasses.replace(base, image=dataclasses.replace(base.image, mip_windows=("lung",), in_chans=4))
    torch.manual_seed(0)
    ReportModel(cfg, tokenizer=tok).eval().save_pretrained(tmp_path / "m", tok)
    pipe = ReportPipeline.from_dir(tmp_path / "m", PipelineConfig(max_new_tokens=6, evidence=False))
    assert pipe.model.cfg.image.mip_windows == ("lung",)
    seen = []
    stem = next(m for m in pipe.model.image_encoder.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    stem.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    report = pipe.run(STUDIES / "syn00002")
    assert seen and all(sh[1] == 4 for sh in seen)  # [n_slabs, C, H, W] into the stem
    assert set(report.sections) == set(SECTION_KEYS)
    pre = PreprocessConfig.from_model(cfg, audio=False)
    assert pre.mip_windows == ("lung",) and pre.key().endswith("-mip_lung")
    assert PreprocessConfig.from_model(base, audio=False).key() != pre.key()
    entry = next(e for e in entries if e.id == "syn00002")
    arrays = StudyCache(tmp_path / "cache", pre).arrays(entry)
    assert arrays["pixels"].shape[1] == 4


def _row(name, p):
    return FindingRow(name=name, display=name, probability=p, present=p >= 0.5, uncertain=0.3 <= p <= 0.7)


def test_consistency_flags_each_disagreement():
    text = ("FINDINGS:\nThere is a small right pleural effusion. No pneumothorax. Cannot exclude a nodule.\n\n"
            "IMPRESSION:\nRight pleural effusion.\n")
    rows = [_row("pleural_effusion", 0.9), _row("pneumothorax", 0.8), _row("nodule", 0.2), _row("cardiomegaly", 0.1)]
    c = consistency(text, rows)
    by = {r["finding"]: r for r in c["per_finding"]}
    assert by["pleural_effusion"]["agree"] and by["pleural_effusion"]["text"] == "present"
    assert not by["pneumothorax"]["agree"] and by["pneumothorax"]["text"] == "absent"
    assert not by["nodule"]["agree"] and by["nodule"]["text"] == "uncertain"
    assert by["cardiomegaly"]["agree"] and by["cardiomegaly"]["text"] == "not mentioned"
    assert c["agreement_rate"] == 0.5
    assert {d["finding"] for d in c["disagreements"]} == {"pneumothorax", "nodule"}
    assert all(d["message"] for d in c["disagreements"])


def test_edits_keep_the_generated_original_and_heatmaps_save(pipe, tmp_path):
    report = pipe.run(STUDIES / "syn00002")
    edited = report.with_edits({"impression": "No acute abnormality."})
    assert edited.edited and not report.edited
    d = edited.to_dict()
    assert d["final_sections"]["impression"] == "No acute abnormality."
    assert d["generated_sections"] == report.sections
    assert d["sections"] == d["final_sections"] and "No acute abnormality." in d["report"]
    with pytest.raises(ValueError):
        report.with_edits({"summary": "x"})
    path = report.save_heatmaps(tmp_path / "heat.npz")
    with np.load(path) as z:
        names = [k for k in z.files if k.startswith("heatmap_")]
        assert len(names) == 2 and z["slab_z_ranges"].shape == (z[names[0]].shape[0], 2)


def test_per_finding_operating_points_decide_present(tmp_path_factory):
    """A model whose config carries decision thresholds calls a finding present at its own
    threshold, not at 0.5, and computes its evidence; probabilities are unchanged."""
    import dataclasses

    from multimodal.model import ReportModel

    d = tiny_model_dir(tmp_path_factory)
    base = ReportPipeline.from_dir(d, dataclasses.replace(CFG, max_evidence_findings=5, evidence_threshold=0.3))
    rep0 = base.run(STUDIES / "syn00002")
    probs = {f.name: f.probability for f in rep0.findings}
    low = min(probs, key=probs.get)  # the least probable finding: surely absent at 0.5
    assert probs[low] < 0.5 and not next(f for f in rep0.findings if f.name == low).present
    model = ReportModel.from_pretrained(d)
    model.cfg.heads.decision_thresholds = tuple(probs[n] / 2 if n == low else 0.99 for n in model.finding_names)
    pipe = ReportPipeline(model, model.tokenizer, dataclasses.replace(CFG, max_evidence_findings=5, evidence_threshold=0.3))
    rep = pipe.run(STUDIES / "syn00002")
    calls = {f.name: f.present for f in rep.findings}
    assert calls[low] and sum(calls.values()) == 1
    assert {f.name: f.probability for f in rep.findings} == pytest.approx(probs, abs=1e-5)
    assert rep.heatmaps.keys() >= {low}  # a finding called present always gets its evidence


def test_digest_counts_inside_the_history_budget(pipe, tmp_path):
    """A model with a history digest and case-aware copying: the digest (taken from the whole
    record) and the newest record tokens together fill max_history_tokens, as in training."""
    import dataclasses

    import torch

    from multimodal.model import ReportModel
    from multimodal.presets import ModelConfig

    tok = pipe.tokenizer
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, history_digest_words=40)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, copy=True, copy_case=True))
    torch.manual_seed(0)
    ReportModel(cfg, tokenizer=tok).save_pretrained(tmp_path / "m", tok)
    pipe = ReportPipeline.from_dir(tmp_path / "m", dataclasses.replace(CFG, max_history_tokens=120, evidence=False))
    assert pipe.model.decoder.copy_canon() is not None
    rep = pipe.run(STUDIES / "syn00000")
    h = rep.history
    assert h["truncated"] and h["digest_tokens"] > 0
    assert h["tokens_used"] + h["digest_tokens"] == 120 and "digest of the whole record" in h["message"]
    assert rep.provenance["input"]["history_tokens"] == 120


def _serve_calling(pipe, tmp_path, monkeypatch, called: tuple[str, ...], pipeline: dict | None = None,
                   history_text: str | None = None, **overrides):
    """A tiny model (``overrides`` on the tiny preset) that calls exactly ``called``, served by
    the pipeline (``pipeline``: PipelineConfig overrides; the measurement and outline vetoes off
    unless named there, so that each veto test sees its own veto alone) on the bundled study syn00003 (no
    history unless ``history_text``) -> (report, config, what the decoder's generate was given:
    prefixes and keywords)."""
    pipeline = {"consistent_measurements": False, "report_outline": False, **(pipeline or {})}
    import dataclasses

    import torch

    import app.pipeline as ap
    from multimodal.model import ReportModel
    from multimodal.presets import ModelConfig

    cfg = ModelConfig.preset("tiny", vocab_size=pipe.tokenizer.vocab_size, **overrides)
    cfg.heads.decision_thresholds = tuple(1e-9 if n in called else 1.0 for n in cfg.heads.finding_names)
    torch.manual_seed(0)
    ReportModel(cfg, tokenizer=pipe.tokenizer).save_pretrained(tmp_path / "m", pipe.tokenizer)
    seen = {}
    real = ap.generate

    def spy(decoder, prefixes, *a, **kw):
        seen.update(prefixes=prefixes, args=a, **kw)
        return real(decoder, prefixes, *a, **kw)

    monkeypatch.setattr(ap, "generate", spy)
    p = ReportPipeline.from_dir(tmp_path / "m", dataclasses.replace(CFG, evidence=False, **pipeline))
    return p.run(STUDIES / "syn00003", history_text=history_text), cfg, seen


def _run_prompt_model(pipe, tmp_path, monkeypatch, called: tuple[str, ...], **overrides):
    """A tiny prompt model that calls exactly ``called`` (the prefix is [BOS] prompt [REPORT])
    -> (report, config, the decoder prefixes it was given)."""
    rep, cfg, seen = _serve_calling(pipe, tmp_path, monkeypatch, called, finding_prompt=True, **overrides)
    return rep, cfg, seen["prefixes"]


def test_finding_prompt_in_the_pipeline_matches_the_report_findings(pipe, tmp_path, monkeypatch):
    """A finding-prompt model served by the pipeline: the decoder's prefix carries the calls
    that the report's findings table shows, as text right before [REPORT]."""
    from data.finding_prompt import finding_prompt

    tok = pipe.tokenizer
    rep, cfg, prefixes = _run_prompt_model(pipe, tmp_path, monkeypatch, ("cardiomegaly", "nodule"))
    present = [f for f in rep.findings if f.present]
    assert sorted(f.name for f in present) == ["cardiomegaly", "nodule"] and cfg.heads.num_findings > 2
    nod = next(f for f in present if f.name == "nodule")
    calls = [("cardiomegaly", "none", "unspecified"), ("nodule", nod.side, nod.location)]
    prompt = tok.tk.encode(finding_prompt(calls), add_special_tokens=False).ids
    assert prefixes[0] == [tok.bos_id, *prompt, tok.report_id]


def _served_veto(rep, seen, flag: str, on: bool):
    """The one veto the decoder got for the served study (None when ``flag`` is off, after checking
    that none was passed); the provenance records ``flag`` and, when on, the refusals it counted."""
    gen = rep.provenance["generation"]
    assert gen[flag] is on
    if not on:
        assert seen["vetoes"] is None and "consistency_refusals" not in gen
        return None
    (veto,) = seen["vetoes"]
    assert gen["consistency_refusals"] == veto.refused >= 0
    return veto


@pytest.mark.parametrize("on", [False, True])
def test_consistency_veto_follows_the_findings_table(pipe, tmp_path, monkeypatch, on):
    """consistent_with_calls: the decoder gets one CallsVeto per study, built from the findings
    the report's table calls present, and the provenance says so and counts the refusals; off,
    no veto is passed."""
    from data.report_consistency import CallsVeto

    called = ("cardiomegaly", "pleural_effusion")
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, called, pipeline={"consistent_with_calls": on})
    veto = _served_veto(rep, seen, "consistent_with_calls", on)
    if on:
        assert isinstance(veto, CallsVeto)
        assert veto.called == {f.name for f in rep.findings if f.present} == set(called)


@pytest.mark.parametrize("on", [True, False])
def test_acquisition_veto_follows_the_header(pipe, tmp_path, monkeypatch, on):
    """consistent_with_acquisition (on by default): a model that reads the acquisition line gets an
    AcquisitionVeto holding the header's contrast, and the provenance says so; off, no veto."""
    import pydicom

    from data.report_consistency import AcquisitionVeto

    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), finding_prompt=True,
                                  acquisition_prompt=True, pipeline={"consistent_with_acquisition": on})
    veto = _served_veto(rep, seen, "consistent_with_acquisition", on)
    if on:
        contrast = "ContrastBolusAgent" in pydicom.dcmread(STUDIES / "syn00003" / "IM0001.dcm", stop_before_pixels=True)
        assert isinstance(veto, AcquisitionVeto) and veto.contrast is contrast
        assert veto.require is False and rep.provenance["generation"]["technique_states_contrast"] is False


def test_mbr_acquisition_agreement_reranks_by_the_headers_contrast(pipe, tmp_path, monkeypatch):
    """acquisition_agreement (MBR, 1 by default): a model that reads the acquisition line gets
    an AcquisitionAgreement holding the header's contrast beside the calls' agreement, and the
    provenance records the weight; a model without the line (contrast unknown) gets none."""
    import pydicom

    from app.pipeline import PipelineConfig
    from data.report_consistency import CallsAgreement
    from data.report_format import SECTION_KEYS

    assert PipelineConfig().acquisition_agreement == 1.0
    tok = pipe.tokenizer
    mbr = {"strategy": "mbr", "num_samples": 2, "acquisition_agreement": 3.0, "max_new_tokens": 8}
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), finding_prompt=True,
                                  acquisition_prompt=True, pipeline=mbr)
    (r,) = seen["rerank"]
    contrast = "ContrastBolusAgent" in pydicom.dcmread(STUDIES / "syn00003" / "IM0001.dcm", stop_before_pixels=True)

    def ids(technique):
        out = []
        for key, text in (("technique", technique), ("findings", "Heart and mediastinum: The heart is enlarged."),
                          ("impression", "1. Cardiomegaly.")):
            out += [tok.section_ids[SECTION_KEYS.index(key)], *tok.encode(text)]
        return out + [tok.eos_id]

    right, wrong = (("CT of the chest following intravenous contrast.", "CT of the chest without intravenous contrast.")
                    if contrast else
                    ("CT of the chest without intravenous contrast.", "CT of the chest following intravenous contrast."))
    agree = CallsAgreement(tok, ["cardiomegaly"], PipelineConfig().calls_agreement)
    assert r(ids(right)) == pytest.approx(agree(ids(right)) + 3.0)
    assert r(ids(wrong)) == pytest.approx(agree(ids(wrong)))
    assert rep.provenance["generation"]["acquisition_agreement"] == 3.0
    rep_blind, _, blind = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), finding_prompt=True,
                                 pipeline={**mbr, "calls_agreement": 0.0})
    assert blind["rerank"] is None  # no acquisition line: the header's contrast is not read
    assert rep_blind.provenance["generation"]["acquisition_agreement"] == 0.0  # and the provenance says none applied
    with pytest.raises(ValueError, match="acquisition_agreement"):
        PipelineConfig(strategy="mbr", acquisition_agreement=-1.0)


def test_technique_states_contrast_makes_the_acquisition_veto_require_it(pipe, tmp_path, monkeypatch):
    """technique_states_contrast (off by default): the acquisition veto also requires the
    Technique to state the header's contrast, and the provenance says so."""
    from app.pipeline import PipelineConfig
    from data.report_consistency import AcquisitionVeto

    assert PipelineConfig().technique_states_contrast is False
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), finding_prompt=True,
                                  acquisition_prompt=True, pipeline={"technique_states_contrast": True})
    veto = _served_veto(rep, seen, "consistent_with_acquisition", True)
    assert isinstance(veto, AcquisitionVeto) and veto.require is True
    assert rep.provenance["generation"]["technique_states_contrast"] is True


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("flag, default, called, veto_class", [
    ("consistent_measurements", True, ("nodule",), MeasurementVeto),
    ("report_outline", True, ("cardiomegaly",), OutlineVeto),
    ("calls_covered", False, ("cardiomegaly", "hiatal_hernia"), CoverageVeto),
])
def test_each_veto_flag_gives_the_decoder_its_veto(pipe, tmp_path, monkeypatch, on, flag, default, called, veto_class):
    """Per study, a PipelineConfig veto flag (its default checked) gives the decoder one veto of its
    class and the provenance says so; off, no veto. consistent_measurements: a nodule's change kept
    to its numbers (on by default); report_outline: the product's outline (on); calls_covered:
    every called finding in its line and the impression, built from the findings the report's
    table calls present (off)."""
    assert getattr(PipelineConfig(), flag) is default
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, called, pipeline={flag: on})
    veto = _served_veto(rep, seen, flag, on)
    assert veto is None or isinstance(veto, veto_class)
    if on and veto_class is CoverageVeto:  # built from the calls
        assert veto.called == {f.name for f in rep.findings if f.present} == set(called)


@pytest.mark.parametrize("on", [True, False])
def test_record_covered_gives_the_decoder_the_records_facts(pipe, tmp_path, monkeypatch, on):
    """record_covered (off by default): a study whose record names a cancer and a lobectomy gets one
    RecordVeto holding both, read from the record; a study without a record gets none."""
    from data.report_coverage import RecordVeto

    assert PipelineConfig().record_covered is False
    history = ("ONCOLOGY NOTE (2021-03-02)\nPast medical history: prostate cancer, diagnosed in 2019.\n"
               "SURGERY (2015-06-01)\nRight upper lobectomy for a carcinoid tumour.\n")
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), pipeline={"record_covered": on},
                                  history_text=history)
    veto = _served_veto(rep, seen, "record_covered", on)
    if on:
        assert isinstance(veto, RecordVeto)
        assert veto.malignancies == ("prostate cancer",) and veto.resections == ("right upper lobectomy",)
    rep0, _, seen0 = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), pipeline={"record_covered": True})
    assert seen0["vetoes"] is None  # no record: nothing to keep


def test_calls_guidance_decodes_beside_a_twin_with_no_calls(pipe, tmp_path, monkeypatch):
    """calls_guidance > 0: generate gets a Guidance whose twin prefix is the study's own with the
    calls line reading "Calls: none.", whose finding-context tokens say absent, that starts at
    the Findings marker, at the configured weight; the provenance records it. Off (the default)
    no guidance is passed; beam search with it is refused with the fix."""
    from app.pipeline import PipelineConfig
    from core.generate import Guidance
    from data.finding_prompt import finding_prompt
    from data.report_format import SECTION_KEYS

    tok = pipe.tokenizer
    assert PipelineConfig().calls_guidance == 0.0
    import torch

    from multimodal.heads import HeadsConfig

    rep, cfg, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), pipeline={"calls_guidance": 1.5},
                                    finding_prompt=True, heads=HeadsConfig(finding_context=True, context_mode="calls"))
    g = seen["guidance"]
    assert isinstance(g, Guidance) and g.weight == 1.5
    assert g.start_ids == (tok.section_ids[SECTION_KEYS.index("findings")],)
    none = tok.tk.encode(finding_prompt([]), add_special_tokens=False).ids
    assert "none" in finding_prompt([]).lower()
    assert g.prefixes == [[tok.bos_id, *none, tok.report_id]] and seen["prefixes"][0] != g.prefixes[0]
    # the twin's finding-context tokens differ from the row's (absent instead of cardiomegaly), the
    # fused image tokens before them are the same
    ctx, ctx_u, K = seen["args"][0], g.context_BFD, cfg.heads.num_findings
    assert ctx.shape == ctx_u.shape and ctx.shape[1] > K
    assert torch.equal(ctx[:, :-K], ctx_u[:, :-K]) and not torch.equal(ctx[:, -K:], ctx_u[:, -K:])
    assert rep.provenance["generation"]["calls_guidance"] == 1.5
    _, _, seen_off = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), finding_prompt=True)
    assert seen_off["guidance"] is None
    with pytest.raises(ValueError, match="greedy"):
        PipelineConfig(strategy="beam", calls_guidance=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        PipelineConfig(calls_guidance=-1.0)


@pytest.mark.parametrize("from_record", [True, False])
def test_a_lobectomy_call_takes_the_lobe_the_record_names(pipe, tmp_path, monkeypatch, from_record):
    """locations_from_record (on by default): the heads call a lobectomy; the record says which lobe
    was resected. The decoder's prompt and the findings table carry the record's lobe, marked as
    such, and the provenance names the finding (not the text); off, the heads' own lobe stands."""
    from data.finding_prompt import finding_prompt

    tok = pipe.tokenizer
    history = "SURGICAL HISTORY\nSurgical history: left lower lobectomy in 2015. Recovery uncomplicated.\n"
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("lobectomy",), finding_prompt=True,
                                  pipeline={"locations_from_record": from_record}, history_text=history)
    row = next(f for f in rep.findings if f.name == "lobectomy")
    assert row.present
    d = row.to_dict()
    if from_record:
        assert (row.location, row.side, d["location_source"]) == ("left lower lobe", "left", "record")
        assert rep.provenance["generation"]["locations_from_record"] == ["lobectomy"]
        expected = finding_prompt([("lobectomy", "left", "left lower lobe")])
    else:
        assert d["location_source"] == "image" and rep.provenance["generation"]["locations_from_record"] == []
        expected = finding_prompt([("lobectomy", row.side, row.location)])
    prompt = tok.tk.encode(expected, add_special_tokens=False).ids
    prefix = seen["prefixes"][0]
    assert prefix[-1] == tok.report_id and prefix[-1 - len(prompt):-1] == prompt
    assert "left lower lobectomy" not in json.dumps(rep.provenance)  # no record text in the provenance


def test_a_nodule_size_model_reads_the_measured_size(pipe, tmp_path, monkeypatch):
    """model.nodule_size_prompt: the pipeline measures the CT's nodules (data.nodule_measure); the
    nodule call in the decoder's prompt carries the size measured on the called side, and the
    findings table shows the same size as an automatic measurement."""
    from data.finding_prompt import finding_prompt
    from data.detectors import read_study
    from data.study import load_study

    from data.report_consistency import MeasurementVeto

    tok = pipe.tokenizer
    history = ("PRIOR CT (2021)\nThere is a 9 mm solid nodule in the right lower lobe.\n"
               "Impression: 9 mm right lower lobe nodule. Follow-up CT recommended.\n")
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("nodule",), finding_prompt=True,
                                  nodule_size_prompt=True, history_text=history,
                                  pipeline={"consistent_measurements": True})
    row = next(f for f in rep.findings if f.name == "nodule")
    # the record's prior CT places the known nodule: the call takes its lobe and is measured on its side
    assert row.location == "right lower lobe" and row.side == "right" and row.location_from_record
    assert row.to_dict()["location_source"] == "record"
    sizes = read_study(load_study(STUDIES / "syn00003")).sizes_mm
    size = sizes.get(row.side) if row.side in ("left", "right") else sizes.get("any")
    assert row.size_mm == size
    d = row.to_dict()
    assert d["size_mm"] == size and d["size_source"] == ("automatic measurement" if size is not None else None)
    call = ("nodule", row.side, row.location) + ((size,) if size is not None else ())
    prompt = tok.tk.encode(finding_prompt([call]), add_special_tokens=False).ids
    assert seen["prefixes"][0][-1 - len(prompt):-1] == prompt
    # the decoding veto holds the record's prior size and the measured one
    (veto,) = seen["vetoes"]
    assert isinstance(veto, MeasurementVeto) and veto.prior_mm == 9.0 and veto.measured_mm == size
    others = [f for f in rep.findings if f.name != "nodule"]
    assert all(f.size_mm is None and f.to_dict()["size_source"] is None for f in others)


def test_a_called_lymphadenopathy_takes_the_node_detectors_station(pipe, tmp_path, monkeypatch):
    """With the detectors running (here for the nodule size), a lymphadenopathy call takes the station
    of the lymph-node detector's best candidate (data.node_measure): in the decoder's prompt and in
    the findings table, whose location source says "detector"; other calls keep the heads' places."""
    from data.detectors import read_study
    from data.finding_prompt import finding_prompt
    from data.study import load_study

    station = read_study(load_study(STUDIES / "syn00003")).locations["lymphadenopathy"]
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("lymphadenopathy", "cardiomegaly"),
                                  finding_prompt=True, nodule_size_prompt=True)
    row = next(f for f in rep.findings if f.name == "lymphadenopathy")
    assert row.location == station and row.location_from_detector and not row.location_from_record
    assert row.to_dict()["location_source"] == "detector"
    gen = rep.provenance["generation"]
    assert gen["locations_from_detector"] == ["lymphadenopathy"] and gen["locations_from_record"] == []
    assert row.side == ({"left": "left", "right": "right"}.get(station.split()[0], row.side))
    other = next(f for f in rep.findings if f.name == "cardiomegaly")
    assert other.to_dict()["location_source"] == "image"
    calls = [("cardiomegaly", other.side, other.location), ("lymphadenopathy", row.side, station)]
    prompt = pipe.tokenizer.tk.encode(finding_prompt(calls), add_special_tokens=False).ids
    assert seen["prefixes"][0][-1 - len(prompt):-1] == prompt


def test_acquisition_line_in_the_pipeline_equals_the_training_one(pipe, tmp_path, monkeypatch):
    """An acquisition-prompt model (model.acquisition_prompt): the pipeline puts the study's
    acquisition line (from its DICOM header) before the calls, and the training dataset builds
    the same ids for the same study and calls, so what the decoder reads at inference is what
    it was trained on."""
    import pydicom

    from app.train_data import PreprocessConfig, ReportDataset, StudyCache
    from data.datasets import read_manifest
    from data.finding_prompt import finding_prompt
    from multimodal.model import config_prompt_ids

    tok = pipe.tokenizer
    _, cfg, prefixes = _run_prompt_model(pipe, tmp_path, monkeypatch, ("cardiomegaly",), acquisition_prompt=True)
    contrast = "ContrastBolusAgent" in pydicom.dcmread(STUDIES / "syn00003" / "IM0001.dcm", stop_before_pixels=True)
    line = prefixes[0][1:-1]
    text = tok.tk.decode(line)
    assert text.startswith("Acquisition: " + ("IV contrast" if contrast else "no IV contrast")), text
    assert "mm slices" in text and "Calls: cardiomegaly" in text
    calls = [("cardiomegaly", "none", "unspecified")]
    entry = next(e for e in read_manifest(EXAMPLES / "manifest.jsonl") if e.id == "syn00003")
    ds = ReportDataset([entry], tok, cfg, StudyCache(None, PreprocessConfig.from_model(cfg)))
    acq = ds.study_inputs(entry).acquisition
    assert config_prompt_ids(tok, cfg, calls, acq) == line
    assert text.endswith(finding_prompt(calls))


def test_the_nodule_probability_fuses_the_detector_evidence(pipe, tmp_path, monkeypatch):
    """heads.detector_evidence + a fitted heads.evidence_fusion: the pipeline runs the lung-nodule
    detector on the CT and the nodule's probability in the findings table is the fused one
    (here w_logit 0, w_evidence 1, bias 0: exactly sigmoid(evidence)); the other findings keep
    the heads' own probabilities."""
    import dataclasses

    from data.detectors import read_study
    from data.study import load_study
    import torch

    from multimodal.heads import HeadsConfig

    heads = dataclasses.replace(HeadsConfig(), detector_evidence=("nodule",),
                                evidence_fusion=(("nodule", 0.0, 1.0, 0.0),))
    rep, _, _ = _serve_calling(pipe, tmp_path, monkeypatch, (), heads=heads)
    ev = read_study(load_study(STUDIES / "syn00003")).evidence["nodule"]
    probs = {f.name: f.probability for f in rep.findings}
    assert probs["nodule"] == pytest.approx(1 / (1 + np.exp(-ev)), abs=1e-4)
    # without the fusion the same tiny model (same seed) gives the heads' own nodule probability
    heads0 = dataclasses.replace(HeadsConfig(), detector_evidence=("nodule",))
    rep0, _, _ = _serve_calling(pipe, tmp_path / "plain", monkeypatch, (), heads=heads0)
    probs0 = {f.name: f.probability for f in rep0.findings}
    assert probs0["nodule"] != pytest.approx(probs["nodule"], abs=1e-3)
    assert all(probs0[n] == pytest.approx(probs[n], abs=1e-5) for n in probs if n != "nodule")
    # the findings table says where the probability comes from (report.json and the UI)
    from app.ui import findings_table

    row = next(f for f in rep.findings if f.name == "nodule")
    assert row.to_dict()["probability_source"] == "finding heads + lung-nodule detector"
    assert all(f.to_dict()["probability_source"] == "finding heads" for f in rep.findings if f.name != "nodule")
    assert next(f for f in rep0.findings if f.name == "nodule").detector is None  # no fusion fitted
    ui_row = next(r for r in findings_table(rep) if r[0] == row.display)
    assert "(with the lung-nodule detector)" in ui_row[2]


def test_mbr_decoding_samples_and_reranks_by_the_findings_table(pipe, tmp_path, monkeypatch):
    """strategy "mbr": generate gets an mbr GenerationConfig with the pipeline's samples,
    temperature and seed, comparing candidates from the Findings marker on, and one CallsAgreement
    per study built from the calls (calls_agreement 0: none); the provenance records it.
    Bad settings are refused with the fix."""
    from app.pipeline import PipelineConfig
    from data.report_consistency import CallsAgreement
    from data.report_format import SECTION_KEYS

    tok = pipe.tokenizer
    rep, _, seen = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",),
                                  pipeline={"strategy": "mbr", "num_samples": 3, "temperature": 0.7, "max_new_tokens": 24})
    g = seen["args"][2]
    assert (g.strategy, g.num_samples, g.temperature, g.seed) == ("mbr", 3, 0.7, 0)
    assert g.mbr_from_id is None  # the samples compared whole (mbr_from "report", the default)
    _, _, fi = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",),
                              pipeline={"strategy": "mbr", "num_samples": 2, "mbr_from": "findings", "max_new_tokens": 8})
    assert fi["args"][2].mbr_from_id == tok.section_ids[SECTION_KEYS.index("findings")]
    (r,) = seen["rerank"]
    assert isinstance(r, CallsAgreement) and r.called == {"cardiomegaly"} and r.weight == PipelineConfig().calls_agreement
    gen = rep.provenance["generation"]
    assert gen["strategy"] == "mbr" and gen["num_samples"] == 3 and gen["temperature"] == 0.7 and gen["mbr_from"] == "report"
    # with a record naming a cancer: the calls' agreement plus the record's facts carried
    history = "ONCOLOGY NOTE (2021-03-02)\nPast medical history: prostate cancer, diagnosed in 2019.\n"
    _, _, rec = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), history_text=history,
                               pipeline={"strategy": "mbr", "num_samples": 2, "record_agreement": 2.0, "max_new_tokens": 8})
    (both,) = rec["rerank"]

    def ids(impression):
        out = []
        for key, text in (("findings", "Heart and mediastinum: The heart is enlarged."), ("impression", impression)):
            out += [tok.section_ids[SECTION_KEYS.index(key)], *tok.encode(text)]
        return out + [tok.eos_id]  # a finished sample

    carried, not_carried = ids("1. Cardiomegaly. No metastases from the known prostate cancer."), ids("1. Cardiomegaly.")
    agree = CallsAgreement(tok, ["cardiomegaly"], PipelineConfig().calls_agreement)
    assert both(carried) == pytest.approx(agree(carried) + 2.0)
    assert both(not_carried) == pytest.approx(agree(not_carried))
    assert both(carried[:-1]) == pytest.approx(agree(carried[:-1]))  # never ended: no credit for the record
    _, _, off = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",),
                               pipeline={"strategy": "mbr", "num_samples": 2, "calls_agreement": 0.0, "max_new_tokens": 8})
    assert off["rerank"] is None  # no calls weight and no record facts
    rep_g, _, greedy = _serve_calling(pipe, tmp_path, monkeypatch, ("cardiomegaly",), pipeline={"max_new_tokens": 8})
    assert greedy["rerank"] is None and "num_samples" not in rep_g.provenance["generation"]
    for bad in (dict(strategy="mbr", num_samples=0), dict(strategy="mbr", temperature=0.0), dict(strategy="nucleus"),
                dict(strategy="mbr", calls_guidance=1.0), dict(strategy="mbr", mbr_from="impression")):
        with pytest.raises(ValueError):
            PipelineConfig(**bad)
