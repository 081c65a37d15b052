"""ReportModel: shapes through every path, missing modalities, generation, evidence, checkpoints."""
from __future__ import annotations

import dataclasses

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.generate import GenerationConfig
from data.errors import MedreportError
from multimodal.heads import FindingLabels
from multimodal.model import CheckpointError, ModelInputs, ReportModel, StudyInputs, _check_safetensors, collate, read_config
from multimodal.presets import PRESETS, ModelConfig

V = 96


def _study(rng, n_slabs=3, audio=True, history=True, T=80):
    return StudyInputs(
        pixels=rng.random((n_slabs, 3, 64, 64), dtype=np.float32),
        z_mm=np.arange(n_slabs) * 5.0,
        z_index_range=np.stack([np.arange(n_slabs) * 2, np.arange(n_slabs) * 2 + 2], 1),
        mel=rng.standard_normal((1, 32, T)).astype(np.float32) if audio else None,
        history_ids=list(rng.integers(5, V, 30)) if history else None,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ReportModel(ModelConfig.preset("tiny", vocab_size=V)).eval()


def _with_targets(x, T=24):
    B = x.batch_size
    x.ids = torch.randint(4, V, (B, T))
    x.lm_labels = x.ids.clone()
    x.lm_labels[:, : T // 2] = -100  # history prefix is not predicted
    return x


def test_training_forward_backward(model):
    rng = np.random.default_rng(0)
    m = ReportModel(ModelConfig.preset("tiny", vocab_size=V))
    x = _with_targets(collate([_study(rng), _study(rng, n_slabs=1, audio=False, T=50)]))
    K = len(m.finding_names)
    x.labels = FindingLabels(torch.randint(0, 2, (2, K)).float())
    out = m(x)
    assert out.logits_from == 11 and out.logits_BTV.shape == (2, 24 - 11, V)  # from the position before the first target
    assert out.heads.presence_logits_BK.shape == (2, K)
    assert out.gates_BM.shape == (2, 3)
    for k in ("loss", "lm", "heads", "aux"):
        assert torch.isfinite(out.losses[k]), k
    out.loss.backward()
    for name in ("image_encoder.backbone.conv1.weight", "audio_encoder.backbone.conv1.weight",
                 "fusion.pool_queries", "decoder.tok_embeddings.weight", "heads.presence.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


@pytest.mark.parametrize("audio,history,n_slabs", [
    (True, True, 3), (False, True, 3), (True, False, 3), (False, False, 3),
    (False, False, 1),  # radiograph only
    (True, True, 1),
])
def test_missing_modality_combinations(model, audio, history, n_slabs):
    rng = np.random.default_rng(1)
    x = collate([_study(rng, n_slabs, audio, history)])
    heads, gates = model.predict_findings(x)
    assert torch.isfinite(heads.presence_logits_BK).all()
    assert (gates[0, 1] > 0) == audio and (gates[0, 2] > 0) == history and gates[0, 0] > 0
    torch.testing.assert_close(gates.sum(1), torch.ones(1))


def test_mixed_batch_matches_single_studies(model):
    rng = np.random.default_rng(2)
    a, b = _study(rng, 3, True, True), _study(rng, 1, False, False, T=40)
    batch, _ = model.predict_findings(collate([a, b]))
    sa, _ = model.predict_findings(collate([a]))
    sb, _ = model.predict_findings(collate([b]))
    torch.testing.assert_close(batch.presence_logits_BK[0], sa.presence_logits_BK[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.presence_logits_BK[1], sb.presence_logits_BK[0], atol=1e-4, rtol=1e-4)


def test_generate_report_with_evidence(model):
    rng = np.random.default_rng(3)
    x = collate([_study(rng), _study(rng, 2, audio=False)])
    preds = model.generate_report(x, [[1, 5, 6, 2], [1, 2]], GenerationConfig(max_new_tokens=6, eos_id=3),
                                  evidence_findings=["nodule", "pleural_effusion"])
    assert len(preds) == 2
    p = preds[0]
    assert 1 <= len(p.token_ids) <= 6
    assert set(p.finding_probs) == set(model.finding_names)
    assert all(0 < v < 1 for v in p.finding_probs.values())
    assert abs(sum(p.side_probs["nodule"].values()) - 1) < 1e-5
    assert set(p.gates) == {"image", "audio", "history"} and preds[1].gates["audio"] == 0
    ev = p.evidence["nodule"]
    assert ev.heatmap_SHW.shape == (3, 64, 64) and ev.heatmap_SHW.dtype == np.float32
    assert 0 <= ev.heatmap_SHW.min() and ev.heatmap_SHW.max() <= 1
    assert preds[1].evidence["nodule"].heatmap_SHW[2:].max() == 0  # padded slab stays cold
    for s, z in zip(ev.key_slabs, ev.key_slices):
        lo, hi = x.z_index_range[0, s].tolist()
        assert lo <= z < hi
    assert not any(prm.grad is not None for prm in model.parameters())  # evidence never touches .grad


def test_sentence_evidence(model):
    rng = np.random.default_rng(4)
    x = collate([_study(rng)])
    ids = [1, 5, 6, 2, 10, 11, 12, 13, 14, 15]
    ev = model.sentence_evidence(x, ids, [(4, 7), (7, 10)])
    assert len(ev) == 2 and ev[0].heatmap_SHW.shape == (3, 64, 64)
    assert not np.allclose(ev[0].heatmap_SHW, ev[1].heatmap_SHW)


def test_save_load_identical_outputs(model, tmp_path, caplog):
    rng = np.random.default_rng(5)
    model.heads.temperature.fill_(1.7)
    x = _with_targets(collate([_study(rng), _study(rng, 1, False, True)]))
    d = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    with caplog.at_level(logging.WARNING):
        loaded = ReportModel.from_pretrained(d)
    assert "lacks" not in caplog.text and "unexpected" not in caplog.text
    with torch.inference_mode():
        o1, o2 = model(x), loaded(x)
    torch.testing.assert_close(o1.logits_BTV, o2.logits_BTV, rtol=0, atol=0)
    torch.testing.assert_close(o1.heads.presence_probs, o2.heads.presence_probs, rtol=0, atol=0)
    assert float(loaded.heads.temperature) == pytest.approx(1.7)
    assert loaded.finding_names == model.finding_names  # self-describing
    model.heads.temperature.fill_(1.0)


def test_tokenizer_saved_loaded_and_used_for_prefixes(tmp_path):
    from data.tokenizer import ReportTokenizer

    texts = ["no focal consolidation. small left pleural effusion.", "history of smoking and cough"] * 20
    tok = ReportTokenizer.train(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    m = ReportModel(ModelConfig.preset("tiny", vocab_size=tok.vocab_size), tokenizer=tok).eval()
    d = m.save_pretrained(tmp_path / "m")
    loaded = ReportModel.from_pretrained(d)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == tok.vocab_size
    assert loaded.tokenizer.encode("pleural effusion") == tok.encode("pleural effusion")
    rng = np.random.default_rng(6)
    st = _study(rng, history=False)
    st.history_ids = tok.encode("history of cough")
    x = collate([st])
    gen = GenerationConfig(max_new_tokens=8, eos_id=tok.eos_id, section_ids=list(tok.section_ids), pad_id=tok.pad_id)
    p1 = m.generate_report(x, None, gen, evidence=False)[0]  # prefix built from the tokenizer
    p2 = m.generate_report(x, [[tok.bos_id] + list(st.history_ids) + [tok.report_id]], gen, evidence=False)[0]
    assert p1.token_ids == p2.token_ids and len(p1.token_ids) > 0
    assert p1.evidence == {}


def test_missing_and_unexpected_keys_are_logged(model, tmp_path, caplog):
    from safetensors.torch import load_file
    d = model.save_pretrained(tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    sd.pop("heads.presence.bias")
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "medreport-model", "format_version": "1"})
    with caplog.at_level(logging.WARNING):
        ReportModel.from_pretrained(d)
    assert "heads.presence.bias" in caplog.text and "extra.weight" in caplog.text


def test_checkpoint_refusals(model, tmp_path):
    d = model.save_pretrained(tmp_path / "m")
    w = d / "model.safetensors"
    good = w.read_bytes()
    with pytest.raises(CheckpointError, match="not found"):
        ReportModel.from_pretrained(tmp_path / "nope")
    # a pickle / torch.save zip under the right name
    torch.save({"x": torch.zeros(1)}, str(w))
    with pytest.raises(CheckpointError, match="pickled"):
        ReportModel.from_pretrained(d)
    w.write_bytes(b"\x80\x04\x95 pickle bytes")
    with pytest.raises(CheckpointError, match="pickled"):
        ReportModel.from_pretrained(d)
    # a valid checkpoint whose header length starts with the byte 0x80 (the pickle opcode) loads
    for pad in range(400):
        save_file({"a": torch.zeros(1)}, str(w), metadata={"format": "medreport-model", "pad": "x" * pad})
        if w.read_bytes()[:1] == b"\x80":
            break
    assert w.read_bytes()[:1] == b"\x80"
    _check_safetensors(w)  # no error: it is safetensors, and ours (the shipped session 10 model hit this)
    w.write_bytes(good)
    torch.testing.assert_close(ReportModel.from_pretrained(d).heads.presence.bias, model.heads.presence.bias)
    w.write_bytes(b"garbage that is no safetensors header at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        ReportModel.from_pretrained(d)
    w.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError):
        ReportModel.from_pretrained(d)
    save_file({"a": torch.zeros(1)}, str(w))  # safetensors, but not ours
    with pytest.raises(CheckpointError, match="not a medreport model"):
        ReportModel.from_pretrained(d)
    w.write_bytes(good)
    cfg = d / "config.json"
    text = cfg.read_text()
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ReportModel.from_pretrained(d)
    cfg.write_text(json.dumps({"format": "something-else", "config": {}}))
    with pytest.raises(CheckpointError, match="not a medreport model config"):
        read_config(d)
    meta = json.loads(text)
    meta["config"]["fusion"]["dim"] = 32  # config disagrees with the weights
    cfg.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do(es)? not match"):
        ReportModel.from_pretrained(d)
    assert issubclass(CheckpointError, MedreportError)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_configs_roundtrip(name):
    cfg = ModelConfig.preset(name, vocab_size=500)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.decoder.d_model > 0 and cfg.heads.num_findings > 0


def test_unknown_preset():
    with pytest.raises(KeyError, match="tiny"):
        ModelConfig.preset("huge")


def test_finding_context_tokens_reach_the_decoder():
    """heads.finding_context: the decoder reads K extra tokens made from the heads' predictions,
    so changing a finding's presence logit changes the report logits (and nothing flows back
    into the heads from the LM loss)."""
    from multimodal.heads import HeadsOutput

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    cfg.heads.finding_context = True
    m = ReportModel(cfg).eval()
    rng = np.random.default_rng(7)
    x = _with_targets(collate([_study(rng)]))
    enc = m.encode(x)
    heads = m.heads(enc.fused_BFD, enc.mask_BF)
    K = len(m.finding_names)
    ctx, cmask = m.decoder_context(enc.fused_BFD, enc.mask_BF, heads)
    assert ctx.shape == (1, enc.fused_BFD.shape[1] + K, enc.fused_BFD.shape[2]) and cmask.all()
    base = m.decoder(x.ids, ctx, cmask).logits
    k = m.finding_names.index("nodule")
    logits = heads.presence_logits_BK.clone()
    logits[0, k] = logits[0, k] + 8.0  # the heads now say "nodule"
    flipped = HeadsOutput(logits, heads.side_logits_BK4, heads.location_logits_BKL)
    other = m.decoder(x.ids, *m.decoder_context(enc.fused_BFD, enc.mask_BF, flipped)).logits
    assert (other - base).abs().max() > 1e-4
    # training: the LM loss does not reach the presence head through the context tokens
    m.train()
    x.labels = None
    out = m(x)
    out.losses["lm"].backward()
    assert m.heads.presence.weight.grad is None or m.heads.presence.weight.grad.abs().sum() == 0
    assert m.heads.context_proj.weight.grad.abs().sum() > 0
    # generation and save/load carry the option
    preds = m.generate_report(collate([_study(rng)]), [[1, 5, 2]], GenerationConfig(max_new_tokens=4, eos_id=3),
                              evidence=False)
    assert 1 <= len(preds[0].token_ids) <= 4


def test_finding_context_off_by_default_keeps_context():
    m = ReportModel(ModelConfig.preset("tiny", vocab_size=V)).eval()
    rng = np.random.default_rng(8)
    enc = m.encode(collate([_study(rng)]))
    heads = m.heads(enc.fused_BFD, enc.mask_BF)
    ctx, mask = m.decoder_context(enc.fused_BFD, enc.mask_BF, heads)
    assert ctx is enc.fused_BFD and mask is enc.mask_BF


def test_image_blind_model_ignores_images_and_audio(tmp_path):
    """use_image / use_audio False (the image-blind baseline): outputs do not depend on them,
    and the setting survives save/load."""
    torch.manual_seed(0)
    m = ReportModel(ModelConfig.preset("tiny", vocab_size=V, use_image=False, use_audio=False)).eval()
    rng = np.random.default_rng(9)
    a = _study(rng)
    b = StudyInputs(pixels=rng.random(a.pixels.shape, dtype=np.float32), z_mm=a.z_mm, z_index_range=a.z_index_range,
                    mel=rng.standard_normal(a.mel.shape).astype(np.float32), history_ids=a.history_ids)
    ha, ga = m.predict_findings(collate([a]))
    hb, _ = m.predict_findings(collate([b]))
    torch.testing.assert_close(ha.presence_logits_BK, hb.presence_logits_BK)
    assert ga[0, 0] == 0 and ga[0, 1] == 0 and ga[0, 2] > 0
    m.save_pretrained(tmp_path / "blind")
    m2 = ReportModel.from_pretrained(tmp_path / "blind")
    assert not m2.cfg.use_image and not m2.cfg.use_audio
    seeing = ReportModel(ModelConfig.preset("tiny", vocab_size=V)).eval()
    sa, _ = seeing.predict_findings(collate([a]))
    sb, _ = seeing.predict_findings(collate([b]))
    assert not torch.allclose(sa.presence_logits_BK, sb.presence_logits_BK)


def test_model_with_image_max_token_trains_and_generates():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    cfg.fusion.image_max_token = True
    m = ReportModel(cfg)
    rng = np.random.default_rng(11)
    x = _with_targets(collate([_study(rng), _study(rng, 2, audio=False)]))
    x.labels = FindingLabels(torch.randint(0, 2, (2, len(m.finding_names))).float())
    out = m(x)
    out.loss.backward()
    assert m.fusion.image_skip[1].weight.grad.abs().sum() > 0
    preds = m.eval().generate_report(collate([_study(rng)]), [[1, 5, 2]], GenerationConfig(max_new_tokens=4, eos_id=3),
                                     evidence_findings=["nodule"])
    assert 1 <= len(preds[0].token_ids) <= 4 and "nodule" in preds[0].evidence


def test_model_with_token_presence_learns_an_image_only_finding():
    """A finding visible only in the image (a bright square in one slab) is learned through the
    token path: the presence logits of image-bearing studies separate within a few steps."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    cfg.heads.token_presence = True
    m = ReportModel(cfg)
    rng = np.random.default_rng(3)
    neg = _study(rng)
    pos = dataclasses.replace(neg, pixels=neg.pixels.copy())  # same history and dictation
    pos.pixels[0, :, 8:24, 8:24] = 3.0  # the lesion
    K = len(m.finding_names)
    x = collate([pos, neg])
    x.labels = FindingLabels(torch.tensor([[1.0] + [0.0] * (K - 1), [0.0] * K]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(30):
        out = m(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert m.heads.token_logits.weight.grad.abs().sum() > 0
    heads, _ = m.predict_findings(x)
    p = heads.presence_probs[:, 0]
    assert p[0] > 0.7 and p[1] < 0.3
    with torch.no_grad():
        pooled = m.heads.pooled_token_logits(*m.eval().encode(x).image_tokens)[:, 0]
    assert pooled[0] > pooled[1] + 1.0  # the separation is carried by the image-token path


def test_finding_context_calls_mode_reads_calls_and_teacher_labels():
    """heads.context_mode "calls": the context encodes the calls at the operating points (a
    probability just under its threshold reads as absent, just over as present, whatever its
    exact value), one-hot side and location where present; in training with context_teacher 1
    it is built from the labels instead, and never in eval mode."""
    from multimodal.heads import SIDES, FindingLabels, HeadsOutput

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    cfg.heads.finding_context, cfg.heads.context_mode = True, "calls"
    K, L = cfg.heads.num_findings, len(cfg.heads.locations)
    cfg.heads.decision_thresholds = (0.3,) * K
    m = ReportModel(cfg).eval()
    k = m.finding_names.index("nodule")

    def heads_with(p):
        logits = torch.full((1, K), -6.0)
        logits[0, k] = float(np.log(p / (1 - p)))
        side = torch.zeros(1, K, len(SIDES))
        side[0, k, 2] = 5.0
        loc = torch.zeros(1, K, L)
        loc[0, k, 3] = 5.0
        return HeadsOutput(logits, side, loc)

    f_over, f_over2, f_under = (m.heads.call_features(heads_with(p)) for p in (0.31, 0.9, 0.29))
    torch.testing.assert_close(f_over, f_over2)  # same call, same context
    assert f_over[0, k, 0] == 1 and f_under[0, k].abs().sum() == 0
    assert f_over[0, k, 1 + 2] == 1 and f_over[0, k, 1 + len(SIDES) + 3] == 1 and f_over[0, k].sum() == 3
    assert f_over[0, :k].abs().sum() == 0  # the other findings are called absent
    labels = FindingLabels(torch.zeros(1, K), torch.full((1, K), -100), torch.full((1, K), -100))
    labels.present_BK[0, k], labels.side_BK[0, k], labels.location_BK[0, k] = 1.0, 2, 3
    torch.testing.assert_close(m.heads.label_features(labels), f_over)
    # teacher forcing: in training the context follows the labels, not the heads
    cfg.heads.context_teacher = 1.0
    fused, mask = torch.randn(1, 5, cfg.decoder.d_model), torch.ones(1, 5, dtype=torch.bool)
    labels.present_BK[0, k] = 0.0  # labels say absent, heads say present
    eval_ctx, _ = m.decoder_context(fused, mask, heads_with(0.9), labels)
    m.train()
    teach_ctx, _ = m.decoder_context(fused, mask, heads_with(0.9), labels)
    absent_ctx, _ = m.decoder_context(fused, mask, heads_with(0.1), labels)
    torch.testing.assert_close(teach_ctx, absent_ctx)
    assert (teach_ctx - eval_ctx).abs().max() > 1e-4
    # share 0: training reads the heads' calls too
    cfg.heads.context_teacher = 0.0
    calls_ctx, _ = m.decoder_context(fused, mask, heads_with(0.9), labels)
    torch.testing.assert_close(calls_ctx, eval_ctx)
    cfg.heads.context_mode = "logits"
    with pytest.raises(ValueError, match="context_mode"):
        m.decoder_context(fused, mask, heads_with(0.9), labels)


def test_call_features_match_the_label_features_of_findings_without_a_side_or_location():
    """heads.call_sides / call_locations: a finding whose training labels carry no side
    (cardiomegaly) or no location (pleural effusion) is trained on a context with zeros there, so
    its call at inference must read the same, whatever the side and location heads argmax to.
    Without the masks the called context differs from every context seen in training (session 15:
    the decoder then ignored a called cardiomegaly)."""
    from multimodal.heads import SIDES, FindingLabels, HeadsOutput

    cfg = ModelConfig.preset("tiny", vocab_size=64)
    cfg.heads.finding_context, cfg.heads.context_mode = True, "calls"
    names = cfg.heads.finding_names
    K, L = len(names), len(cfg.heads.locations)
    m = ReportModel(cfg).eval()
    card, eff, nod = (names.index(n) for n in ("cardiomegaly", "pleural_effusion", "nodule"))
    logits = torch.full((1, K), -6.0)
    logits[0, [card, eff, nod]] = 6.0  # all three called present
    side = torch.zeros(1, K, len(SIDES))
    side[..., 1] = 5.0
    loc = torch.zeros(1, K, L)
    loc[..., 2] = 5.0
    heads = HeadsOutput(logits, side, loc)
    labels = FindingLabels(torch.zeros(1, K), torch.full((1, K), -100), torch.full((1, K), -100))
    labels.present_BK[0, [card, eff, nod]] = 1.0
    labels.side_BK[0, [eff, nod]] = 1  # the effusion has a side, no location; the nodule both
    labels.location_BK[0, nod] = 2
    # without the masks (older models): the calls carry a side and a location for every finding
    unmasked = m.heads.call_features(heads)
    assert unmasked[0, card, 1:].sum() == 2 and m.heads.label_features(labels)[0, card, 1:].sum() == 0
    sides, locs = [True] * K, [True] * K
    sides[card] = locs[card] = locs[eff] = False
    cfg.heads.call_sides, cfg.heads.call_locations = tuple(sides), tuple(locs)
    torch.testing.assert_close(m.heads.call_features(heads), m.heads.label_features(labels))
    assert m.heads.call_features(heads)[0, nod].sum() == 3  # presence, side and location kept
    cfg.heads.call_sides = (True,) * (K - 1)
    with pytest.raises(ValueError, match="call_sides"):
        m.heads.call_features(heads)


def test_context_dropout_leaves_the_decoder_only_the_finding_tokens_in_training():
    """model.context_dropout: in training that share of studies has its fused tokens masked out of
    the decoder's cross-attention (the finding-context tokens stay), so its text must come from
    the calls; at inference, and at share 0, the context is untouched."""
    from multimodal.heads import SIDES, FindingLabels, HeadsOutput

    V = 64
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    cfg.heads.finding_context, cfg.heads.context_mode, cfg.heads.context_teacher = True, "calls", 1.0
    K = cfg.heads.num_findings
    m = ReportModel(cfg)
    B, F = 64, 5
    fused, mask = torch.randn(B, F, cfg.decoder.d_model), torch.ones(B, F, dtype=torch.bool)
    heads = HeadsOutput(torch.zeros(B, K), torch.zeros(B, K, len(SIDES)), torch.zeros(B, K, len(cfg.heads.locations)))
    labels = FindingLabels(torch.zeros(B, K), torch.full((B, K), -100), torch.full((B, K), -100))

    def ctx_mask(p, train):
        cfg.context_dropout = p
        m.train(train)
        torch.manual_seed(0)
        return m.decoder_context(fused, mask, heads, labels)[1]

    assert ctx_mask(0.0, True).all() and ctx_mask(1.0, False).all()  # off, or at inference
    full = ctx_mask(1.0, True)
    assert not full[:, :F].any() and full[:, F:].all()  # only the K finding tokens remain
    half = ctx_mask(0.5, True)
    dropped = ~half[:, :F].any(1)
    assert (half[:, :F].all(1) | dropped).all()  # a study keeps all its fused tokens or none
    assert 16 < int(dropped.sum()) < 48 and half[:, F:].all()
    # what the decoder reads: with every study dropped, the fused tokens no longer matter
    cfg.context_dropout = 1.0
    m.train()
    ids = torch.randint(4, V, (2, 12))
    h2 = HeadsOutput(heads.presence_logits_BK[:2], heads.side_logits_BK4[:2], heads.location_logits_BKL[:2])
    l2 = FindingLabels(labels.present_BK[:2], labels.side_BK[:2], labels.location_BK[:2])
    out = [m.decoder(ids, *m.decoder_context(f, mask[:2], h2, l2)).logits
           for f in (fused[:2], torch.randn(2, F, cfg.decoder.d_model))]
    torch.testing.assert_close(out[0], out[1])
    cfg.context_dropout = 0.0
    out0 = [m.decoder(ids, *m.decoder_context(f, mask[:2], h2, l2)).logits
            for f in (fused[:2], torch.randn(2, F, cfg.decoder.d_model))]
    assert (out0[0] - out0[1]).abs().max() > 1e-4  # the test can fail: without it they matter


def _cardiomegaly_prompt_model(monkeypatch):
    """A tiny finding-prompt model with the copy head whose heads call only cardiomegaly, and a
    spy in place of generate -> (model, tokenizer, what generate was given: prefixes, spans,
    vetoes, guidance)."""
    import multimodal.model as mm
    from data.tokenizer import ReportTokenizer

    tok = ReportTokenizer.train(["Calls: right lower lobe nodule; cardiomegaly; none.", "FINDINGS: normal."] * 3,
                                vocab_size=200, min_frequency=1)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, finding_prompt=True)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, copy=True))
    k = cfg.heads.finding_names.index("cardiomegaly")
    cfg.heads.decision_thresholds = tuple(1e-9 if i == k else 1.0 for i in range(cfg.heads.num_findings))
    m = ReportModel(cfg, tokenizer=tok).eval()
    seen = {}

    def spy(decoder, prefixes, ctx, cmask, gen, copy_spans=None, vetoes=None, guidance=None, rerank=None):
        seen.update(prefixes=prefixes, spans=copy_spans, vetoes=vetoes, guidance=guidance, rerank=rerank)
        return [[tok.eos_id] for _ in prefixes]

    monkeypatch.setattr(mm, "generate", spy)
    return m, tok, seen


def test_finding_prompt_from_the_heads_calls_goes_before_report(monkeypatch):
    """cfg.finding_prompt: generate_report writes the heads' calls as text between the history
    and [REPORT] (a copy source with the digest); what a finding's call is follows its operating
    point (only cardiomegaly's lets the heads call it)."""
    from data.finding_prompt import finding_prompt

    m, tok, seen = _cardiomegaly_prompt_model(monkeypatch)
    rng = np.random.default_rng(3)
    x = collate([_study(rng), _study(rng, history=False)])
    hist = [x.history_ids[0][x.history_mask[0]].tolist(), []]
    prefixes = [[tok.bos_id, *h, tok.report_id] for h in hist]
    m.generate_report(x, prefixes, GenerationConfig(max_new_tokens=2, eos_id=tok.eos_id), evidence=False)
    prompt = tok.tk.encode(finding_prompt([("cardiomegaly", "none", "unspecified")]), add_special_tokens=False).ids
    for b, h in enumerate(hist):
        assert seen["prefixes"][b] == [tok.bos_id, *h, *prompt, tok.report_id]
        assert seen["spans"][b] == (1 + len(h), 1 + len(h) + len(prompt))  # no digest: the prompt alone
    assert seen["vetoes"] is None
    # vetoes_for: one veto per study, made from the names the heads call (here cardiomegaly)
    m.generate_report(x, prefixes, GenerationConfig(max_new_tokens=2, eos_id=tok.eos_id), evidence=False,
                      vetoes_for=lambda names: ("veto", tuple(names)))
    assert seen["vetoes"] == [("veto", ("cardiomegaly",))] * 2
    assert seen["rerank"] is None
    # rerank_for (MBR): one score per study, made from its index and the names the heads call
    m.generate_report(x, prefixes, GenerationConfig(max_new_tokens=2, eos_id=tok.eos_id), evidence=False,
                      rerank_for=lambda b, names: ("score", b, tuple(names)))
    assert seen["rerank"] == [("score", 0, ("cardiomegaly",)), ("score", 1, ("cardiomegaly",))]
    assert tok.decode(prompt).strip() == "Calls: cardiomegaly."


def _digest_model(nd=4):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=V)
    cfg = dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, n_digest_tokens=nd))
    return ReportModel(cfg).eval()


def _with_digest(rng, record_len, digest):
    s = _study(rng)
    s.history_ids = list(rng.integers(5, V, record_len)) + list(digest)
    s.digest_len = len(digest)
    return s


def test_digest_tokens_pooled_apart_from_the_record():
    """fusion.n_digest_tokens: the digest's tokens do not depend on how long the record before it
    is (training cap against the whole record at inference), and the fused tokens read them."""
    m = _digest_model(nd=4)
    n_rec = m.cfg.fusion.n_history_tokens
    rng = np.random.default_rng(3)
    digest = list(rng.integers(5, V, 12))
    x = collate([_with_digest(rng, 24, digest), _with_digest(rng, 400, digest), _study(rng, history=False)])
    toks, mask = m.history_tokens(x)
    assert toks.shape == (3, n_rec + 4, m.cfg.decoder.d_model) and mask.shape == (3, n_rec + 4)
    torch.testing.assert_close(toks[0, n_rec:], toks[1, n_rec:])  # same digest, records 24 vs 400 tokens
    assert mask[:2].all() and not mask[2].any()
    # The record's blocks do not contain the digest: each is the mean of its record tokens only.
    emb = m.decoder.tok_embeddings(x.history_ids[0, :24])  # 8 blocks of 3 record tokens
    torch.testing.assert_close(toks[0, :n_rec], emb.reshape(n_rec, 3, -1).mean(1))
    # The digest reaches the fused tokens: same image, audio and record, another digest.
    other = list(rng.integers(5, V, 12))
    y = collate([_with_digest(np.random.default_rng(9), 20, digest), _with_digest(np.random.default_rng(9), 20, other)])
    y.slabs[1] = y.slabs[0]
    with torch.no_grad():
        enc = m.encode(y)
    assert not torch.allclose(enc.fused_BFD[0], enc.fused_BFD[1])


def test_digest_tokens_off_is_the_plain_summary():
    """Without n_digest_tokens the whole history (digest included) is block-pooled, as before."""
    m = _digest_model(nd=0)
    rng = np.random.default_rng(4)
    x = collate([_with_digest(rng, 40, list(rng.integers(5, V, 8)))])
    toks, mask = m.history_tokens(x)
    ref, ref_m = m.history_summary(m.decoder.tok_embeddings(x.history_ids), x.history_mask)
    torch.testing.assert_close(toks, ref)
    assert torch.equal(mask, ref_m)


def test_calls_guidance_twin_reads_no_calls(monkeypatch):
    """calls_guidance > 0: generate_report hands generate a Guidance twin per study: the same
    history with the prompt "Calls: none." (its own copy span), the heads' output with nothing
    called (model.no_calls), starting at the Findings marker, at the given weight."""
    from core.generate import Guidance
    from data.finding_prompt import finding_prompt
    from data.report_format import SECTION_KEYS

    m, tok, seen = _cardiomegaly_prompt_model(monkeypatch)
    x = collate([_study(np.random.default_rng(3))])
    h = x.history_ids[0][x.history_mask[0]].tolist()
    gen = GenerationConfig(max_new_tokens=2, eos_id=tok.eos_id, section_ids=list(tok.section_ids))
    m.generate_report(x, [[tok.bos_id, *h, tok.report_id]], gen, evidence=False)
    assert seen["guidance"] is None  # off by default
    m.generate_report(x, [[tok.bos_id, *h, tok.report_id]], gen, evidence=False, calls_guidance=0.7)
    g = seen["guidance"]
    none = tok.tk.encode(finding_prompt([]), add_special_tokens=False).ids
    called = tok.tk.encode(finding_prompt([("cardiomegaly", "none", "unspecified")]), add_special_tokens=False).ids
    assert isinstance(g, Guidance) and g.weight == 0.7
    assert seen["prefixes"] == [[tok.bos_id, *h, *called, tok.report_id]]
    assert g.prefixes == [[tok.bos_id, *h, *none, tok.report_id]]
    assert g.copy_spans == [(1 + len(h), 1 + len(h) + len(none))]
    assert g.start_ids == (tok.section_ids[SECTION_KEYS.index("findings")],)
    heads = m.predict_findings(x)[0]
    assert [c[0] for c in m.calls(heads)[0]] == ["cardiomegaly"] and m.calls(m.no_calls(heads)) == [[]]


@pytest.mark.parametrize("weighted", [False, True])
def test_logits_from_the_first_target_leave_losses_and_gradients_as_they_were(weighted):
    """Training computes the vocabulary logits and the copy mixture only from the position before
    the first target (lm_start): the LM and copy losses and every gradient equal those of the whole
    sequence's logits."""
    import dataclasses

    from multimodal.model import decoder_losses, lm_start

    torch.manual_seed(0)
    from core.decoder import DecoderConfig

    cfg = ModelConfig.preset("tiny", vocab_size=V, decoder=DecoderConfig.preset("tiny", vocab_size=V, copy=True),
                             copy_weight=0.5, copy_ngram=2)
    m = ReportModel(cfg)
    B, T = 3, 40
    ids = torch.randint(4, V, (B, T))
    ids[:, 22:30] = ids[:, 5:13]  # the report repeats a stretch of the history: something to copy
    labels = ids.clone()
    labels[:, :20] = -100
    labels[1, :24] = -100  # rows start their reports at different places
    copy_mask = torch.zeros(B, T, dtype=torch.bool)
    copy_mask[:, 3:18] = True
    x = ModelInputs(torch.zeros(B, 1, 1, 8, 8), torch.ones(B, 1, dtype=torch.bool), torch.zeros(B, 1),
                    ids=ids, lm_labels=labels, copy_mask=copy_mask)
    if weighted:
        x = dataclasses.replace(x, lm_weights=torch.rand(B, T) + 0.5)
    ctx = torch.randn(B, 5, cfg.decoder.d_model)
    assert lm_start(x) == 19

    def run(start):
        m.zero_grad()
        out = m.decoder(ids, ctx, copy_mask_BT=copy_mask, logits_from=start)
        dl = decoder_losses(cfg, out, x, m.decoder.copy_canon())
        dl["weighted"].backward()
        grads = {n: p.grad.clone() for n, p in m.decoder.named_parameters() if p.grad is not None}
        return {k: float(v) for k, v in dl.items()}, grads, out

    full, g_full, o_full = run(0)
    part, g_part, o_part = run(lm_start(x))
    assert o_part.logits.shape[1] == T - 19 and o_full.logits.shape[1] == T
    assert set(full) == set(part) and "copy" in full
    for k in full:
        assert part[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k
    assert set(g_full) == set(g_part)
    for n in g_full:
        torch.testing.assert_close(g_part[n], g_full[n], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(o_part.logits, o_full.logits[:, 19:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_from"):
        m.decoder(ids, ctx, logits_from=T)
