"""medreport train: loss goes down, exact resume, config overrides, clear manifest errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.train import ConfigError, TrainStep, load_config, model_config, train
from app.train_data import (
    PreprocessConfig, ReportDataset, StudyCache, TrainDataError, collate_examples, crop_history,
    load_manifest_for_training,
)
from data.errors import MedreportError
from multimodal.model import ModelInputs, ReportModel

# A small, fast recipe on the bundled examples (3 train, 1 val study): tiny preset with a cheaper
# image encoder (stride 32, 4 slabs), one decoder and fusion layer, no audio, short history caps.
FAST = [
    "data.batch_size=1", "data.audio=false", "data.history_curriculum=[[0,48],[0.5,64]]",
    "data.max_report_tokens=96", "model.image.output_stride=32", "model.image.max_slabs=4",
    "model.decoder.n_layers=1", "model.fusion.n_layers=1", "eval.every=0", "eval.bleu_studies=0", "eval.max_studies=1", "save_every=0",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, repo_root):
    """One tokenizer and one preprocessing cache for every run of this module."""
    base = tmp_path_factory.mktemp("train")
    manifest = repo_root / "examples" / "manifest.jsonl"
    cfg = load_config(None, repo_root / "configs" / "tiny.json", FAST + ["stages.0.steps=1"])
    from app.train import Dist, build_tokenizer

    build_tokenizer(cfg, load_manifest_for_training(manifest), base / "tok_run", Dist())
    return {"manifest": manifest, "cache": base / "cache", "tok": base / "tok_run" / "tokenizer", "base": base}


def _cfg(shared, repo_root, *extra):
    return load_config(None, repo_root / "configs" / "tiny.json",
                       FAST + [f"data.cache_dir={shared['cache']}", f"data.tokenizer={shared['tok']}", *extra])


def _train_loss(model: ReportModel, cfg, shared) -> float:
    """Mean training loss of ``model`` over the train split (eval mode, no grad)."""
    from data.tokenizer import ReportTokenizer

    tok = ReportTokenizer.load(shared["tok"])
    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"]
    cache = StudyCache(shared["cache"], PreprocessConfig.from_model(model.cfg, audio=False))
    ds = ReportDataset(entries, tok, model.cfg, cache, max_history_tokens=64, max_report_tokens=96)
    model.eval()
    with torch.no_grad():
        return float(np.mean([float(TrainStep(model)(collate_examples([ds[i]], tok.pad_id))["loss"]) for i in range(len(ds))]))


def test_few_steps_lower_the_loss_and_write_the_run(shared, repo_root, tmp_path):
    cfg = _cfg(shared, repo_root, "stages.0.steps=4", "optim.lr=3e-3", "eval.bleu_studies=1", "eval.max_new_tokens=12")
    torch.manual_seed(cfg.seed)
    from data.tokenizer import ReportTokenizer

    init = ReportModel(model_config(cfg, ReportTokenizer.load(shared["tok"]).vocab_size))
    before = _train_loss(init, cfg, shared)
    run = tmp_path / "run"
    final = train(shared["manifest"], run, cfg, progress=False)
    model = ReportModel.from_pretrained(final)
    after = _train_loss(model, cfg, shared)
    assert after < before - 0.2, (before, after)

    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["optim"]["lr"] == 3e-3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    val = [r for r in rows if "val_loss" in r]
    assert val and "val_finding_micro_f1" in val[-1] and "val_bleu4" in val[-1]
    assert (run / "learning_curve.png").stat().st_size > 1000
    fm = json.loads((run / "final_metrics.json").read_text())
    assert fm["temperature"] > 0 and float(model.heads.temperature) == pytest.approx(fm["temperature"], rel=1e-6)
    assert (final / "tokenizer" / "tokenizer.json").is_file()


def test_exact_resume_matches_straight_run(shared, repo_root, tmp_path):
    cfg = _cfg(shared, repo_root, "stages.0.steps=4")
    train(shared["manifest"], tmp_path / "straight", cfg, progress=False)
    assert train(shared["manifest"], tmp_path / "split", cfg, progress=False, stop_at=2) is None
    state = torch.load(tmp_path / "split" / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and set(state["rng"]) >= {"python", "numpy", "torch"} and "optimizer" in state
    train(shared["manifest"], tmp_path / "split", None, resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # the resumed run's log has every step once
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_recipe_runs_under_bf16_autocast(shared, repo_root, tmp_path, monkeypatch):
    """Mixed precision as a GPU trains (bf16 autocast; CPU autocast takes the same dtype paths):
    the encoder stage, the decoder stage on cached tokens with the digest, copy head and prompts,
    and the where stage all run with finite losses. A lent H200 found three dtype clashes here
    (attention q/k/v, its backward's fp32 statistics, the audio tokens) that fp32 tests missed."""
    import app.train as train_mod

    monkeypatch.setattr(train_mod, "use_amp_on", lambda cfg, device: True)
    stages = json.dumps([
        {"name": "encoders", "steps": 2, "train": ["image_encoder", "audio_encoder", "fusion", "heads",
                                                   "decoder.tok_embeddings"], "lm": False, "freeze": ["heads.where_"]},
        {"name": "decoder", "steps": 2, "train": ["fusion", "decoder", "heads"], "lm": True, "cache_encoders": True,
         "freeze": ["heads.where_"]},
        {"name": "where", "steps": 1, "train": ["heads.where_"], "lm": False, "cache_encoders": True},
    ])
    cfg = _cfg(shared, repo_root, f"stages={stages}", "model.history_digest_words=40", "model.decoder.copy=true",
               "model.copy_weight=1.0", "model.fusion.n_digest_tokens=4", "model.finding_prompt=true",
               "model.acquisition_prompt=true", "model.heads.where_from_tokens=true", "model.heads.token_presence=true",
               "data.audio=true", "log_every=1")
    seen = []
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: seen.append((a, k)) or real_autocast(*a, **k))
    final = train(shared["manifest"], tmp_path / "run", cfg, progress=False)
    assert any(k.get("enabled") and k.get("dtype") == torch.bfloat16 for _, k in seen)  # it did run under autocast
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["stage"] for r in rows] == ["encoders"] * 2 + ["decoder"] * 2 + ["where"]
    assert all(math.isfinite(r["loss"]) for r in rows) and "lm" in rows[2]
    assert ReportModel.from_pretrained(final).cfg.acquisition_prompt


def test_two_stage_recipe_runs_with_cached_encoder_tokens(shared, repo_root, tmp_path):
    stages = json.dumps([
        {"name": "encoders", "steps": 2, "train": ["image_encoder", "audio_encoder", "fusion", "heads",
                                                   "decoder.tok_embeddings"], "lm": False},
        {"name": "decoder", "steps": 2, "train": ["fusion", "decoder", "heads"], "lm": True, "cache_encoders": True},
    ])
    # with the history digest (pooled apart for fusion) and copy head on, as the demo recipe runs
    # (the cached-token path)
    cfg = _cfg(shared, repo_root, f"stages={stages}", "model.history_digest_words=40", "model.decoder.copy=true",
               "model.copy_weight=1.0", "model.fusion.n_digest_tokens=4", "log_every=1")
    final = train(shared["manifest"], tmp_path / "run", cfg, progress=False)
    m = ReportModel.from_pretrained(final)
    ck = ReportModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step_2")  # end of stage 1
    # operating points chosen on val at the end, saved in the model's config
    fm = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert len(m.cfg.heads.decision_thresholds) == len(m.finding_names)
    assert list(fm["decision_thresholds"].values()) == list(m.cfg.heads.decision_thresholds)
    assert not torch.equal(m.decoder.copy_head.wq.weight, ck.decoder.copy_head.wq.weight)  # stage 2 trains the copy head
    # stage 2 froze the image encoder: its weights and BatchNorm statistics did not move; the decoder did
    for (n, p), (_, q) in zip(m.image_encoder.state_dict().items(), ck.image_encoder.state_dict().items()):
        assert torch.equal(p, q), n
    assert not torch.equal(m.decoder.layers[0].moe.router.weight, ck.decoder.layers[0].moe.router.weight)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert "lm" not in rows[0] and "lm" in rows[-1]
    # the supervised copy loss runs on the cached path too (the tiny examples' reports share
    # trigrams with their digests) and is part of the logged losses
    assert "copy" not in rows[0] and all(r["copy"] > 0 and math.isfinite(r["copy"]) for r in rows[2:])
    # each stage's end is kept out of the checkpoint rotation; a run started from the encoder
    # stage's end trains only the decoder stage and ends exactly where the straight run ended
    assert (tmp_path / "run" / "stages" / "encoders" / "trainer_state.pt").is_file()
    assert (tmp_path / "run" / "stages" / "decoder" / "model.safetensors").is_file()
    again = train(shared["manifest"], tmp_path / "again", cfg, progress=False,
                  start_from=tmp_path / "run" / "stages" / "encoders")
    a = load_file(final / "model.safetensors")
    b = load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    rows2 = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows2] == [1, 2, 3, 4]  # stage 1's rows come from the first run's log
    with pytest.raises(ConfigError, match="nothing left to train"):
        train(shared["manifest"], tmp_path / "late", cfg, progress=False, start_from=tmp_path / "run" / "stages" / "decoder")
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        train(shared["manifest"], tmp_path / "bad", cfg, progress=False, start_from=final)


