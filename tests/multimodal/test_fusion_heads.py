"""Fusion (missing-modality combinations, gates, bounded history) and finding heads / calibration."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from multimodal.fusion import MODALITIES, Fusion, FusionConfig, HistorySummary
from multimodal.heads import (FindingHeads, FindingLabels, HeadsConfig, coarse_location,
                              expected_calibration_error, fit_temperature, heads_loss, labels_to_targets)

D_IMG, D_AUD, D_HIST, D_OUT = 32, 24, 16, 40


@pytest.fixture(scope="module")
def fusion():
    torch.manual_seed(0)
    return Fusion(FusionConfig.preset("tiny"), D_IMG, D_AUD, D_HIST, D_OUT).eval()


def _mods(B, img, aud, hist, seed=0):
    g = torch.Generator().manual_seed(seed)
    def one(n, d, present):
        return torch.randn(B, n, d, generator=g), torch.full((B, n), present, dtype=torch.bool)
    return one(12, D_IMG, img), one(5, D_AUD, aud), one(8, D_HIST, hist)


@pytest.mark.parametrize("img,aud,hist", list(itertools.product([True, False], repeat=3)))
def test_every_missing_modality_combination(fusion, img, aud, hist):
    fused, mask, gates = fusion(*_mods(2, img, aud, hist))
    assert fused.shape == (2, fusion.cfg.n_fused, D_OUT) and mask.shape == (2, fusion.cfg.n_fused)
    assert torch.isfinite(fused).all() and mask.all()
    present = torch.tensor([img, aud, hist])
    assert torch.all(gates[:, ~present] == 0)  # absent modality: gate exactly 0
    if present.any():
        torch.testing.assert_close(gates.sum(1), torch.ones(2))  # present ones renormalise
    else:
        assert torch.all(gates == 0)


def test_absent_modality_content_is_ignored(fusion):
    """With audio masked, changing the (masked) audio values changes nothing."""
    img, aud, hist = _mods(2, True, False, True)
    out1, _, _ = fusion(img, aud, hist)
    aud2 = (aud[0] * 100 + 3, aud[1])
    out2, _, _ = fusion(img, aud2, hist)
    torch.testing.assert_close(out1, out2)


def test_partial_audio_in_batch_and_gates_per_study(fusion):
    img, (at, am), hist = _mods(2, True, True, True)
    am = am.clone()
    am[1] = False  # second study has no dictation
    _, _, gates = fusion(img, (at, am), hist)
    assert gates[0, MODALITIES.index("audio")] > 0 and gates[1, MODALITIES.index("audio")] == 0


def test_fusion_backward_reaches_every_input(fusion):
    f = Fusion(FusionConfig.preset("tiny"), D_IMG, D_AUD, D_HIST, D_OUT)
    (it, im), (at, am), (ht, hm) = _mods(2, True, True, True)
    for t in (it, at, ht):
        t.requires_grad_(True)
    fused, _, gates = f((it, im), (at, am), (ht, hm))
    (fused.sum() + gates.sum()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (it, at, ht))


def test_history_summary_is_bounded_and_exact():
    hs = HistorySummary(4)
    emb = torch.arange(10, dtype=torch.float32)[None, :, None].repeat(2, 1, 3)  # token i has value i
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    s, m = hs(emb, mask)
    assert s.shape == (2, 4, 3) and m.all()
    # 10 tokens in 4 blocks: [0,1,2], [3,4], [5,6,7], [8,9] -> means
    torch.testing.assert_close(s[0, :, 0], torch.tensor([1.0, 3.5, 6.0, 8.5]))
    assert float(s[1, :, 0].max()) <= 5.0  # padding never leaks in
    long = torch.randn(1, 100_000, 8)
    s2, m2 = hs(long, torch.ones(1, 100_000, dtype=torch.bool))
    assert s2.shape == (1, 4, 8)  # bounded however long the record
    short, ms = hs(torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    assert ms.sum() == 2  # fewer tokens than blocks: empty blocks are masked


def test_heads_shapes_and_loss_ignores_unknown():
    torch.manual_seed(0)
    cfg = HeadsConfig()
    heads = FindingHeads(cfg, 32)
    K, L = cfg.num_findings, len(cfg.locations)
    out = heads(torch.randn(3, 6, 32), torch.ones(3, 6, dtype=torch.bool))
    assert out.presence_logits_BK.shape == (3, K)
    assert out.side_logits_BK4.shape == (3, K, 4) and out.location_logits_BKL.shape == (3, K, L)
    assert ((out.presence_probs > 0) & (out.presence_probs < 1)).all()
    unknown = FindingLabels(torch.full((3, K), -1.0))
    assert heads_loss(out, unknown, cfg)["heads"] == 0
    labels = FindingLabels(torch.zeros(3, K), torch.full((3, K), -100), torch.full((3, K), -100))
    labels.side_BK[0, 0] = 2
    labels.location_BK[0, 0] = 1
    losses = heads_loss(out, labels, cfg)
    assert losses["presence"] > 0 and losses["side"] > 0 and losses["location"] > 0
    losses["heads"].backward()
    assert heads.presence.weight.grad is not None


def test_coarse_location():
    assert coarse_location("T3") == "upper thoracic spine"
    assert coarse_location("T11") == "lower thoracic spine"
    assert coarse_location("L2") == "lumbar spine"
    assert coarse_location("right upper lobe") == "right upper lobe"
    assert coarse_location(None) == "unspecified"


def test_temperature_scaling_reduces_ece():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 20_000)
    labels = (rng.random(true_logit.shape) < 1 / (1 + np.exp(-true_logit))).astype(np.float32)
    over = true_logit * 3.0  # over-confident model
    t = fit_temperature(over, labels)
    assert 2.5 < t < 3.5
    before = expected_calibration_error(1 / (1 + np.exp(-over)), labels)
    after = expected_calibration_error(1 / (1 + np.exp(-over / t)), labels)
    assert after < before / 3
    under = true_logit / 2.0  # under-confident: T < 1
    assert fit_temperature(under, labels) < 0.7
    # unknown labels (-1) are ignored
    lab2 = labels.copy()
    lab2[:100] = -1
    assert abs(fit_temperature(over, lab2) - t) < 0.2


def test_stored_temperature_calibrates_probs():
    heads = FindingHeads(HeadsConfig(), 16)
    x = torch.randn(2, 4, 16)
    m = torch.ones(2, 4, dtype=torch.bool)
    p1 = heads(x, m).presence_probs
    heads.temperature.fill_(4.0)
    p4 = heads(x, m).presence_probs
    assert ((p4 - 0.5).abs() <= (p1 - 0.5).abs() + 1e-6).all()


def test_labels_to_targets():
    cfg = HeadsConfig()
    names = list(cfg.finding_names)
    t = labels_to_targets([
        [{"finding": "nodule", "present": True, "side": "left", "location": "left upper lobe"},
         {"finding": "pneumothorax", "present": None},
         {"finding": "fracture", "present": True, "side": None, "location": "L1"},
         {"finding": "not_a_finding", "present": True}],
        [],
    ], cfg)
    n, p, f = names.index("nodule"), names.index("pneumothorax"), names.index("fracture")
    assert t.present_BK[0, n] == 1 and t.present_BK[0, p] == -1 and t.present_BK[1].sum() == 0
    assert t.side_BK[0, n] == 1 and t.side_BK[0, f] == 0 and t.side_BK[1].max() == -100
    assert cfg.locations[int(t.location_BK[0, n])] == "left upper lobe"
    assert cfg.locations[int(t.location_BK[0, f])] == "lumbar spine"
    assert labels_to_targets([[]], cfg, unlisted_as_absent=False).present_BK.min() == -1


def test_image_max_token_is_a_direct_ungated_image_path():
    import dataclasses

    torch.manual_seed(0)
    cfg = dataclasses.replace(FusionConfig.preset("tiny"), image_max_token=True)
    f = Fusion(cfg, D_IMG, D_AUD, D_HIST, D_OUT).eval()
    img, aud, hist = _mods(2, True, True, True)
    fused, mask, _ = f(img, aud, hist)
    assert fused.shape == (2, cfg.n_fused + 1, D_OUT) and mask.all()
    # the last token follows the strongest image token, whatever the history says
    img2 = (img[0].clone(), img[1])
    img2[0][0, 3] += 5.0
    fused2, _, _ = f(img2, aud, hist)
    assert (fused2[0, -1] - fused[0, -1]).abs().max() > 1e-3
    torch.testing.assert_close(fused2[1, -1], fused[1, -1])
    hist2 = (hist[0] * 0 + 1.0, hist[1])
    fused3, _, _ = f(img, aud, hist2)
    torch.testing.assert_close(fused3[:, -1], fused[:, -1])  # not mixed with the history
    # no image: a finite constant token
    noimg = (img[0], torch.zeros_like(img[1]))
    fused4, mask4, _ = f(noimg, aud, hist)
    assert torch.isfinite(fused4).all() and mask4.all()


def test_token_presence_adds_the_max_token_logit_and_ignores_padding():
    torch.manual_seed(0)
    cfg = HeadsConfig(token_presence=True)
    K = cfg.num_findings
    heads = FindingHeads(cfg, 32, image_dim=16)
    with pytest.raises(ValueError, match="image_dim"):
        FindingHeads(cfg, 32)
    fused, fmask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    tok = torch.randn(2, 5, 16)
    tmask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)  # study 1: no image
    base = heads(fused, fmask).presence_logits_BK  # without image tokens: the trunk alone
    out = heads(fused, fmask, (tok, tmask)).presence_logits_BK
    r = cfg.token_pool_sharpness  # log-mean-exp over the valid tokens only
    want = (torch.logsumexp(r * heads.token_logits(tok[0, :3]), 0) - np.log(3)) / r  # [K]
    torch.testing.assert_close(out[0] - base[0], want * heads.token_scale)
    torch.testing.assert_close(out[1], base[1])  # no valid image token: nothing added
    # a padded token, however strong, changes nothing; a valid one raises its finding's logit
    tok2 = tok.clone()
    tok2[0, 4] = 100 * heads.token_logits.weight[0].detach()
    torch.testing.assert_close(heads(fused, fmask, (tok2, tmask)).presence_logits_BK, out)
    tok2[0, 1] = tok2[0, 4]
    assert heads(fused, fmask, (tok2, tmask)).presence_logits_BK[0, 0] > out[0, 0] + 10  # ~ the max
    # the presence loss alone trains the token layer (the MIL path)
    loss = heads_loss(heads(fused, fmask, (tok, tmask)), FindingLabels(torch.ones(2, K)), cfg)["heads"]
    loss.backward()
    assert heads.token_logits.weight.grad.abs().sum() > 0 and heads.token_scale.grad is not None


def test_fit_decision_thresholds_moves_only_where_val_says_so():
    from multimodal.heads import HeadsConfig, fit_decision_thresholds
    from multimodal.presets import ModelConfig

    rng = np.random.default_rng(0)
    n = 200
    y = np.zeros((n, 4), dtype=int)
    y[:40, 0] = 1  # finding 0: positives score 0.25-0.45 (under-called at 0.5), negatives < 0.2
    y[:40, 1] = 1  # finding 1: cleanly separated around 0.5 already
    y[:3, 2] = 1  # finding 2: too few positives to move
    y[::10, 3] = 1  # finding 3: not learned (random scores under 0.3, 10 % prevalence)
    p = np.empty((n, 4))
    p[:, 0] = np.where(y[:, 0] == 1, rng.uniform(0.25, 0.45, n), rng.uniform(0.0, 0.2, n))
    p[:, 1] = np.where(y[:, 1] == 1, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    p[:, 2] = np.where(y[:, 2] == 1, 0.3, 0.1)
    p[:, 3] = rng.uniform(0.0, 0.3, n)
    y[150:, 1] = -1  # unknown labels are ignored
    thr = fit_decision_thresholds(p, y)
    assert 0.2 <= thr[0] <= 0.25 and thr[1] == 0.5 and thr[2] == 0.5
    # calling the unlearned finding everywhere would maximise its own F1 (0.18 > 0) but floods
    # the calls with false positives: micro-F1, which the fit maximises, keeps it at 0.5
    assert thr[3] == 0.5
    hc = HeadsConfig(finding_names=("a", "b", "c", "d"), decision_thresholds=thr)
    assert np.allclose(hc.thresholds(), thr)
    assert np.allclose(HeadsConfig(finding_names=("a", "b")).thresholds(), 0.5)
    with pytest.raises(ValueError, match="refit"):
        HeadsConfig(finding_names=("a", "b"), decision_thresholds=(0.3,)).thresholds()
    cfg = ModelConfig.preset("tiny")
    cfg.heads.decision_thresholds = tuple(0.5 for _ in cfg.heads.finding_names)
    assert ModelConfig.from_dict(cfg.to_dict()).heads.decision_thresholds == cfg.heads.decision_thresholds


def test_operating_points_must_be_informative():
    """A finding the model barely sees (probabilities unrelated to the labels, all just under
    0.5, prevalence 35 %) raises micro-F1 by being called in many studies; such a call says
    nothing about the study, so its operating point stays 0.5. A finding with signal still moves."""
    from multimodal.heads import fit_decision_thresholds

    rng = np.random.default_rng(0)
    N = 400
    y_blind = (rng.random(N) < 0.35).astype(int)
    p_blind = rng.uniform(0.26, 0.45, N)  # no signal
    y_seen = (rng.random(N) < 0.3).astype(int)
    p_seen = np.where(y_seen == 1, rng.uniform(0.2, 0.45, N), rng.uniform(0.0, 0.25, N))  # under-called, separable
    P, Y = np.stack([p_blind, p_seen], 1), np.stack([y_blind, y_seen], 1)
    old = fit_decision_thresholds(P, Y, min_lift=0.0)  # the former rule: "always" for the blind finding
    assert old[0] < 0.5  # moved, although the calls carry no signal
    thr = fit_decision_thresholds(P, Y)
    assert thr[0] == 0.5
    assert 0.15 <= thr[1] <= 0.25


def test_operating_beta_weighs_recall():
    """F-beta with beta > 1 trades false calls for fewer missed findings: on a finding whose
    positives and negatives overlap, the beta-2 operating point is lower than the F1 one and
    recalls more positives; beta 1 is the F1 fit; the config carries beta through a save."""
    from multimodal.heads import fit_decision_thresholds
    from multimodal.presets import ModelConfig

    rng = np.random.default_rng(1)
    N = 600
    y = (rng.random(N) < 0.3).astype(int)
    p = np.clip(np.where(y == 1, rng.normal(0.45, 0.15, N), rng.normal(0.25, 0.12, N)), 0, 1)  # overlapping
    P, Y = p[:, None], y[:, None]
    t1 = fit_decision_thresholds(P, Y)[0]
    assert fit_decision_thresholds(P, Y, beta=1.0)[0] == t1
    t2 = fit_decision_thresholds(P, Y, beta=2.0)[0]
    assert t2 < t1
    recall = lambda t: float(((p >= t) & (y == 1)).sum() / y.sum())  # noqa: E731
    assert recall(t2) > recall(t1)
    with pytest.raises(ValueError, match="beta"):
        fit_decision_thresholds(P, Y, beta=0.0)
    cfg = ModelConfig.preset("tiny")
    assert cfg.heads.operating_beta == 1.0
    cfg.heads.operating_beta = 2.0
    assert ModelConfig.from_dict(cfg.to_dict()).heads.operating_beta == 2.0


def test_where_heads_read_side_and_location_from_where_the_finding_tokens_are():
    """heads.where_from_tokens: token positions follow the encoder's layout (slab by slab, G x G
    cells row-major; slab height among the valid slabs); at zero init side and location are the
    trunk's alone; trained on the side / location losses only, the where maps learn a side from
    the lesion token's column and a location from its slab height, which the pooled fused tokens
    (all alike here) cannot give."""
    from multimodal.heads import SIDES

    torch.manual_seed(0)
    G, S, D = 4, 6, 16
    cfg = HeadsConfig(token_presence=True, where_from_tokens=True)
    with pytest.raises(ValueError, match="where_from_tokens"):
        FindingHeads(cfg, 32, image_dim=D)  # no grid
    heads = FindingHeads(cfg, 32, image_dim=D, grid=G)
    K, L = cfg.num_findings, len(cfg.locations)
    k = cfg.finding_names.index("nodule")
    # positions: column / row one-hot of the cell, height bins over the valid slabs only
    mask = torch.zeros(2, S * G * G, dtype=torch.bool)
    mask[0, : 4 * G * G] = True  # 4 valid slabs, then padding
    mask[1] = True
    pos = heads.token_positions(mask)
    assert pos.shape == (2, S * G * G, 2 * G + cfg.where_z_bins)
    t = 2 * G * G + 1 * G + 3  # slab 2, row 1, column 3
    assert pos[0, t, :G].argmax() == 3 and pos[0, t, G:2 * G].argmax() == 1
    assert pos[0, 0, 2 * G:].argmax() == 0 and pos[0, 3 * G * G, 2 * G:].argmax() == cfg.where_z_bins - 1  # last valid slab
    torch.testing.assert_close(pos[..., 2 * G:].sum(-1), torch.ones(2, S * G * G))
    # a study: one lesion token (feature 0 high), fused tokens identical for every study
    with torch.no_grad():
        heads.token_logits.weight.zero_()
        heads.token_logits.weight[k, 0] = 1.0
    fused, fmask = torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.bool)
    right, left = SIDES.index("right"), SIDES.index("left")
    lobes = [cfg.locations.index(x) for x in ("right upper lobe", "right lower lobe")]

    def batch(n):
        col = torch.randint(0, G, (n,))
        slab = torch.randint(0, S, (n,))
        tok = torch.randn(n, S * G * G, D) * 0.1
        tok[torch.arange(n), slab * G * G + 2 * G + col, 0] = 8.0  # row 2
        side = torch.where(col < G // 2, right, left)  # image columns 0-1 are the patient's right
        loc = torch.tensor(lobes)[(slab >= S // 2).long()]  # upper slabs first
        lab = FindingLabels(torch.zeros(n, K), torch.full((n, K), -100), torch.full((n, K), -100))
        lab.present_BK[:, k], lab.side_BK[:, k], lab.location_BK[:, k] = 1.0, side, loc
        return tok, torch.ones(n, S * G * G, dtype=torch.bool), lab

    tok, tmask, lab = batch(64)
    trunk_only = heads(fused.expand(64, -1, -1), fmask.expand(64, -1), (tok, tmask))
    side0 = heads.side(heads.trunk(torch.zeros(1, 64)))  # the same for every study
    torch.testing.assert_close(trunk_only.side_logits_BK4[:, k], side0.view(K, -1)[k].expand(64, -1), atol=1e-5, rtol=0)
    opt = torch.optim.Adam([heads.where_side, heads.where_location], lr=0.05)
    for _ in range(150):
        tok, tmask, lab = batch(32)
        out = heads(fused.expand(32, -1, -1), fmask.expand(32, -1), (tok, tmask))
        loss = heads_loss(out, lab, cfg)
        opt.zero_grad()
        (loss["side"] + loss["location"]).backward()
        opt.step()
    tok, tmask, lab = batch(200)
    with torch.no_grad():
        out = heads(fused.expand(200, -1, -1), fmask.expand(200, -1), (tok, tmask))
    assert (out.side_logits_BK4[:, k].argmax(-1) == lab.side_BK[:, k]).float().mean() > 0.95
    assert (out.location_logits_BKL[:, k].argmax(-1) == lab.location_BK[:, k]).float().mean() > 0.9
    # a cached batch of studies without image holds one masked dummy token: nothing added
    one = heads(fused, fmask, (tok[:1, :1], torch.zeros(1, 1, dtype=torch.bool)))
    torch.testing.assert_close(one.side_logits_BK4, heads(fused, fmask).side_logits_BK4)
    # no image tokens at all: nothing added
    none = heads(fused, fmask, (tok[:1], torch.zeros(1, S * G * G, dtype=torch.bool)))
    torch.testing.assert_close(none.side_logits_BK4, heads(fused, fmask).side_logits_BK4)


def test_fit_evidence_fusion_recovers_a_logistic_combination():
    """Labels drawn from sigmoid(0.5 z + 2 e - 1): the fit recovers the weights; unknown labels
    (-1) and studies without evidence (NaN) are left out; too few positives give the identity."""
    from multimodal.heads import fit_evidence_fusion

    rng = np.random.default_rng(0)
    z, e = rng.normal(0, 2, 20_000), rng.normal(0, 1, 20_000)
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-(0.5 * z + 2.0 * e - 1.0)))).astype(float)
    w_z, w_e, b = fit_evidence_fusion(z, e, y)
    assert w_z == pytest.approx(0.5, abs=0.07) and w_e == pytest.approx(2.0, abs=0.15) and b == pytest.approx(-1.0, abs=0.12)
    y2, e2 = y.copy(), e.copy()
    y2[:500], e2[500:1000] = -1, np.nan  # ignored, not read as negatives or as zero evidence
    assert fit_evidence_fusion(z, e2, y2) == pytest.approx((w_z, w_e, b), abs=0.08)
    # a logit pointing the wrong way on these studies is not turned round: both weights stay >= 0
    w_z2, w_e2, _ = fit_evidence_fusion(-z, e, y)
    assert 0.0 <= w_z2 < 0.05 and w_e2 > 1.0
    few = np.zeros(50)
    few[:3] = 1
    assert fit_evidence_fusion(z[:50], e[:50], few) == (1.0, 0.0, 0.0)


def test_fused_probabilities_read_the_evidence_only_where_a_study_has_it():
    """HeadsOutput.presence_probs: sigmoid(w_logit z / T + w_evidence e + bias) for the fused
    finding of a study with evidence; the temperature-scaled heads elsewhere (NaN evidence, other
    findings, no fusion fitted). A fusion row naming an unknown finding is refused."""
    import dataclasses

    cfg = dataclasses.replace(HeadsConfig(), detector_evidence=("nodule",), evidence_fusion=(("nodule", 0.5, 2.0, -1.0),))
    heads = FindingHeads(cfg, 16)
    heads.temperature.fill_(2.0)
    x, m = torch.randn(3, 4, 16), torch.ones(3, 4, dtype=torch.bool)
    with torch.no_grad():
        out = heads(x, m, evidence=[{"nodule": 1.5}, None, {"nodule": -3.0, "mass": 9.0}])
    k, k_mass = cfg.finding_names.index("nodule"), cfg.finding_names.index("mass")
    z = out.presence_logits_BK / 2.0
    p = out.presence_probs
    assert p[0, k] == pytest.approx(torch.sigmoid(0.5 * z[0, k] + 2.0 * 1.5 - 1.0).item(), abs=1e-6)
    assert p[2, k] == pytest.approx(torch.sigmoid(0.5 * z[2, k] - 6.0 - 1.0).item(), abs=1e-6)
    assert p[1, k] == pytest.approx(torch.sigmoid(z[1, k]).item(), abs=1e-6)  # no evidence: the heads alone
    assert p[2, k_mass] == pytest.approx(torch.sigmoid(z[2, k_mass]).item(), abs=1e-6)  # not a detector finding
    plain = FindingHeads(dataclasses.replace(cfg, evidence_fusion=()), 16)
    plain.load_state_dict(heads.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(x, m, evidence=[{"nodule": 1.5}] * 3).presence_probs, torch.sigmoid(z), atol=1e-6)
    with pytest.raises(ValueError, match="not a finding"):
        dataclasses.replace(cfg, evidence_fusion=(("tumour", 1.0, 1.0, 0.0),)).fusion_table()


def test_evidence_fusion_survives_the_config_round_trip():
    from multimodal.presets import ModelConfig

    cfg = ModelConfig.preset("tiny")
    cfg.heads.detector_evidence = ("nodule",)
    cfg.heads.evidence_fusion = (("nodule", 0.7, 3.1, -7.2),)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.heads.evidence_fusion == (("nodule", 0.7, 3.1, -7.2),) and back.heads.detector_evidence == ("nodule",)
    assert back.runs_detectors and not ModelConfig.preset("tiny").runs_detectors
