"""Baselines: constant (chosen on val), nearest-neighbour retrieval, labels-to-template; the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app import baselines
from app.cli import main
from data.datasets import read_manifest
from data.labeler import label_report, presence

from ._model import EXAMPLES, tiny_model_dir

REPORT = "FINDINGS:\n{f}\n\nIMPRESSION:\n{i}\n"


def test_constant_report_is_the_best_on_val():
    good = REPORT.format(f="Lungs are clear. No pleural effusion. Heart size is normal.", i="No acute findings.")
    bad = REPORT.format(f="Large right pneumothorax with mediastinal shift.", i="Tension pneumothorax.")
    val = [good, REPORT.format(f="Lungs are clear. No pleural effusion. Heart size is normal.", i="Normal study.")]
    chosen, score = baselines.constant_report([bad, good, bad], val)
    assert chosen == good and score > 0.5
    chosen2, _ = baselines.constant_report([bad, good], [bad])
    assert chosen2 == bad


def test_nearest_neighbours_by_cosine():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q = np.array([[10.0, 0.5], [0.1, 3.0], [2.0, 2.1]])
    assert baselines.nearest_neighbours(q, pool).tolist() == [0, 1, 2]


def test_template_report_says_the_predicted_findings():
    entries = [e for e in read_manifest(EXAMPLES / "manifest.jsonl") if e.split == "train"]
    attrs = baselines._Attributes(entries)
    pos = baselines.template_report({"pleural_effusion": {"p": 0.9, "side": "left", "location": "unspecified"},
                                     "nodule": {"p": 0.2, "side": "right", "location": "right upper lobe"},
                                     "fracture": {"p": 0.8, "side": "none", "location": "lower thoracic spine"}},
                                    attrs)
    said = presence(label_report(pos))
    assert said.get("pleural_effusion") and said.get("fracture") and not said.get("nodule")
    assert "left" in pos.lower()
    normal = baselines.template_report({"nodule": {"p": 0.1}}, attrs)
    assert not any(presence(label_report(normal)).values())


def test_baseline_cli_constant_and_template_then_evaluate(tmp_path, capsys):
    manifest = EXAMPLES / "manifest.jsonl"
    out = tmp_path / "constant.jsonl"
    assert main(["baseline", "constant", "--manifest", str(manifest), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    test_ids = {e.id for e in read_manifest(manifest) if e.split == "test"}
    assert {r["id"] for r in rows} == test_ids and len({r["report"] for r in rows}) == 1
    # template from predictions
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "report": "x", "findings": {"mass": {"p": 0.9, "side": "right",
                                                                                        "location": "right lower lobe"}}}) + "\n"
                             for i in sorted(test_ids)))
    tpl = tmp_path / "template.jsonl"
    assert main(["baseline", "template", "--manifest", str(manifest), "--out", str(tpl), "--predictions", str(preds)]) == 0
    assert all("mass" in json.loads(x)["report"].lower() for x in tpl.read_text().splitlines())
    # scored by the same evaluate CLI, restricted to the split
    js = tmp_path / "scores.json"
    assert main(["evaluate", "--hyp", str(out), "--ref", str(manifest), "--split", "test", "--json", str(js),
                 "--bootstrap", "0", "--no-meteor"]) == 0
    scores = json.loads(js.read_text())
    assert scores["n"] == len(test_ids) and not scores.get("missing_in_hyp")


def test_baseline_cli_template_needs_predictions(tmp_path, capsys):
    rc = main(["baseline", "template", "--manifest", str(EXAMPLES / "manifest.jsonl"), "--out", str(tmp_path / "t.jsonl")])
    assert rc == 2 and "--predictions" in capsys.readouterr().err


def test_baseline_cli_retrieval_with_a_model(tmp_path_factory, tmp_path):
    model = tiny_model_dir(tmp_path_factory)
    out = tmp_path / "nn.jsonl"
    manifest = EXAMPLES / "manifest.jsonl"
    assert main(["baseline", "retrieval", "--manifest", str(manifest), "--out", str(out), "--model", str(model),
                 "--no-progress"]) == 0
    train_reports = {e.report for e in read_manifest(manifest) if e.split == "train"}
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows and all(r["report"] in train_reports for r in rows)


def test_evaluate_split_option_rejects_unknown_split(tmp_path, capsys):
    hyp = tmp_path / "h.jsonl"
    hyp.write_text(json.dumps({"id": "a", "report": "x"}) + "\n")
    rc = main(["evaluate", "--hyp", str(hyp), "--ref", str(EXAMPLES / "manifest.jsonl"), "--split", "tset",
               "--bootstrap", "0", "--no-meteor"])
    assert rc == 2 and "tset" in capsys.readouterr().err


def test_image_blind_recipe_is_the_demo_decoder_stage_without_image_and_audio():
    """The image-blind baseline is only fair if it is the demo recipe's decoder stage with the
    image and dictation removed: same steps, data, curriculum, digest and copy head."""
    import json

    from app.train import load_config, model_config

    demo, blind = load_config(None, "configs/demo.json"), load_config(None, "configs/image_blind.json")
    dec_stage = [s for s in demo.stages if s.lm][0]
    assert len(blind.stages) == 1
    a, b = json.loads(json.dumps(dec_stage.__dict__, default=list)), json.loads(json.dumps(blind.stages[0].__dict__, default=list))
    a.pop("cache_encoders", None), b.pop("cache_encoders", None)
    assert a == b
    assert demo.data == blind.data and demo.optim == blind.optim and demo.seed == blind.seed
    ma, mb = model_config(demo, 4000), model_config(blind, 4000)
    assert (mb.use_image, mb.use_audio) == (False, False) and (ma.use_image, ma.use_audio) == (True, True)
    assert ma.history_digest_words == mb.history_digest_words > 0
    assert ma.decoder == mb.decoder