def test_config_overrides_parse_and_reach_the_saved_config(repo_root):
    cfg = load_config("tiny", repo_root / "configs" / "tiny.json",
                      ["optim.lr=1e-3", "stages.0.steps=7", "data.history_crop=tail", "model.decoder.moe.n_experts=2",
                       "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 1e-3 and cfg.stages[0].steps == 7 and cfg.data.history_crop == "tail"
    assert cfg.optim.betas == (0.8, 0.9)
    assert model_config(cfg, 100).decoder.moe.n_experts == 2
    assert json.loads(json.dumps(cfg.to_dict()))["optim"]["lr"] == 1e-3
    for bad, needle in [("optim.lrr=1", "optim.lrr"), ("optim.lr=fast", "number"), ("stages.0.steps=1.5", "integer"),
                        ("model.decoder.n_layerz=2", "n_layerz"), ("lr", "key=value"), ("stages.3.steps=1", "entries")]:
        with pytest.raises(ConfigError, match=needle):
            load_config("tiny", None, [bad])
    assert issubclass(ConfigError, MedreportError)


def test_bad_manifest_lists_every_problem(tmp_path, repo_root):
    with pytest.raises(TrainDataError, match="manifest not found"):
        load_manifest_for_training(tmp_path / "nope.jsonl")
    lines = (repo_root / "examples" / "manifest.jsonl").read_text().splitlines()
    good = json.loads(lines[0])
    good["study"] = str(repo_root / "examples" / good["study"])
    for k in ("history", "audio"):
        good[k] = str(repo_root / "examples" / good[k])
    missing = dict(good, id="a", study="studies/does_not_exist")
    badsplit = dict(good, id="b", split="training")
    (tmp_path / "m.jsonl").write_text("\n".join([json.dumps(good), json.dumps(missing), "{not json", json.dumps(badsplit)]))
    with pytest.raises(TrainDataError) as ei:
        load_manifest_for_training(tmp_path / "m.jsonl")
    msg = str(ei.value)
    assert "3 problems" in msg and "line 2" in msg and "study path not found" in msg
    assert "line 3" in msg and "not valid JSON" in msg and "line 4" in msg and "split" in msg
    # the CLI prints it as one message, exit status 2
    from app.cli import main

    assert main(["train", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "run")]) == 2


def test_history_crop_keeps_fact_windows():
    rng = np.random.default_rng(0)
    ids = list(range(1000))
    out = crop_history(ids, 100, [500, 900], rng, "facts")
    assert len(out) == 100 and out == sorted(out) and 500 in out and 900 in out
    assert crop_history(ids, 100, [500], rng, "tail") == ids[-100:]
    assert crop_history(ids[:50], 100, [10], rng) == ids[:50]


def test_kept_history_tokens_give_the_same_examples_and_read_each_record_once(shared, repo_root, monkeypatch):
    """The per-study memo of record tokens, fact positions and digest changes no example, at any
    cap or epoch, and a record is read and tokenised once."""
    import app.train_data as td
    from data.tokenizer import ReportTokenizer

    cfg = _cfg(shared, repo_root, "model.history_digest_words=40")
    tok = ReportTokenizer.load(shared["tok"])
    mcfg = model_config(cfg, tok.vocab_size)
    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"]
    entries = [e for e in entries if td.history_text(e)][:4]
    assert entries, "the shared fixture has records"
    cache = StudyCache(shared["cache"], PreprocessConfig.from_model(mcfg, audio=False))
    reads = []
    real = td.history_text
    monkeypatch.setattr(td, "history_text", lambda e: reads.append(e.id) or real(e))
    kept = ReportDataset(entries, tok, mcfg, cache, max_report_tokens=96)
    fresh = ReportDataset(entries, tok, mcfg, cache, max_report_tokens=96, memo_history=False)
    for cap in (24, 48, 4096):
        for epoch in (0, 1):
            for ds in (kept, fresh):
                ds.max_history_tokens, ds.epoch = cap, epoch
            for i in range(len(entries)):
                a, b = kept[i], fresh[i]
                assert a.ids == b.ids and a.n_prefix == b.n_prefix and a.study.digest_len == b.study.digest_len
                assert a.study.history_ids == b.study.history_ids
    assert len(kept._history_memo) == len(entries) and not fresh._history_memo
    kept.max_history_tokens = 24
    assert any(kept[i].study.digest_len for i in range(len(entries)))  # the digest is in play
    assert any(len(kept._history_memo[k][0]) > 24 for k in kept._history_memo)  # and the crop
    assert sorted(reads).count(entries[0].id) == 1 + 6  # the memo read it once; the other dataset every time


def test_split_evaluation_and_fp16_shipped_model(shared, repo_root, tmp_path):
    from app.commands.demo_model import write_shipped_model
    from app.train import evaluate_split
    from data.tokenizer import ReportTokenizer

    cfg = _cfg(shared, repo_root)
    tok = ReportTokenizer.load(shared["tok"])
    torch.manual_seed(0)
    model = ReportModel(model_config(cfg, tok.vocab_size), tok).eval()
    preds = tmp_path / "pred.jsonl"
    m = evaluate_split(model, shared["manifest"], "test", max_new_tokens=6, batch_size=2, predictions=preds,
                       max_history_tokens=64, progress=False)
    assert m["n"] == 2 and {"bleu4", "finding_micro_f1", "ece", "text_finding_consistency", "facts_carried"} <= set(m)
    assert 0 <= m["ece"] <= 1 and 0 <= m["text_finding_consistency"] <= 1
    assert {json.loads(x)["id"] for x in preds.read_text().splitlines()} == {"syn00001", "syn00003"}

    model.heads.temperature.fill_(1.7)
    out = write_shipped_model(model, tmp_path / "demo")
    full = tmp_path / "full"
    model.save_pretrained(full, tok)
    assert (out / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    back = ReportModel.from_pretrained(out)
    assert back.decoder.tok_embeddings.weight.dtype == torch.float32
    assert float(back.heads.temperature) == pytest.approx(1.7, abs=1e-3)
    for (n, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.allclose(p.double(), q.double(), atol=2e-3, rtol=1e-2), n


def test_split_evaluation_reranks_mbr_as_the_product_does(shared, repo_root, monkeypatch):
    """evaluate_split with MBR builds each study's rerank as the pipeline does (app.decoding.mbr_rerank):
    the header's contrast from the study's acquisition line and the acquisition weight, and records the
    weight with the decoding."""
    import app.decoding as ad
    from app.train import evaluate_split
    from data.tokenizer import ReportTokenizer

    cfg = _cfg(shared, repo_root, "model.acquisition_prompt=true")
    tok = ReportTokenizer.load(shared["tok"])
    torch.manual_seed(0)
    model = ReportModel(model_config(cfg, tok.vocab_size), tok).eval()
    seen, real = [], ad.mbr_rerank

    def spy(tokenizer, called, facts, calls_w, record_w, contrast=None, acquisition_w=0.0):
        seen.append((contrast, acquisition_w))
        return real(tokenizer, called, facts, calls_w, record_w, contrast, acquisition_w)

    monkeypatch.setattr(ad, "mbr_rerank", spy)
    m = evaluate_split(model, shared["manifest"], "test", max_new_tokens=6, batch_size=2, max_history_tokens=64,
                       progress=False, strategy="mbr", num_samples=2, calls_agreement=0.0, acquisition_agreement=1.5)
    assert m["decoding"]["acquisition_agreement"] == 1.5
    assert len(seen) == 2 and all(w == 1.5 and c in (True, False) for c, w in seen)


def test_facts_carried_counts_facts_and_studies():
    from types import SimpleNamespace as NS

    from app.evaluate import facts_carried

    f = lambda kind, phrase: NS(kind=kind, expect_in_report=phrase)  # noqa: E731
    entries = [
        NS(id="a", history="h.txt", history_text=None, facts=[f("indication", "Chest pain"), f("malignancy", "known lymphoma")]),
        NS(id="b", history=None, history_text="record", facts=[f("indication", "Cough"), f("distractor", "ignored")]),
        NS(id="c", history=None, history_text=None, facts=[f("indication", "never checked")]),  # no history
    ]
    hyp = {"a": "CLINICAL INFORMATION: chest pain. IMPRESSION: no known LYMPHOMA relapse... known lymphoma.",
           "b": "Dyspnea.", "c": "never checked"}
    out = facts_carried(hyp, entries)
    assert out["facts_checked"] == 3 and abs(out["facts_carried"] - 2 / 3) < 1e-9
    assert out["facts_studies_checked"] == 2 and out["facts_carried_studies"] == 0.5
    assert out["facts_carried_by_kind"] == {"indication": 0.5, "malignancy": 1.0}


def test_token_targets_mark_the_tokens_a_lesion_touches():
    from data.datasets import Lesion

    from app.train_data import token_targets

    names = ("nodule", "mass")
    zr = np.array([[0, 4], [4, 8], [8, 12]])  # 3 slabs of 4 slices, 5 mm apart
    # 128 x 128 pixels of 1 mm, grid 4 -> cells of 32 mm; a 5 mm nodule at slice 5, row 40, col 110
    t = token_targets([Lesion("nodule", [25.0, 40.0, 110.0], 5.0)], zr, (5.0, 1.0, 1.0), (128, 128), 4, names)
    assert t.shape == (3 * 16, 2) and t[:, 1].sum() == 0
    on = np.flatnonzero(t[:, 0])
    assert on.tolist() == [16 + 1 * 4 + 3]  # slab 1, cell row 1 (32-64 mm), cell col 3 (96-128 mm)
    # a large sphere reaches neighbouring slabs and cells; dict lesions work too
    t2 = token_targets([{"finding": "mass", "center_zyx_mm": [25.0, 64.0, 64.0], "radius_mm": 20.0}], zr,
                       (5.0, 1.0, 1.0), (128, 128), 4, names)
    assert t2[:, 1].sum() == 3 * 4  # all 3 slabs (z 5..45 mm), the 4 central cells
    assert token_targets([], zr, (5.0, 1.0, 1.0), (128, 128), 4, names).sum() == 0


def test_token_loss_trains_the_image_encoder():
    import torch

    from multimodal.heads import FindingLabels
    from multimodal.model import ReportModel, StudyInputs, collate
    from multimodal.presets import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=64)
    cfg.heads.token_loss_weight = 0.5
    m = ReportModel(cfg)
    rng = np.random.default_rng(0)
    x = collate([StudyInputs(pixels=rng.random((2, 3, 64, 64), dtype=np.float32), z_mm=np.array([0.0, 5.0]),
                             z_index_range=np.array([[0, 1], [1, 2]]))])
    K, G = len(m.finding_names), cfg.image.grid
    x.labels = FindingLabels(torch.zeros(1, K))
    x.token_targets = torch.zeros(1, 2 * G * G, K)
    x.token_targets[0, 3, 0] = 1.0
    out = m(x)
    assert "token" in out.losses and torch.isfinite(out.losses["token"])
    out.loss.backward()
    assert m.image_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert m.heads.token_logits.weight.grad.abs().sum() > 0
    off = ReportModel(ModelConfig.preset("tiny", vocab_size=64))
    assert not hasattr(off.heads, "token_logits") and "token" not in off(x).losses


def test_cache_keeps_the_study_geometry_for_token_targets():
    from app.train_data import PreprocessConfig, StudyCache
    from data.datasets import read_manifest
    from data.study import load_study

    from ._model import EXAMPLES

    e = read_manifest(EXAMPLES / "manifest.jsonl")[0]
    a = StudyCache(None, PreprocessConfig(n_slabs=4, image_size=32, n_mels=32, audio=False)).arrays(e)
    s = load_study(e.study_path)
    np.testing.assert_allclose(a["spacing_zyx"], s.spacing_mm)
    assert tuple(a["shape_zyx"]) == s.shape
    # the dataset turns them into per-token targets when the token loss is on
    from app.train_data import ReportDataset, collate_examples
    from data.tokenizer import ReportTokenizer
    from multimodal.presets import ModelConfig

    cfg = ModelConfig.preset("tiny", vocab_size=64)
    cfg.heads.token_loss_weight = 1.0
    entries = [x for x in read_manifest(EXAMPLES / "manifest.jsonl") if x.lesions][:2]
    tok = ReportTokenizer.train([x.report for x in entries], vocab_size=300, min_frequency=1)
    ds = ReportDataset(entries, tok, cfg, StudyCache(None, PreprocessConfig.from_model(cfg)))
    batch = collate_examples([ds[0], ds[1]])
    G, K = cfg.image.grid, len(cfg.heads.finding_names)
    assert batch.token_targets.shape == (2, batch.slab_mask.shape[1] * G * G, K)
    assert batch.token_targets.sum() > 0  # these studies have lesions


def test_per_finding_metrics_and_auc():
    from app.train import per_finding_metrics, roc_auc

    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # one of four pairs misordered
    assert roc_auc([0.2, 0.2], [0, 1]) == 0.5 and roc_auc([0.1, 0.9], [1, 1]) is None
    P = np.array([[0.9, 0.1], [0.2, 0.6], [0.7, 0.4], [0.1, 0.8]])
    Y = np.array([[1, 0], [0, -1], [1, 0], [0, 1]], dtype=float)  # -1: unknown, ignored
    out = per_finding_metrics(P, Y, ["a", "b"])
    assert out["a"] == {"support": 2, "predicted": 2, "threshold": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                        "auc": 1.0}
    assert out["b"]["support"] == 1 and out["b"]["predicted"] == 1 and out["b"]["f1"] == 1.0
    assert out["b"]["auc"] == 1.0


def test_model_card_lists_findings_and_names_the_unlearned_ones(tmp_path):
    import argparse

    from app.commands.demo_model import model_card, per_finding_from_predictions
    from app.train import load_config

    manifest = tmp_path / "manifest.jsonl"
    labels = lambda a, b: [{"finding": "cardiomegaly", "present": a}, {"finding": "nodule", "present": b}]  # noqa: E731
    rows = [("s1", labels(True, True), 0.9, 0.2), ("s2", labels(False, False), 0.1, 0.3),
            ("s3", labels(True, False), 0.8, 0.6), ("s4", labels(False, True), 0.2, 0.1)]
    manifest.write_text("".join(json.dumps({"id": i, "split": "test", "study": f"studies/{i}", "labels": lab}) + "\n"
                                for i, lab, *_ in rows))
    preds = tmp_path / "test_predictions.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "report": "x", "findings": {"cardiomegaly": {"p": c}, "nodule": {"p": n}}}) + "\n"
                             for i, _, c, n in rows))
    per = per_finding_from_predictions(preds, manifest)
    assert per["cardiomegaly"]["auc"] == 1.0 and per["cardiomegaly"]["f1"] == 1.0
    assert per["nodule"]["auc"] == 0.0 and per["nodule"]["support"] == 2  # positives scored lowest
    args = argparse.Namespace(dataset=tmp_path, n=4, seed=1, history_tokens="200:400", config="configs/demo.json",
                              eval_history_tokens=100000, fp32=False)
    card = model_card(args, load_config(None, "configs/demo.json"), {"finding_micro_f1": 0.6, "n": 4, "per_finding": per})
    assert "| cardiomegaly | 2 |" in card and "does not detect: nodule" in card
    assert "not for clinical use" in card.lower() and "--start-from" not in card and "tiny geometry" not in card
    args.tiny_studies, args.tiny_seed = 600, 4242  # trained with tiny studies besides: the card says how they were made
    card = model_card(args, load_config(None, "configs/demo.json"), {"finding_micro_f1": 0.6, "n": 4, "per_finding": per})
    assert "Plus 600 training studies of the tiny geometry" in card and "--seed 4242 --size tiny" in card
    args.tiny_studies = 0
    # a run that started from another run's stage end says so
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"start_from": "runs/a/stages/encoders"}))
    args.run = tmp_path / "run"
    card = model_card(args, load_config(None, "configs/demo.json"), {"finding_micro_f1": 0.6, "n": 4, "per_finding": per})
    assert "`runs/a/stages/encoders` (`medreport train --start-from`)" in card
    assert "## Decoding\nGreedy (not tuned)." in card
    # a decoding chosen on val is shown with its table, the chosen row marked
    rows = [{"strategy": "greedy", "num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "n": 3, "bleu4": 0.1,
             "length_ratio": 0.8, "brevity_penalty": 0.78},
            {"strategy": "beam", "num_beams": 4, "length_penalty": 2.0, "no_repeat_ngram_size": 0, "n": 3, "bleu4": 0.2,
             "length_ratio": 0.9, "brevity_penalty": 0.9}]
    card = model_card(args, load_config(None, "configs/demo.json"),
                      {"n": 4, "decoding": {k: rows[1][k] for k in ("strategy", "num_beams", "length_penalty",
                                                                   "no_repeat_ngram_size")}, "decoding_table_val": rows})
    assert "on 3 val studies" in card and "beam 4 lp 2" in card
    assert [ln for ln in card.splitlines() if "<- chosen" in ln][0].startswith("beam 4 lp 2")
    assert "RecordAgreement" not in card and "never ended" not in card  # beam search
    # an MBR decoding that weighs the record's facts says so
    card = model_card(args, load_config(None, "configs/demo.json"),
                      {"n": 4, "decoding": {"strategy": "mbr", "num_samples": 8, "temperature": 0.7, "calls_agreement": 1.0,
                                            "record_agreement": 0.5}, "decoding_table_val": rows})
    assert "(x 0.5) the share of the patient record's known cancers" in card
    assert "kept only when none of the study's samples ended" in card
    assert "AcquisitionAgreement" not in card
    card = model_card(args, load_config(None, "configs/demo.json"),
                      {"n": 4, "decoding": {"strategy": "mbr", "num_samples": 8, "temperature": 0.7, "calls_agreement": 1.0,
                                            "acquisition_agreement": 1.0}, "decoding_table_val": rows})
    assert "(x 1) whether a report's Technique states the scan's contrast" in card and "RecordAgreement" not in card


