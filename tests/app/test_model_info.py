"""`medreport model-info`: preset and saved-directory forms, JSON, errors."""
from __future__ import annotations

import json

import torch

from app.cli import main
from multimodal.model import ReportModel
from multimodal.presets import ModelConfig


def test_model_info_preset_text(capsys):
    assert main(["model-info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    for word in ("image encoder", "audio encoder", "fusion", "decoder", "finding heads", "resnet50", "top-2"):
        assert word in out, word


def test_model_info_json_matches_model(capsys):
    assert main(["model-info", "--preset", "tiny", "--json", "--vocab-size", "300"]) == 0
    info = json.loads(capsys.readouterr().out)
    m = ReportModel(ModelConfig.preset("tiny", vocab_size=300))
    assert info["total_params"] == sum(p.numel() for p in m.parameters())
    comps = {c["component"]: c for c in info["components"]}
    assert comps["image encoder"]["params"] == sum(p.numel() for p in m.image_encoder.parameters())
    assert all(c["gflops"] > 0 for c in info["components"])
    moe = info["moe"]
    assert moe["decoder_params_active"] < moe["decoder_params_total"]
    assert moe["top_k"] == m.cfg.decoder.moe.top_k


def test_model_info_full_preset_is_standard_resnet50(capsys):
    assert main(["model-info", "--preset", "full", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    img = next(c for c in info["components"] if c["component"] == "image encoder")
    assert "2048 output channels" in img["backbone"]
    assert 20e6 < img["params"] < 30e6  # ResNet-50 trunk ~23.5M + projection


def test_model_info_directory(tmp_path, capsys):
    torch.manual_seed(0)
    ReportModel(ModelConfig.preset("tiny", vocab_size=120)).save_pretrained(tmp_path / "m")
    assert main(["model-info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 120 and info["preset"] == "tiny"


def test_model_info_errors(tmp_path, capsys):
    assert main(["model-info"]) == 2
    assert main(["model-info", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
