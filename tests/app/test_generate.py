"""`medreport generate`: folder and manifest input, failures isolated, resume, atomic writes,
sharding, predictions.jsonl readable by `medreport evaluate`."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import EXAMPLES, tiny_model_dir  # noqa: E402

from app import batch  # noqa: E402
from app.cli import main  # noqa: E402
from app.pipeline import PipelineConfig, ReportPipeline  # noqa: E402
from data.errors import MedreportError  # noqa: E402

FAST = ["--max-new-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def studies(tmp_path) -> Path:
    """Two good studies and a corrupt one (a garbage .dcm)."""
    root = tmp_path / "in"
    for sid in ("syn00000", "syn00003"):
        shutil.copytree(EXAMPLES / "studies" / sid, root / sid)
    (root / "broken").mkdir()
    (root / "broken" / "IM0001.dcm").write_bytes(b"\x00garbage, not DICOM" * 10)
    return root


def test_folder_batch_failure_isolated_then_resume(studies, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", str(studies), "--out", str(out), "--model", str(model_dir), "--formats", "txt,fhir,sr",
               "--no-evidence", *FAST])
    assert rc == 1  # one study failed; the others were written
    for sid in ("syn00000", "syn00003"):
        for name in ("report.txt", "report.json", "report.fhir.json", "report.sr.dcm"):
            assert (out / sid / name).is_file(), (sid, name)
        assert json.loads((out / sid / "report.json").read_text())["id"] == sid
    err = json.loads((out / "broken" / "error.json").read_text())
    assert err["id"] == "broken" and err["error"] and "Traceback" not in err["error"]
    assert not (out / "broken" / "report.json").exists()
    s = json.loads((out / "summary.json").read_text())
    assert (s["total"], s["done"], s["skipped"], s["failed"]) == (3, 2, 0, 1)
    assert s["mean_seconds_per_study"] > 0 and s["failures"][0]["id"] == "broken"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["syn00000", "syn00003"]
    assert "2 done" in capsys.readouterr().out

    before = (out / "syn00000" / "report.json").stat().st_mtime_ns
    rc = main(["generate", str(studies), "--out", str(out), "--model", str(model_dir), *FAST])
    s = json.loads((out / "summary.json").read_text())
    assert (s["done"], s["skipped"], s["failed"]) == (0, 2, 1)
    assert (out / "syn00000" / "report.json").stat().st_mtime_ns == before  # skipped, not rewritten
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2  # complete after a resumed run


def test_manifest_input_and_evaluate_reads_predictions(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", str(EXAMPLES / "manifest.jsonl"), "--out", str(out), "--model", str(model_dir),
               "--limit", "2", "--no-evidence", *FAST])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["syn00000", "syn00001"]
    capsys.readouterr()
    rc = main(["evaluate", "--hyp", str(out / "predictions.jsonl"), "--ref", str(EXAMPLES / "manifest.jsonl"),
               "--bootstrap", "0", "--no-meteor", "--json", str(tmp_path / "scores.json")])
    assert rc == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 2 and sorted(scores["missing_in_hyp"]) == ["syn00002", "syn00003", "syn00004", "syn00005"]
    assert "bleu4" in scores


def test_manifest_split_then_evaluate_the_same_split(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", str(EXAMPLES / "manifest.jsonl"), "--split", "test", "--out", str(out), "--model",
               str(model_dir), "--no-evidence", *FAST])
    assert rc == 0
    test_ids = sorted(json.loads(x)["id"] for x in (EXAMPLES / "manifest.jsonl").read_text().splitlines()
                      if json.loads(x)["split"] == "test")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == test_ids
    rc = main(["evaluate", "--hyp", str(out / "predictions.jsonl"), "--ref", str(EXAMPLES / "manifest.jsonl"),
               "--split", "test", "--bootstrap", "0", "--no-meteor", "--json", str(tmp_path / "s.json")])
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["missing_in_hyp"] == []
    capsys.readouterr()
    assert main(["generate", str(EXAMPLES / "manifest.jsonl"), "--split", "tset", "--out", str(tmp_path / "o2"),
                 "--model", str(model_dir), *FAST]) == 2
    assert "tset" in capsys.readouterr().err


def test_atomic_write_leaves_no_partial_report(model_dir, tmp_path, monkeypatch):
    pipe = ReportPipeline.from_dir(model_dir, PipelineConfig(max_new_tokens=4, evidence=False))
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "report.json":
            Path(src).write_bytes(b"{partial")  # what a crash mid-write would leave in the temp file
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    items = [batch.BatchItem("syn00002", EXAMPLES / "studies" / "syn00002")]
    s = batch.run_batch(pipe, items, tmp_path / "out", show_progress=False)
    sdir = tmp_path / "out" / "syn00002"
    assert s.failed == 1 and not (sdir / "report.json").exists()
    assert not [p for p in sdir.iterdir() if p.name.endswith(".tmp")]
    assert (sdir / "error.json").is_file() and not batch.is_done(tmp_path / "out", "syn00002")


def test_shard_partitions_by_index():
    items = list(range(10))
    parts = [batch.shard(items, r, 3) for r in range(3)]
    assert parts[0] == [0, 3, 6, 9] and parts[1] == [1, 4, 7] and parts[2] == [2, 5, 8]
    assert sorted(sum(parts, [])) == items
    assert batch.rank_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert batch.rank_from_env({}) == (0, 1)
    with pytest.raises(ValueError):
        batch.shard(items, 3, 3)


class _FailingPipeline:
    """Fails every study with a user-facing error (no model needed for the sharding logic)."""

    def run(self, study, **_):
        raise MedreportError(f"cannot read {Path(study).name}")


def test_sharded_ranks_merge_summary(tmp_path):
    items = [batch.BatchItem(f"s{i}", tmp_path / f"s{i}") for i in range(5)]
    out = tmp_path / "out"
    seen = {0: [], 1: []}
    s1 = batch.run_batch(_FailingPipeline(), items, out, rank=1, world_size=2, show_progress=False,
                         on_study=lambda i, st: seen[1].append(i))
    assert s1.total == 2 and not (out / "summary.json").exists()
    s0 = batch.run_batch(_FailingPipeline(), items, out, rank=0, world_size=2, show_progress=False, wait_timeout_s=5,
                         on_study=lambda i, st: seen[0].append(i))
    assert seen == {0: ["s0", "s2", "s4"], 1: ["s1", "s3"]}
    merged = json.loads((out / "summary.json").read_text())
    assert merged["total"] == 5 and merged["failed"] == 5 and merged["ranks_missing"] == []
    assert s0.failed == 5 and (out / "predictions.jsonl").read_text() == ""


def test_rank0_reports_a_missing_rank(tmp_path):
    out = tmp_path / "out"
    s = batch.run_batch(_FailingPipeline(), [batch.BatchItem("a", tmp_path / "a")], out, rank=0, world_size=2,
                        show_progress=False, wait_timeout_s=0.1)
    assert s.ranks_missing == [1]


def test_inputs_and_model_errors(tmp_path, monkeypatch):
    from app.commands import generate

    (tmp_path / "m.jsonl").write_text('{"id": "a", "study": "x"}\n{"id": "a", "study": "y"}\n')
    with pytest.raises(batch.BatchInputError, match="twice"):
        batch.read_batch_input(tmp_path / "m.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(batch.BatchInputError, match="sub-folders"):
        batch.read_batch_input(tmp_path / "empty")
    assert batch.safe_id("a/b c") == "a_b_c"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate, "DEFAULT_MODEL", Path("models") / "no-such-model")
    with pytest.raises(generate.ModelNotFoundError, match="make demo-model"):
        generate.resolve_model_dir(None)
    with pytest.raises(MedreportError, match="unknown format"):
        generate.parse_formats("txt,pdf")
    assert generate.parse_formats("sr") == ("sr", "json")


def test_run_many_batches_studies_like_run_and_isolates_a_bad_one(model_dir, tmp_path):
    """Studies encoded and generated together give the reports run() gives one at a time (same
    text, same finding probabilities to rounding); a study that cannot be read is returned as its
    error, in its place, and the others still get their reports."""
    import torch

    pipe = ReportPipeline.from_dir(model_dir, PipelineConfig(max_new_tokens=12, evidence=False))
    with torch.no_grad():  # the tiny model is untrained: near-tied logits would flip on rounding
        pipe.model.decoder.lm_head.weight.mul_(30.0)  # (tied to the embeddings) so widen the margins
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "IM0001.dcm").write_bytes(b"\x00garbage" * 10)
    sources = [EXAMPLES / "studies" / s for s in ("syn00000", "syn00003")] + [bad] + [EXAMPLES / "studies" / "syn00005"]
    many = pipe.run_many(sources, max_batch=8)
    assert isinstance(many[2], MedreportError)
    for src, rep in zip(sources[:2] + sources[3:], many[:2] + many[3:]):
        one = pipe.run(src)
        assert rep.sections == one.sections
        assert [f.name for f in rep.findings] == [f.name for f in one.findings]
        for a, b in zip(rep.findings, one.findings):
            assert abs(a.probability - b.probability) < 1e-6  # each study is encoded alone
        assert rep.provenance["batch_size"] == 3 and one.provenance["batch_size"] == 1
        assert rep.history == one.history
    # a token budget that fits one history at a time splits the batch; the reports stay the same
    alone = pipe.run_many(sources[:2], max_batch=8, max_batch_tokens=1)
    assert [r.provenance["batch_size"] for r in alone] == [1, 1]
    assert [r.sections for r in alone] == [r.sections for r in many[:2]]