def test_history_digest_and_copy_head_train_and_generate(shared, repo_root, tmp_path):
    """With a history digest and the decoder's copy head: the digest ends each prefix (right
    before [REPORT]) inside the history cap, the copy mask marks exactly it, training runs, and
    the saved model generates through the pipeline's evaluation path."""
    from app.train import evaluate_split
    from data.history_digest import HEADER
    from data.tokenizer import ReportTokenizer

    cfg = _cfg(shared, repo_root, "stages.0.steps=2", "model.history_digest_words=40", "model.decoder.copy=true",
               "model.decoder.copy_case=true", "model.copy_weight=1.0", "log_every=1")
    tok = ReportTokenizer.load(shared["tok"])
    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train" and (e.history or e.history_text)]
    assert entries, "the bundled examples need a history for this test"
    mcfg = model_config(cfg, tok.vocab_size)
    ds = ReportDataset(entries, tok, mcfg, StudyCache(shared["cache"], PreprocessConfig.from_model(mcfg, audio=False)),
                       max_history_tokens=64, max_report_tokens=96)
    ex = ds[0]
    assert ex.study.digest_len > 0 and len(ex.study.history_ids) <= 64
    digest_text = tok.decode(ex.study.history_ids[-ex.study.digest_len:])
    assert digest_text.startswith(HEADER)
    x = collate_examples([ds[i] for i in range(len(ds))], tok.pad_id)
    for b in range(len(ds)):
        marked = x.ids[b][x.copy_mask[b]].tolist()
        assert marked == list(ds[b].study.history_ids[-ds[b].study.digest_len:])
        assert int(x.copy_mask[b].nonzero().max()) == ds[b].n_prefix - 2  # the last digest token precedes [REPORT]

    final = train(shared["manifest"], tmp_path / "run", cfg, progress=False)
    model = ReportModel.from_pretrained(final)
    assert model.cfg.history_digest_words == 40 and model.decoder.copy_head is not None and model.cfg.copy_weight == 1.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows and all(math.isfinite(r["copy"]) for r in rows)  # the joint (uncached) path
    canon = model.decoder.copy_canon()  # case-aware maps restored from the saved tokenizer
    assert canon is not None and int((canon != torch.arange(len(canon))).sum()) > 0
    m = evaluate_split(model, shared["manifest"], "test", max_new_tokens=6, batch_size=2, max_history_tokens=64, progress=False)
    assert m["n"] == 2


