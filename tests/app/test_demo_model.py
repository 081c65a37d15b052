"""The shipped demo model (models/demo, built by `make demo-model`): size, card, metrics, and a
report for a bundled example through the product pipeline."""
from __future__ import annotations

import json

import pytest

from app import NOT_FOR_CLINICAL_USE

from ._model import EXAMPLES, REPO

DEMO = REPO / "models" / "demo"


@pytest.fixture(scope="module")
def demo_dir():
    assert (DEMO / "model.safetensors").is_file(), "models/demo is shipped with the repository: run `make demo-model`"
    return DEMO


def test_shipped_model_fits_and_says_what_it_is(demo_dir):
    size = sum(f.stat().st_size for f in demo_dir.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"models/demo is {size / 2**20:.1f} MiB (limit 25 MB)"
    card = (demo_dir / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card.lower() and "synthetic" in card.lower()
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    for k in ("bleu4", "finding_micro_f1", "ece", "text_finding_consistency", "n"):
        assert k in metrics, k
    assert metrics["n"] >= 300  # held-out test split of at least 300 studies
    assert 0 < metrics["train_step_seconds"] <= 3600  # trained on this CPU within the hour


def test_shipped_model_writes_a_report_for_an_example(demo_dir):
    from app.pipeline import PipelineConfig, ReportPipeline
    from data.report_format import SECTION_KEYS

    pipe = ReportPipeline.from_dir(demo_dir, PipelineConfig(max_evidence_findings=1))
    study = EXAMPLES / "studies" / "syn00002"
    rep = pipe.run(study)
    assert set(rep.sections) == set(SECTION_KEYS)
    assert rep.sections["findings"].strip() and rep.sections["impression"].strip()
    assert NOT_FOR_CLINICAL_USE in rep.to_text()
    assert rep.history.get("given")  # the example's record was read
    assert len(rep.findings) == 15
    # the product's outline (PipelineConfig.report_outline, on by default): one line per organ
    # system, each under its heading, in report order (session 23's model, without the veto, wrote
    # "Heart enlarged mediastinal or pneumothorax." for this study's heart line)
    from data.vocab import SYSTEMS

    lines = [ln for ln in rep.sections["findings"].split("\n") if ln.strip()]
    assert [ln.split(":")[0] for ln in lines] == [h for _, h in SYSTEMS], lines
    assert rep.provenance["generation"]["report_outline"] is True


def test_shipped_decoding_is_the_one_its_val_table_chose(demo_dir):
    """models/demo/decoding.json (written by tune-decoding on val) chooses the row of its own table
    with the best val BLEU-4; the product (no config given) decodes with it, and the test metrics
    beside the weights were measured with the same decoding."""
    from app.decoding import DECODING_KEYS, read_decoding
    from app.pipeline import ReportPipeline

    doc = json.loads((demo_dir / "decoding.json").read_text())
    assert doc["split"] == "val" and doc["criterion"] == "bleu4"
    best = max(doc["table"], key=lambda r: r["bleu4"])
    assert doc["chosen"] == {k: best[k] for k in DECODING_KEYS if k in best}
    cfg = ReportPipeline.from_dir(demo_dir).config
    for k, v in read_decoding(demo_dir).items():
        assert getattr(cfg, k) == v, k
    measured = json.loads((demo_dir / "metrics.json").read_text())["decoding"]
    assert measured["strategy"] == doc["chosen"]["strategy"]
    if doc["chosen"]["strategy"] == "mbr":
        for k in ("num_samples", "temperature", "calls_agreement", "mbr_from"):
            assert measured[k] == doc["chosen"].get(k, measured[k]), k
