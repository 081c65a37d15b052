"""bench.e2e runs end to end (latency rows, int8 speed-up, int8 quality check) on a tiny model.
No timing is asserted: the benchmark measures, the test checks that it runs and reports."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import bench.common
import bench.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from _model import EXAMPLES, tiny_model_dir  # noqa: E402


def test_e2e_bench_quick_writes_latency_and_quality(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    model = tiny_model_dir(tmp_path_factory)
    # --default-malloc: this test process keeps glibc's defaults (the bench's own setting,
    # as `medreport` runs, is checked in tests/bench/test_moe_attention.py and tests/app/test_cli.py)
    assert bench.e2e.main(["--model", str(model), "--quick", "--manifest", str(EXAMPLES / "manifest.jsonl"),
                           "--default-malloc"]) == 0
    out = json.loads((tmp_path / "e2e_quick.json").read_text())
    assert out["allocator"] == "glibc defaults"
    assert {r["decoder"] for r in out["rows"]} == {"fp32", "int8"}
    for r in out["rows"]:
        assert r["p95_s"] >= r["p50_s"] > 0 and r["history_tokens_read"] > 0
    assert out["int8_speedup_2000"] > 0
    q = out["int8_quality"]
    assert q["studies"] >= 1 and 0 <= q["identical_reports"] <= 1


def test_e2e_bench_on_a_given_study_fp32_only(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    model = tiny_model_dir(tmp_path_factory)
    study = EXAMPLES / "studies" / "syn00002"
    assert bench.e2e.main(["--model", str(model), "--quick", "--study", str(study), "--no-int8",
                           "--name", "e2e_example", "--default-malloc"]) == 0
    out = json.loads((tmp_path / "e2e_example_quick.json").read_text())
    assert out["study"] == str(study) and {r["decoder"] for r in out["rows"]} == {"fp32"}
    assert "int8_speedup_2000" not in out and out["rows"][0]["heatmaps"] >= 0