def test_calibrate_command_refits_operating_points_on_val(shared, repo_root, tmp_path, capsys):
    """`medreport calibrate` on a trained model's val split: temperature and per-finding operating
    points land in the written model's config; the test split is refused."""
    from app.cli import main

    cfg = _cfg(shared, repo_root, "stages.0.steps=1")
    final = train(shared["manifest"], tmp_path / "run", cfg, progress=False)
    out = tmp_path / "calibrated"
    rc = main(["calibrate", "--model", str(final), "--manifest", str(shared["manifest"]), "--out", str(out),
               "--cache-dir", str(shared["cache"]), "--max-history-tokens", "64", "--beta", "2"])
    assert rc == 0
    m = ReportModel.from_pretrained(out)
    cal = json.loads((out / "calibration.json").read_text())
    assert m.cfg.heads.operating_beta == 2.0 and cal["operating_beta"] == 2.0  # stored with the model
    assert len(m.cfg.heads.decision_thresholds) == len(m.finding_names)
    assert list(cal["decision_thresholds"].values()) == list(m.cfg.heads.decision_thresholds)
    assert float(m.heads.temperature) == pytest.approx(cal["temperature"])
    assert "calibrated on" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(final), "--manifest", str(shared["manifest"]), "--split", "test"]) == 2
    assert "leak" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(final), "--manifest", str(shared["manifest"]), "--beta", "0"]) == 2
    assert "--beta must be > 0" in capsys.readouterr().err
    # the nodule detector's evidence: a fusion row is fitted (the identity on so few val studies)
    # and stored; its val AUCs are logged; a finding without a detector is refused
    fused = tmp_path / "fused"
    assert main(["calibrate", "--model", str(final), "--manifest", str(shared["manifest"]), "--out", str(fused),
                 "--cache-dir", str(shared["cache"]), "--max-history-tokens", "64", "--detector-evidence", "nodule"]) == 0
    m2 = ReportModel.from_pretrained(fused)
    assert m2.cfg.heads.detector_evidence == ("nodule",) and [r[0] for r in m2.cfg.heads.evidence_fusion] == ["nodule"]
    cal2 = json.loads((fused / "calibration.json").read_text())
    assert cal2["evidence_fusion"][0][0] == "nodule" and "val_nodule_auc_heads" in cal2
    assert "fused with the detector's evidence" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(fused), "--manifest", str(shared["manifest"]), "--out", str(tmp_path / "none"),
                 "--cache-dir", str(shared["cache"]), "--max-history-tokens", "64", "--detector-evidence", "none"]) == 0
    m3 = ReportModel.from_pretrained(tmp_path / "none")
    assert m3.cfg.heads.detector_evidence == () and m3.cfg.heads.evidence_fusion == ()
    assert main(["calibrate", "--model", str(final), "--manifest", str(shared["manifest"]), "--detector-evidence", "mass"]) == 2
    assert "the detectors (data.detectors) read nodule, fracture, bone_lesion" in capsys.readouterr().err


def test_training_fits_the_detector_fusion_with_the_calibration(shared, repo_root, tmp_path):
    """heads.detector_evidence in a recipe: the run's calibration (after the last step) fits one
    fusion row per named finding on the val split, saved in the final model and its metrics; a
    finding no detector reads is refused when the config is read, before any step."""
    cfg = _cfg(shared, repo_root, "stages.0.steps=1", 'model.heads.detector_evidence=["nodule","fracture","bone_lesion"]')
    final = train(shared["manifest"], tmp_path / "run", cfg, progress=False)
    m = ReportModel.from_pretrained(final)
    assert [r[0] for r in m.cfg.heads.evidence_fusion] == ["nodule", "fracture", "bone_lesion"]
    assert all(r[1] >= 0 and r[2] >= 0 for r in m.cfg.heads.evidence_fusion)  # never inverted
    fm = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert fm["evidence_fusion"] == [list(r) for r in m.cfg.heads.evidence_fusion]
    with pytest.raises(ConfigError, match="data.detectors"):  # when the recipe is read
        _cfg(shared, repo_root, "stages.0.steps=1", 'model.heads.detector_evidence=["mass"]')


def test_finding_prompt_in_training_comes_from_the_labels(shared, repo_root):
    """model.finding_prompt: each training example's prefix ends with the prompt of its labels
    (the teacher of the heads' calls) right before [REPORT], inside the copy sources, and never
    in the history the fusion reads."""
    from data.finding_prompt import finding_prompt
    from data.tokenizer import ReportTokenizer
    from multimodal.heads import coarse_location

    cfg = _cfg(shared, repo_root, "model.finding_prompt=true", "model.history_digest_words=40", "model.decoder.copy=true")
    tok = ReportTokenizer.load(shared["tok"])
    mcfg = model_config(cfg, tok.vocab_size)
    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"]
    ds = ReportDataset(entries, tok, mcfg, StudyCache(shared["cache"], PreprocessConfig.from_model(mcfg, audio=False)),
                       max_history_tokens=64, max_report_tokens=96)
    exs = [ds[i] for i in range(len(ds))]
    x = collate_examples(exs, tok.pad_id)
    spans_checked = 0
    for b, (e, ex) in enumerate(zip(entries, exs)):
        calls = [(lab.finding, lab.side, coarse_location(lab.location)) for lab in e.labels if lab.present]
        prompt = tok.tk.encode(finding_prompt(calls), add_special_tokens=False).ids
        hist = list(ex.study.history_ids or [])
        assert ex.n_prompt == len(prompt) > 0
        assert ex.ids[: ex.n_prefix] == [tok.bos_id, *hist, *prompt, tok.report_id]
        assert x.prompt_len[b] == len(prompt)
        src = x.copy_mask[b].nonzero()[:, 0].tolist()
        assert src[-1] == len(hist) + len(prompt)  # sources run to the prompt's end, right before [REPORT]
        assert set(range(1 + len(hist), 1 + len(hist) + len(prompt))) <= set(src)
        spans_checked += 1
        if x.history_ids is not None:  # the fusion's history is the record alone
            assert x.history_ids[b][x.history_mask[b]].tolist() == hist
    assert spans_checked == len(entries)
    assert any(lab.present for e in entries for lab in e.labels)  # some example has a real call


