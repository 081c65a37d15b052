"""The model uses each modality, and its evidence points at the lesion.

A tiny ReportModel is trained briefly on in-test data (``_synth``): a nodule is a bright blob in
one slab, a pleural effusion is signalled only by a band in the dictation's log-mel, the history
is uninformative. Then, with everything else fixed, adding the blob (or the band) must move
that finding's probability by >= 0.2, and the Grad-CAM peak must fall inside the blob at least
three times as often as the blob's share of the body would give by chance.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal.heads import FindingLabels
from multimodal.model import ReportModel, collate
from multimodal.presets import ModelConfig

_spec = importlib.util.spec_from_file_location("_mm_synth", Path(__file__).with_name("_synth.py"))
synth = importlib.util.module_from_spec(_spec)
sys.modules["_mm_synth"] = synth
_spec.loader.exec_module(synth)

pytestmark = pytest.mark.integration
STEPS, BATCH, LR = 100, 8, 1e-3


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two contended ones
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = ReportModel(ModelConfig.preset("tiny", vocab_size=64))
        names = model.finding_names
        nod, eff = names.index("nodule"), names.index("pleural_effusion")
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        model.train()
        for _ in range(STEPS):
            cases = [
                synth.make_case(rng, synth.random_blob(rng) if rng.random() < 0.5 else None,
                                band=rng.random() < 0.5, audio=rng.random() < 0.8, history=rng.random() < 0.8)
                for _ in range(BATCH)
            ]
            x = collate([c.study for c in cases])
            present = torch.full((BATCH, len(names)), -1.0)  # other findings: unknown
            for i, c in enumerate(cases):
                present[i, nod] = float(c.blob is not None)
                if c.study.mel is not None:
                    present[i, eff] = float(c.band)
            x.labels = FindingLabels(present)
            loss = model(x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        yield model, nod, eff
    finally:
        torch.set_num_threads(threads)


def _pair_probs(model, k, with_finding, without):
    heads, _ = model.predict_findings(collate([with_finding.study, without.study]))
    p = heads.presence_probs[:, k]
    return float(p[0] - p[1])


def test_model_uses_the_image(trained):
    model, nod, _ = trained
    diffs = []
    for i in range(8):
        blob = synth.random_blob(np.random.default_rng(100 + i))
        band = bool(i % 2)
        a = synth.make_case(np.random.default_rng(i), blob, band)  # same seed: same noise, audio, history
        b = synth.make_case(np.random.default_rng(i), None, band)
        np.testing.assert_array_equal(a.study.history_ids, b.study.history_ids)
        diffs.append(_pair_probs(model, nod, a, b))
    print("diffs", np.round(diffs, 2))
    assert np.median(diffs) >= 0.2, diffs


def test_model_uses_the_audio(trained):
    model, _, eff = trained
    diffs = []
    for i in range(8):
        blob = synth.random_blob(np.random.default_rng(200 + i)) if i % 2 else None
        a = synth.make_case(np.random.default_rng(50 + i), blob, band=True)
        b = synth.make_case(np.random.default_rng(50 + i), blob, band=False)
        np.testing.assert_array_equal(a.study.pixels, b.study.pixels)
        diffs.append(_pair_probs(model, eff, a, b))
    print("diffs", np.round(diffs, 2))
    assert np.median(diffs) >= 0.2, diffs


def test_heatmap_peaks_fall_in_the_lesion(trained):
    model, _, _ = trained
    rng = np.random.default_rng(7)
    cases = [synth.make_case(rng, synth.random_blob(rng), band=False) for _ in range(16)]
    x = collate([c.study for c in cases])
    ev = model.finding_evidence(x, ["nodule"])["nodule"]
    hits = np.mean([synth.inside_blob(e.peak_SYX, c.blob) for e, c in zip(ev, cases)])
    print("hits", hits, "chance", synth.chance_share(), "key", np.mean([e.key_slabs[0] == c.blob[0] for e, c in zip(ev, cases)]))
    assert hits >= 3 * synth.chance_share(), (hits, synth.chance_share())
    # the key slice is the blob's slab, mapped back to original z indices
    key_ok = np.mean([e.key_slabs[0] == c.blob[0] for e, c in zip(ev, cases)])
    assert key_ok > 0.5
    e0, c0 = ev[0], cases[0]
    assert e0.heatmap_SHW.shape == c0.study.pixels.shape[:1] + c0.study.pixels.shape[2:]
    lo, hi = c0.study.z_index_range[e0.key_slabs[0]]
    assert lo <= e0.key_slices[0] < hi