def test_acquisition_prompt_in_training_comes_from_the_header(shared, repo_root, monkeypatch):
    """model.acquisition_prompt: the cached acquisition line (contrast and slice thickness read
    from each study's DICOM header) leads the prompt before the calls; with the dropout at 1 the
    line says "unknown" (as for a NIfTI input); off, no acquisition tokens at all."""
    import app.train_data as td
    from data.finding_prompt import acquisition_phrase, finding_prompt, study_acquisition
    from data.study import load_study
    from data.tokenizer import ReportTokenizer
    from multimodal.heads import coarse_location

    cfg = _cfg(shared, repo_root, "model.finding_prompt=true", "model.acquisition_prompt=true")
    tok = ReportTokenizer.load(shared["tok"])
    mcfg = model_config(cfg, tok.vocab_size)
    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"][:4]
    cache = StudyCache(shared["cache"], PreprocessConfig.from_model(mcfg, audio=False))
    monkeypatch.setattr(td, "ACQUISITION_DROPOUT", 0.0)
    ds = ReportDataset(entries, tok, mcfg, cache, max_history_tokens=64, max_report_tokens=96)
    for i, e in enumerate(entries):
        study = load_study(e.study_path)
        line = study_acquisition(study)
        assert line.startswith("Acquisition: ") and "mm slices" in line and "contrast" in line
        calls = [(lab.finding, lab.side, coarse_location(lab.location)) for lab in e.labels if lab.present]
        ex = ds[i]
        prompt = tok.tk.encode(f"{line} {finding_prompt(calls)}", add_special_tokens=False).ids
        assert ex.n_prompt == len(prompt)
        assert ex.ids[ex.n_prefix - 1 - len(prompt): ex.n_prefix - 1] == prompt
    monkeypatch.setattr(td, "ACQUISITION_DROPOUT", 1.0)
    ex = ds[0]
    unknown = tok.tk.encode(f"{acquisition_phrase(None, None)} ", add_special_tokens=False).ids
    assert ex.ids[ex.n_prefix - 1 - ex.n_prompt: ex.n_prefix - 1][: len(unknown) - 1] == unknown[:-1]
    off = ReportDataset(entries, tok, model_config(_cfg(shared, repo_root, "model.finding_prompt=true"), tok.vocab_size),
                        cache, max_history_tokens=64, max_report_tokens=96)
    assert "Acquisition" not in tok.tk.decode(off[0].ids[: off[0].n_prefix])


def test_finding_prompt_dropout_leaves_the_calls_out_of_some_examples(shared, repo_root):
    """model.finding_prompt_dropout (training only): that share of examples has no calls line, the
    rest the usual one; at 0 every example has it (and no extra random draw is made)."""
    from data.tokenizer import ReportTokenizer

    tok = ReportTokenizer.load(shared["tok"])
    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"]

    def prefixes(*overrides):
        mcfg = model_config(_cfg(shared, repo_root, "model.finding_prompt=true", *overrides), tok.vocab_size)
        ds = ReportDataset(entries, tok, mcfg, StudyCache(shared["cache"], PreprocessConfig.from_model(mcfg, audio=False)),
                           max_history_tokens=64, max_report_tokens=96)
        exs = [ds[i] for i in range(len(ds))]
        ds.epoch = 1  # another epoch: other draws
        exs += [ds[i] for i in range(len(ds))]
        return [(tok.tk.decode(ex.ids[: ex.n_prefix]), ex.n_prompt) for ex in exs]

    assert all("Calls:" in p and n > 0 for p, n in prefixes())
    assert all("Calls:" not in p and n == 0 for p, n in prefixes("model.finding_prompt_dropout=1.0"))
    half = [("Calls:" in p) for p, _ in prefixes("model.finding_prompt_dropout=0.5")]
    assert any(half) and not all(half)


def test_fact_weight_weights_the_report_tokens_that_state_history_facts(shared, repo_root):
    """model.fact_weight: the LM loss weight is fact_weight on exactly the report tokens that spell
    a planted fact's expected phrase (case as written), 1 elsewhere; the weighted loss is the
    weighted mean of the per-token cross-entropy; fact_weight 1 leaves the batch unweighted."""
    import torch.nn.functional as F

    from app.train_data import fact_spans
    from data.tokenizer import ReportTokenizer
    from multimodal.model import decoder_losses

    tok = ReportTokenizer.load(shared["tok"])
    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"]
    for weight in (1.0, 5.0):
        mcfg = model_config(_cfg(shared, repo_root, f"model.fact_weight={weight}"), tok.vocab_size)
        ds = ReportDataset(entries, tok, mcfg, StudyCache(shared["cache"], PreprocessConfig.from_model(mcfg, audio=False)),
                           max_history_tokens=64, max_report_tokens=400)
        exs = [ds[i] for i in range(len(ds))]
        x = collate_examples(exs, tok.pad_id)
        if weight == 1.0:
            assert x.lm_weights is None and not any(ex.fact_spans for ex in exs)
            continue
        phrases_seen = 0
        for b, (e, ex) in enumerate(zip(entries, exs)):
            want = [f.expect_in_report for f in e.facts if f.kind != "distractor" and f.expect_in_report]
            w = x.lm_weights[b]
            heavy = (w == weight).nonzero()[:, 0].tolist()
            assert set(heavy) == {i for a, c in ex.fact_spans for i in range(a, c)}
            assert all(ex.n_prefix <= a < c <= len(ex.ids) for a, c in ex.fact_spans)  # report tokens only
            spelled = [tok.decode(ex.ids[a:c]).strip().lower() for a, c in ex.fact_spans]
            for ph in want:  # every phrase the report contains is weighted, and nothing else is
                assert (ph.lower() in e.report.lower()) == (ph.lower() in spelled)
                phrases_seen += ph.lower() in spelled
            assert set(spelled) <= {ph.lower() for ph in want}
            assert torch.all(w[[i for i in range(len(w)) if i not in heavy]] == 1)
        assert phrases_seen >= 3  # indication, lobectomy, contrast allergy of the example studies
        # the weighted LM loss is the weighted mean of the per-token cross-entropy
        T, V = x.ids.shape[1], tok.vocab_size
        logits = torch.randn(len(exs), T, V)
        out = type("Out", (), {"aux_loss": torch.zeros(()), "logits": logits, "copy": None})()
        lm = decoder_losses(mcfg, out, x)["lm"]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x.lm_labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
        keep = x.lm_labels[:, 1:].flatten() != -100
        wt = x.lm_weights[:, 1:].flatten()
        assert torch.allclose(lm, (ce * wt)[keep].sum() / wt[keep].sum())
        assert not torch.allclose(lm, ce[keep].mean())
    # the matcher: mid-sentence and capitalised at a line start, every occurrence, misses give nothing
    ids = tok.encode_report({"technique": "Without intravenous contrast. Again without intravenous contrast."})
    spans = fact_spans(tok, ids, ["without intravenous contrast", "known colon cancer"])
    assert len(spans) == 2
    assert [tok.decode(ids[a:c]).strip().lower() for a, c in spans] == ["without intravenous contrast"] * 2


def test_finding_sentence_spans_cover_exactly_the_sentences_that_state_a_present_finding(shared):
    """finding_sentence_spans: in encode_report's ids, the findings and impression sentences the
    labeller reads as stating a present finding (with their leading space), nothing negative,
    nothing of another section, nothing for a finding the study does not have."""
    from app.train_data import finding_sentence_spans
    from data.tokenizer import ReportTokenizer

    tok = ReportTokenizer.load(shared["tok"])
    sections = {
        "clinical_information": "Cardiomegaly on a prior radiograph.",
        "technique": "CT of the chest.",
        "findings": "Lungs and airways: The lungs are clear.\nPleura: There is a small right pleural effusion. "
                    "No pneumothorax.\nHeart and mediastinum: Cardiomegaly. No pericardial effusion.",
        "impression": "1. Cardiomegaly.\n2. Small right pleural effusion.",
    }
    ids = tok.encode_report(sections)
    spans = finding_sentence_spans(tok, sections, {"cardiomegaly", "pleural_effusion"})
    said = [tok.decode(ids[a:c]).strip() for a, c in spans]
    assert said == ["There is a small right pleural effusion.", "Cardiomegaly.", "Cardiomegaly.",
                    "Small right pleural effusion."]
    assert all(0 < a < c <= len(ids) for a, c in spans)
    assert [tok.decode(ids[a:c]).strip() for a, c in finding_sentence_spans(tok, sections, {"cardiomegaly"})] == \
        ["Cardiomegaly.", "Cardiomegaly."]
    assert finding_sentence_spans(tok, sections, set()) == []
    assert finding_sentence_spans(tok, sections, {"nodule"}) == []


def test_finding_weight_weights_the_finding_sentences_and_facts_keep_their_weight(shared, repo_root):
    """model.finding_weight: the LM loss weight is finding_weight on the report sentences that
    state one of the study's present findings, 1 elsewhere (facts keep fact_weight where both
    apply); 1 leaves the batch unweighted."""
    from app.train_data import finding_sentence_spans
    from data.tokenizer import ReportTokenizer

    tok = ReportTokenizer.load(shared["tok"])

    def batch(*overrides):
        mcfg = model_config(_cfg(shared, repo_root, *overrides), tok.vocab_size)
        ds = ReportDataset(entries, tok, mcfg, StudyCache(shared["cache"], PreprocessConfig.from_model(mcfg, audio=False)),
                           max_history_tokens=64, max_report_tokens=400)
        exs = [ds[i] for i in range(len(ds))]
        return exs, collate_examples(exs, tok.pad_id)

    entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"]
    assert any(lab.present for e in entries for lab in e.labels)
    exs, x = batch("model.finding_weight=3")
    n_heavy = 0
    for b, (e, ex) in enumerate(zip(entries, exs)):
        present = {lab.finding for lab in e.labels if lab.present}
        want = {ex.n_prefix + i for a, c in finding_sentence_spans(tok, e.sections, present) for i in range(a, c)}
        heavy = set((x.lm_weights[b] == 3.0).nonzero()[:, 0].tolist())
        assert heavy == want
        n_heavy += len(heavy)
        rest = [i for i in range(x.ids.shape[1]) if i not in heavy]
        assert torch.all(x.lm_weights[b, rest] == 1)
    assert n_heavy > 0
    assert batch()[1].lm_weights is None
    # with both weights on, a fact token keeps the fact weight
    exs2, x2 = batch("model.finding_weight=3", "model.fact_weight=5")
    for b, ex in enumerate(exs2):
        for a, c in ex.fact_spans:
            assert torch.all(x2.lm_weights[b, a:c] == 5.0)


def test_balanced_localisation_loss_weighs_each_finding_equally():
    """'balanced': per finding, mean over its positive cells + mean over its negative cells, so a
    one-cell lesion counts as much as a large one; 'weighted' lets the large one dominate."""
    from multimodal.model import token_loss

    N = 100
    tg = torch.zeros(1, N, 2)
    tg[0, :1, 0] = 1.0  # finding 0: one positive cell
    tg[0, :50, 1] = 1.0  # finding 1: fifty
    mask = torch.ones(1, N, dtype=torch.bool)
    lg = torch.zeros(1, N, 2, requires_grad=True)
    loss = token_loss(lg, tg, mask, mode="balanced")
    assert abs(loss.item() - math.log(2)) < 1e-6  # every term is BCE(0, .) = log 2
    loss.backward()
    g = lg.grad[0]
    # the one positive cell of finding 0 is pulled by 1/(2*2*1); each of finding 1's by 1/(2*2*50)
    assert torch.allclose(g[0, 0], torch.tensor(-0.5 / 4)) and torch.allclose(g[0, 1], torch.tensor(-0.5 / 200))
    # padding tokens take no part; a finding without positives adds only its negative term
    mask2 = torch.cat([mask, torch.zeros(1, 20, dtype=torch.bool)], 1)
    lg2 = torch.cat([lg.detach(), torch.full((1, 20, 2), 9.0)], 1)
    tg2 = torch.cat([tg, torch.ones(1, 20, 2)], 1)
    assert abs(token_loss(lg2, tg2, mask2, mode="balanced").item() - math.log(2)) < 1e-6
    w = token_loss(lg.detach(), tg, mask, mode="weighted")
    assert abs(w.item() - math.log(2)) < 1e-6


def test_dense_targets_pool_to_the_coarser_grids_exactly():
    """A cell of a coarser stage is the union of the finer cells it covers: max-pooling the finest
    dense targets gives exactly the targets built at the coarser grid (what dense_loss relies on)."""
    from data.datasets import Lesion

    from app.train_data import token_targets

    rng = np.random.default_rng(0)
    names = ("nodule", "mass")
    zr = np.array([[0, 4], [4, 8], [8, 12], [12, 16]])
    for _ in range(20):
        les = [Lesion(str(rng.choice(names)), [float(rng.uniform(0, 80)), float(rng.uniform(0, 128)),
                                               float(rng.uniform(0, 128))], float(rng.uniform(1, 30)))
               for _ in range(int(rng.integers(1, 4)))]
        fine = token_targets(les, zr, (5.0, 1.0, 1.0), (128, 128), 16, names).reshape(4, 16, 16, 2)
        for G in (8, 4):
            coarse = token_targets(les, zr, (5.0, 1.0, 1.0), (128, 128), G, names).reshape(4, G, G, 2)
            f = 16 // G
            pooled = fine.reshape(4, G, f, G, f, 2).max(axis=(2, 4))
            np.testing.assert_array_equal(pooled, coarse)


def test_dense_loss_trains_the_backbone_stages_and_is_off_at_inference():
    from multimodal.heads import FindingLabels
    from multimodal.model import ReportModel, StudyInputs, collate
    from multimodal.presets import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=64)
    cfg.image.output_stride = 32
    cfg.heads.dense_loss_weight = 1.0
    cfg.heads.localisation_loss = "balanced"
    m = ReportModel(cfg)
    assert len(m.heads.dense_logits) == 2
    rng = np.random.default_rng(0)
    x = collate([StudyInputs(pixels=rng.random((2, 3, 64, 64), dtype=np.float32), z_mm=np.array([0.0, 5.0]),
                             z_index_range=np.array([[0, 1], [1, 2]])),
                 StudyInputs(pixels=rng.random((1, 3, 64, 64), dtype=np.float32), z_mm=np.array([0.0]),
                             z_index_range=np.array([[0, 1]]))])
    K = len(m.finding_names)
    x.labels = FindingLabels(torch.zeros(2, K))
    G = 64 // cfg.image.stage_reduction(2)  # the finest dense grid
    x.dense_targets = torch.zeros(2, 2, G, G, K)
    x.dense_targets[0, 1, 2:4, 5:7, 3] = 1.0
    x.dense_targets[1, 1] = 1.0  # a padded slab: never scored (there is no such slab)
    out = m(x)
    assert torch.isfinite(out.losses["dense"]) and out.losses["dense"] > 0
    out.losses["dense"].backward()  # the dense loss alone: it reaches the stages it reads, not later ones
    bb = m.image_encoder.backbone
    assert m.heads.dense_logits[0].weight.grad.abs().sum() > 0 and m.heads.dense_logits[1].weight.grad.abs().sum() > 0
    assert bb.conv1.weight.grad.abs().sum() > 0 and bb.layer2[0].downsample[0].weight.grad.abs().sum() > 0
    assert bb.layer3[0].downsample[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.layer4.parameters())
    m.eval()
    with torch.no_grad():
        assert "dense" not in m(x).losses  # inference never computes the intermediate maps
    with pytest.raises(ValueError, match="localisation_loss"):
        bad = ModelConfig.preset("tiny", vocab_size=64)
        bad.heads.localisation_loss = "focal"
        ReportModel(bad)


def test_stage_lr_scale_gives_module_groups_their_own_lr():
    from app.train import make_optimizer, OptimConfig
    from multimodal.presets import ModelConfig

    cfg = load_config(preset="tiny", overrides=['stages=[{"steps": 2, "lr_scale": [["image_encoder", 3.0]]}]'])
    assert cfg.stages[0].lr_scale == (("image_encoder", 3.0),)
    m = ReportModel(ModelConfig.preset("tiny", vocab_size=64))
    opt = make_optimizer(list(m.parameters()), m, OptimConfig(), 1e-3, cfg.stages[0].lr_scale)
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    enc = {id(p) for p in m.image_encoder.parameters()}
    assert by_lr[3e-3] == enc and not (by_lr[1e-3] & enc)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] > 0  # the logged lr
    plain = make_optimizer(list(m.parameters()), m, OptimConfig(), 1e-3)
    assert len(plain.param_groups) == 2
    with pytest.raises(ConfigError, match="lr_scale"):
        load_config(preset="tiny", overrides=['stages=[{"steps": 2, "lr_scale": [["image_encoder", -1]]}]'])


def test_stage_freeze_keeps_matched_parameters_frozen():
    """stages[].freeze: prefixes left frozen although ``train`` matches them (the demo recipe keeps
    the where heads out of its first two stages and trains them alone in the third)."""
    from app.train import set_trainable
    from multimodal.presets import ModelConfig

    cfg = load_config(preset="tiny", overrides=['stages=[{"steps": 2, "train": ["heads"], "freeze": ["heads.where_"]}]'])
    assert cfg.stages[0].freeze == ("heads.where_",)
    mc = ModelConfig.preset("tiny", vocab_size=64)
    mc.heads.token_presence = mc.heads.where_from_tokens = True
    m = ReportModel(mc)
    params = {id(p) for p in set_trainable(m, cfg.stages[0].train, cfg.stages[0].freeze)}
    names = {n for n, p in m.named_parameters() if id(p) in params}
    assert names and all(n.startswith("heads.") and not n.startswith("heads.where_") for n in names)
    assert "heads.side.weight" in names and not m.heads.where_side.requires_grad
    only = {n for n, p in m.named_parameters() if id(p) in {id(q) for q in set_trainable(m, ["heads.where_"])}}
    assert only == {"heads.where_side", "heads.where_location"}


def test_dataset_builds_dense_targets_on_the_finest_stage_grid():
    from app.train_data import dense_grid
    from data.datasets import read_manifest
    from data.tokenizer import ReportTokenizer
    from multimodal.presets import ModelConfig

    from ._model import EXAMPLES

    cfg = ModelConfig.preset("tiny", vocab_size=64)
    cfg.heads.dense_loss_weight = 1.0
    cfg.heads.dense_stages = (3, 2)
    assert dense_grid(cfg) == cfg.image.image_size // cfg.image.stage_reduction(2)
    entries = [x for x in read_manifest(EXAMPLES / "manifest.jsonl") if x.lesions][:2]
    tok = ReportTokenizer.train([x.report for x in entries], vocab_size=300, min_frequency=1)
    ds = ReportDataset(entries, tok, cfg, StudyCache(None, PreprocessConfig.from_model(cfg)))
    batch = collate_examples([ds[0], ds[1]])
    G, K = dense_grid(cfg), len(cfg.heads.finding_names)
    assert batch.dense_targets.shape == (2, batch.slab_mask.shape[1], G, G, K)
    assert batch.dense_targets.sum() > 0 and batch.dense_targets[~batch.slab_mask].sum() == 0
    assert batch.token_targets is None  # the token loss is its own switch


def test_call_feature_masks_follow_what_the_training_labels_carry(shared, repo_root, tmp_path, caplog):
    """app.train_data.call_feature_masks: a finding's context carries a side / location when most
    of its present training labels do; ``medreport train`` writes them into the model's config
    when the finding context is on, so inference builds the context the decoder was trained on."""
    from types import SimpleNamespace

    from app.train_data import call_feature_masks
    from multimodal.heads import HeadsConfig

    h = HeadsConfig()
    names = h.finding_names

    def lab(finding, side=None, location=None, present=True):
        return SimpleNamespace(finding=finding, present=present, side=side, location=location, attributes={})

    entries = [SimpleNamespace(labels=[lab("cardiomegaly"), lab("nodule", "right", "right lower lobe"),
                                       lab("pleural_effusion", "left")]),
               SimpleNamespace(labels=[lab("cardiomegaly"), lab("lymphadenopathy", None, "subcarinal"),
                                       lab("pleural_effusion", "right"), lab("nodule", present=False)]),
               SimpleNamespace(labels=[lab("lymphadenopathy", "right", "right hilar")])]
    sides, locs = call_feature_masks(entries, names, h.locations)
    by = lambda m: {n for n, v in zip(names, m) if not v}  # noqa: E731
    assert by(sides) == {"cardiomegaly"}  # lymph nodes: 1 of 2 with a side reaches the 0.5 share
    assert by(locs) == {"cardiomegaly", "pleural_effusion"}  # never-present findings keep both
    assert by(call_feature_masks(entries, names, h.locations, min_share=0.75)[0]) == {"cardiomegaly", "lymphadenopathy"}
    # training fills them (finding context on), from the train split's labels
    cfg = _cfg(shared, repo_root, "stages.0.steps=1", "model.heads.finding_context=true", "model.heads.context_mode=calls")
    final = train(shared["manifest"], tmp_path / "run", cfg, progress=False)
    m = ReportModel.from_pretrained(final)
    train_entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "train"]
    assert (m.cfg.heads.call_sides, m.cfg.heads.call_locations) == call_feature_masks(train_entries, names, h.locations)
    assert len(m.cfg.heads.call_sides) == len(names)
    # a model saved before the masks existed gets them from `medreport calibrate`'s labelled studies
    import shutil

    from app.cli import main

    old = tmp_path / "old"
    shutil.copytree(final, old)
    conf = json.loads((old / "config.json").read_text())
    conf["config"]["heads"].pop("call_sides"), conf["config"]["heads"].pop("call_locations")
    (old / "config.json").write_text(json.dumps(conf))
    assert ReportModel.from_pretrained(old).cfg.heads.call_sides == ()
    assert "medreport calibrate" in caplog.text  # loading it says how to fix it
    assert main(["calibrate", "--model", str(old), "--manifest", str(shared["manifest"]),
                 "--cache-dir", str(shared["cache"]), "--max-history-tokens", "64"]) == 0
    val_entries = [e for e in load_manifest_for_training(shared["manifest"]) if e.split == "val"]
    c = ReportModel.from_pretrained(old).cfg.heads
    assert (c.call_sides, c.call_locations) == call_feature_masks(val_entries, names, h.locations)


def test_demo_model_adds_tiny_training_studies_when_asked(tmp_path):
    """``medreport demo-model --tiny-studies N`` builds N tiny studies beside the demo dataset and
    trains on both; the held-out splits stay the demo dataset's."""
    import argparse

    from app.commands.demo_model import _with_tiny_studies
    from data.datasets import ManifestEntry, read_manifest, write_manifest

    demo = tmp_path / "demo"
    (demo / "studies" / "s0").mkdir(parents=True)
    manifest = write_manifest([ManifestEntry(id="s0", split="test", study="studies/s0", report="FINDINGS:\nx", root=demo)],
                              demo / "manifest.jsonl")
    args = argparse.Namespace(dataset=demo, tiny_studies=0, tiny_seed=5, history_tokens="200:300", no_progress=True)
    assert _with_tiny_studies(args, manifest) == manifest  # not asked: the demo manifest as it is
    args.tiny_studies = 2
    mixed = read_manifest(_with_tiny_studies(args, manifest), check_files=True)
    assert [(e.id, e.split) for e in mixed] == [("s0", "test"), ("tiny-syn00000", "train"), ("tiny-syn00001", "train")]
    assert mixed[1].study_path.resolve() == (tmp_path / "demo_tiny" / "studies" / "syn00000").resolve()


def _crop_batch(B=3, S=5, H=32, G=8, K=3):
    """A batch whose pixels say where they are: channel 0 = row, 1 = column, 2 = slab index; a
    one-cell 'nodule' (finding 0) in slab 3 of study 0 and a large finding 2 in every slab."""
    rows = torch.arange(H, dtype=torch.float32)
    px = torch.zeros(B, S, 3, H, H)
    px[:, :, 0] = rows[:, None]
    px[:, :, 1] = rows[None, :]
    px[:, :, 2] = torch.arange(S, dtype=torch.float32)[None, :, None, None]
    dense = torch.zeros(B, S, G, G, K)
    dense[0, 3, 6, 1, 0] = 1
    dense[:, :, :4, :, 2] = 1
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[2, 2:] = False  # study 2 has two slabs
    dense[2, 2:] = 0
    return ModelInputs(slabs=px, slab_mask=mask,
                       z_mm=torch.arange(S, dtype=torch.float32).expand(B, S) * 10, dense_targets=dense)


def test_crop_slab_batch_cuts_windows_with_their_own_targets():
    from app.train_data import crop_slab_batch

    x = _crop_batch()
    cell = 32 // 8
    for seed in range(20):
        c = crop_slab_batch(x, 16, 3, np.random.default_rng(seed), lesion_share=0.5)
        assert c.slabs.shape == (3, 3, 3, 16, 16) and c.dense_targets.shape == (3, 3, 4, 4, 3)
        assert c.slab_mask[:2].all() and c.slab_mask[2].tolist() == [True, True, False]
        for b in range(3):
            for j in range(3):
                if not c.slab_mask[b, j]:
                    assert c.slabs[b, j].abs().sum() == 0 and c.dense_targets[b, j].sum() == 0
                    continue
                w = c.slabs[b, j]
                s, y0, x0 = int(w[2, 0, 0]), int(w[0, 0, 0]), int(w[1, 0, 0])
                assert y0 % cell == 0 and x0 % cell == 0 and x.slab_mask[b, s]  # on cell boundaries, a valid slab
                assert torch.equal(w, x.slabs[b, s, :, y0:y0 + 16, x0:x0 + 16])
                assert torch.equal(c.dense_targets[b, j], x.dense_targets[b, s, y0 // cell:y0 // cell + 4, x0 // cell:x0 // cell + 4])
                assert c.z_mm[b, j] == x.z_mm[b, s]
    # every window on a lesion: study 0's one-cell nodule is drawn as often as the large finding
    got = [crop_slab_batch(x, 16, 1, np.random.default_rng(s), lesion_share=1.0) for s in range(200)]
    nodule = sum(float(c.dense_targets[0, 0, ..., 0].sum()) > 0 for c in got)
    assert all(float(c.dense_targets[b, 0].sum()) > 0 for c in got for b in range(3))
    assert 70 <= nodule <= 130, nodule  # about half (two findings shown); uniform windows: ~1 %
    none = sum(float(crop_slab_batch(x, 16, 1, np.random.default_rng(s), 0.0).dense_targets[0, 0, ..., 0].sum()) > 0
               for s in range(200))
    assert none < 40, none
    with pytest.raises(ValueError, match="multiple of the dense cell"):
        crop_slab_batch(x, 18, 2, np.random.default_rng(0))


def test_image_crop_stage_trains_the_backbone_alone_then_the_whole_recipe(shared, repo_root, tmp_path):
    stages = json.dumps([
        {"name": "crops", "steps": 3, "train": ["image_encoder", "heads.dense_logits"], "lm": False,
         "image_crop": 32, "crop_slabs": 2, "crop_lesion_share": 1.0},
        {"name": "encoders", "steps": 1, "train": ["image_encoder", "fusion", "heads"], "lm": False},
    ])
    cfg = _cfg(shared, repo_root, f"stages={stages}", "model.heads.dense_loss_weight=1.0", "log_every=1", "optim.lr=1e-2")
    assert train(shared["manifest"], tmp_path / "run", cfg, progress=False, stop_at=1) is None
    one = ReportModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step_1").state_dict()
    assert train(shared["manifest"], tmp_path / "run", cfg, progress=False, resume=True, stop_at=3) is None
    a, b = one, ReportModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step_3").state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert any(k.startswith("image_encoder.backbone.") for k in moved)
    assert any(k.startswith("heads.dense_logits.") for k in moved)
    assert not [k for k in moved if not k.startswith(("image_encoder.backbone.", "heads.dense_logits."))]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert [r["stage"] for r in rows] == ["crops"] * 3 and all(r["loss"] == r["dense"] > 0 for r in rows)
    final = train(shared["manifest"], tmp_path / "run", cfg, progress=False, resume=True)
    assert (final / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="dense localisation loss"):
        train(shared["manifest"], tmp_path / "bad", _cfg(shared, repo_root, f"stages={stages}"), progress=False)
    bad = json.dumps([{"name": "crops", "steps": 1, "train": ["image_encoder"], "lm": False, "image_crop": 20}])
    with pytest.raises(ConfigError, match="multiple of the dense cell"):
        train(shared["manifest"], tmp_path / "bad2", _cfg(shared, repo_root, f"stages={bad}", "model.heads.dense_loss_weight=1.0"),
              progress=False)


def test_evaluation_reads_the_lobe_the_record_names(repo_root):
    """evaluate_split's studies carry where their record locates a finding (a lobectomy's lobe,
    data.finding_prompt.record_locations) and the model's calls and predicted locations take it:
    the bundled study syn00004's record names a right upper lobectomy."""
    import dataclasses

    import torch

    from app.train_data import PreprocessConfig, ReportDataset, StudyCache
    from data.datasets import read_manifest
    from data.finding_prompt import finding_prompt
    from data.tokenizer import ReportTokenizer
    from multimodal.model import ReportModel, collate
    from multimodal.presets import ModelConfig

    examples = repo_root / "examples"
    entries = {e.id: e for e in read_manifest(examples / "manifest.jsonl")}
    tok = ReportTokenizer.train([e.report for e in entries.values()], vocab_size=400, min_frequency=1)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    cfg = dataclasses.replace(cfg, finding_prompt=True)
    cfg.heads.decision_thresholds = tuple(0.0 if n == "lobectomy" else 1.0 for n in cfg.heads.finding_names)
    torch.manual_seed(0)
    model = ReportModel(cfg, tokenizer=tok).eval()
    ds = ReportDataset([entries["syn00004"], entries["syn00003"]], tok, cfg,
                       StudyCache(None, PreprocessConfig.from_model(cfg)), max_history_tokens=256)
    studies = [ds.study_inputs(e) for e in ds.entries]
    assert studies[0].record_locations == {"lobectomy": "right upper lobe"}
    assert studies[1].record_locations is None  # syn00003 has no history
    x = collate(studies)
    heads, _ = model.predict_findings(x)
    calls = model.calls(heads, x.record_locations)
    assert calls[0] == [("lobectomy", "right", "right upper lobe")]
    assert calls[1] == model.calls(heads)[1] and calls[1][0][0] == "lobectomy"  # the heads' own lobe
    _, prefixes = model.with_prompts(x, [[tok.bos_id, tok.report_id]] * 2, heads)
    line = tok.tk.encode(finding_prompt(calls[0]), add_special_tokens=False).ids
    assert prefixes[0] == [tok.bos_id, *line, tok.report_id]
    from core.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=4, eos_id=tok.eos_id, section_ids=list(tok.section_ids), pad_id=tok.pad_id)
    preds = model.generate_report(x, [[tok.bos_id, tok.report_id]] * 2, gen, evidence=False)
    assert preds[0].location["lobectomy"] == "right upper lobe"


def test_nodule_size_prompt_trains_on_labelled_sizes_with_dropout():
    """model.nodule_size_prompt: the teacher calls carry the nodule's labelled size, left out for
    the nodule_size_dropout share of draws; other findings never carry one."""
    import numpy as np

    from app.train_data import label_calls
    from data.vocab import Label

    labels = [Label("nodule", True, "right", "right lower lobe", 11.6, {}), Label("mass", True, "left", "left upper lobe", 40.0, {}),
              Label("cardiomegaly", False, None, None, None, {})]
    assert label_calls(labels) == [("nodule", "right", "right lower lobe"), ("mass", "left", "left upper lobe")]
    assert label_calls(labels, sizes=True)[0] == ("nodule", "right", "right lower lobe", 12.0)
    assert len(label_calls(labels, sizes=True)[1]) == 3
    rng = np.random.default_rng(0)
    kept = [len(label_calls(labels, True, rng, 0.25)[0]) == 4 for _ in range(400)]
    assert 0.68 < np.mean(kept) < 0.82


def test_evaluation_of_a_nodule_size_model_measures_the_studies(repo_root):
    """evaluate_split's studies for a nodule-size model carry the CT's nodule measurements
    (PreprocessConfig.run_detectors; not in training caches), and the calls pass them on."""
    import dataclasses

    import torch

    from app.train_data import PreprocessConfig, ReportDataset, StudyCache
    from data.datasets import read_manifest
    from data.detectors import read_study
    from data.study import load_study
    from data.tokenizer import ReportTokenizer
    from multimodal.model import ReportModel, collate
    from multimodal.presets import ModelConfig

    examples = repo_root / "examples"
    entries = {e.id: e for e in read_manifest(examples / "manifest.jsonl")}
    tok = ReportTokenizer.train([e.report for e in entries.values()], vocab_size=400, min_frequency=1)
    cfg = dataclasses.replace(ModelConfig.preset("tiny", vocab_size=tok.vocab_size), finding_prompt=True,
                              nodule_size_prompt=True)
    cfg.heads.decision_thresholds = tuple(0.0 if n == "nodule" else 1.0 for n in cfg.heads.finding_names)
    pre = PreprocessConfig.from_model(cfg)
    assert not pre.run_detectors  # training caches stay as they were
    pre = dataclasses.replace(pre, run_detectors=True)
    assert pre.key() != PreprocessConfig.from_model(cfg).key()
    ds = ReportDataset([entries["syn00001"]], tok, cfg, StudyCache(None, pre))
    s = ds.study_inputs(entries["syn00001"])
    expected = {k: float(v) for k, v in read_study(load_study(entries["syn00001"].study_path)).sizes_mm.items()}
    assert s.nodule_mm == expected and s.nodule_mm["right"] == 9.0
    from data.detectors import DETECTOR_FINDINGS, read_study

    ev = read_study(load_study(entries["syn00001"].study_path)).evidence  # every detector's evidence, cached as float32
    assert set(s.evidence) == set(ev) == set(DETECTOR_FINDINGS) and s.evidence == pytest.approx(ev, rel=1e-5)
    torch.manual_seed(0)
    model = ReportModel(cfg, tokenizer=tok).eval()
    x = collate([s])
    heads, _ = model.predict_findings(x)
    (call,) = model.calls(heads, None, x.nodule_mm)[0]
    side = call[1]
    assert call[0] == "nodule" and (len(call) == 4) == (side in expected or side not in ("left", "right"))
    off = dataclasses.replace(cfg, nodule_size_prompt=False)
    assert all(len(c) == 3 for c in ReportModel(off, tokenizer=tok).eval().calls(heads, None, x.nodule_mm)[0])
