"""How a model decodes (app/decoding.py): decoding.json read, written and checked; the choice
made on val by BLEU-4 (`medreport tune-decoding`, `demo-model`); `generate`, the pipeline and
in-place rewrites of a model folder honour it."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import EXAMPLES, tiny_model_dir  # noqa: E402

from app.cli import main  # noqa: E402
from app.decoding import (  # noqa: E402
    DECODING_FILE, GREEDY, DecodingError, candidates, choose, read_decoding, tune_decoding, validate_decoding,
    write_decoding,
)
from app.pipeline import ReportPipeline  # noqa: E402

BEAM = {"strategy": "beam", "num_beams": 3, "length_penalty": 1.5, "no_repeat_ngram_size": 0}


@pytest.fixture
def model_dir(tmp_path_factory, tmp_path) -> Path:
    """A private copy of the session's tiny model (tests write decoding.json into it)."""
    return Path(shutil.copytree(tiny_model_dir(tmp_path_factory), tmp_path / "model"))


def test_decoding_file_round_trip_and_errors(tmp_path):
    assert read_decoding(tmp_path) == {}  # no file: greedy
    write_decoding(tmp_path, BEAM, [{**BEAM, "bleu4": 0.2}], "val", 10)
    assert read_decoding(tmp_path) == BEAM
    doc = json.loads((tmp_path / DECODING_FILE).read_text())
    assert doc["split"] == "val" and doc["studies"] == 10 and doc["criterion"] == "bleu4"
    assert validate_decoding({"num_beams": "4", "length_penalty": 2}) == {"num_beams": 4, "length_penalty": 2.0}
    with pytest.raises(DecodingError, match="unknown setting"):
        validate_decoding({"beams": 4})
    with pytest.raises(DecodingError, match="strategy must be"):
        validate_decoding({"strategy": "best"})
    with pytest.raises(DecodingError, match="not a int"):
        validate_decoding({"num_beams": "four"})
    (tmp_path / DECODING_FILE).write_text("{not json")
    with pytest.raises(DecodingError, match="tune-decoding"):
        read_decoding(tmp_path)


def test_choose_takes_the_best_bleu4_and_the_cheaper_on_a_tie():
    cands = candidates(4, (1.0, 2.0))
    assert cands[0] == GREEDY and [c["length_penalty"] for c in cands[1:]] == [1.0, 2.0]
    assert candidates(1) == [GREEDY]
    rows = [{**c, "bleu4": b} for c, b in zip(cands, (0.10, 0.12, 0.11))]
    assert choose(rows) == cands[1]
    rows = [{**c, "bleu4": 0.1} for c in cands]
    assert choose(rows) == GREEDY
    with pytest.raises(DecodingError):
        choose([])


def test_tune_refuses_the_test_split(model_dir):
    from multimodal.model import ReportModel

    with pytest.raises(DecodingError, match="test split"):
        tune_decoding(ReportModel.from_pretrained(model_dir), EXAMPLES / "manifest.jsonl", "test")


def test_tune_decoding_cli_scores_every_candidate_and_writes_the_best(model_dir, capsys):
    rc = main(["tune-decoding", "--model", str(model_dir), "--manifest", str(EXAMPLES / "manifest.jsonl"),
               "--num-beams", "2", "--length-penalties", "1.0,2.0", "--max-new-tokens", "8", "--no-progress"])
    assert rc == 0
    doc = json.loads((model_dir / DECODING_FILE).read_text())
    table = doc["table"]
    assert [(r["strategy"], r["num_beams"], r["length_penalty"]) for r in table] == [
        ("greedy", 1, 1.0), ("beam", 2, 1.0), ("beam", 2, 2.0)]
    assert all(r["n"] == doc["studies"] >= 1 for r in table)
    assert all(0 < r["length_ratio"] and 0 <= r["brevity_penalty"] <= 1 for r in table)
    best = max(r["bleu4"] for r in table)
    assert doc["chosen"] == choose(table) and [r["bleu4"] for r in table if all(r[k] == v for k, v in doc["chosen"].items())][0] == best
    out = capsys.readouterr().out
    assert "<- chosen" in out and "greedy" in out and "beam 2 lp 2" in out
    assert main(["tune-decoding", "--model", str(model_dir), "--manifest", str(EXAMPLES / "manifest.jsonl"),
                 "--split", "test"]) == 2
    assert "test split" in capsys.readouterr().err


def test_pipeline_and_generate_decode_as_the_folder_chose_unless_told(model_dir, tmp_path):
    assert ReportPipeline.from_dir(model_dir).config.strategy == "greedy"  # no decoding.json yet
    write_decoding(model_dir, BEAM, [], "val", 1)
    pipe = ReportPipeline.from_dir(model_dir)
    assert (pipe.config.strategy, pipe.config.num_beams, pipe.config.length_penalty) == ("beam", 3, 1.5)
    gen = pipe.config.generation(pipe.tokenizer)
    assert (gen.strategy, gen.num_beams, gen.length_penalty) == ("beam", 3, 1.5)

    def provenance(out: Path) -> dict:
        return json.loads((out / "syn00000" / "report.json").read_text())["provenance"]["generation"]

    common = ["--model", str(model_dir), "--limit", "1", "--no-evidence", "--max-new-tokens", "6", "--no-progress"]
    assert main(["generate", str(EXAMPLES / "manifest.jsonl"), "--out", str(tmp_path / "a"), *common]) == 0
    g = provenance(tmp_path / "a")
    assert (g["strategy"], g["num_beams"], g["length_penalty"]) == ("beam", 3, 1.5)
    assert main(["generate", str(EXAMPLES / "manifest.jsonl"), "--out", str(tmp_path / "b"), *common,
                 "--strategy", "greedy"]) == 0
    assert provenance(tmp_path / "b")["strategy"] == "greedy"
    assert main(["generate", str(EXAMPLES / "manifest.jsonl"), "--out", str(tmp_path / "c"), *common,
                 "--length-penalty", "0.5"]) == 0
    assert provenance(tmp_path / "c")["length_penalty"] == 0.5


def test_rewriting_a_model_folder_keeps_its_decoding_and_card(model_dir):
    from app.commands.demo_model import write_shipped_model
    from multimodal.model import ReportModel

    write_decoding(model_dir, BEAM, [], "val", 1)
    (model_dir / "MODEL_CARD.md").write_text("card")
    write_shipped_model(ReportModel.from_pretrained(model_dir), model_dir)
    assert read_decoding(model_dir) == BEAM and (model_dir / "MODEL_CARD.md").read_text() == "card"
    assert not model_dir.with_name(model_dir.name + ".tmp").exists()


def test_consistency_veto_is_a_decoding_choice(model_dir, tmp_path):
    """consistent_with_calls: a decoding.json setting (true/false only), tune-decoding's
    --consistency candidates, a generate flag that overrides the folder's choice, recorded in
    the report's provenance. A decoding.json written before the setting existed still reads."""
    assert validate_decoding({"consistent_with_calls": True}) == {"consistent_with_calls": True}
    with pytest.raises(DecodingError, match="true or false"):
        validate_decoding({"consistent_with_calls": "yes"})
    cands = candidates(2, (1.0,), consistency=True)
    assert [(c["strategy"], c["consistent_with_calls"]) for c in cands] == [
        ("greedy", False), ("beam", False), ("greedy", True), ("beam", True)]
    rows = [{**c, "bleu4": b} for c, b in zip(cands, (0.1, 0.1, 0.1, 0.2))]
    assert choose(rows) == cands[3]
    assert choose([{**BEAM, "bleu4": 0.1}]) == BEAM  # an old table without the key
    write_decoding(model_dir, {**BEAM, "consistent_with_calls": True}, [], "val", 1)
    assert ReportPipeline.from_dir(model_dir).config.consistent_with_calls is True

    def provenance(out: Path) -> dict:
        return json.loads((out / "syn00000" / "report.json").read_text())["provenance"]["generation"]

    common = ["--model", str(model_dir), "--limit", "1", "--no-evidence", "--max-new-tokens", "6", "--no-progress"]
    assert main(["generate", str(EXAMPLES / "manifest.jsonl"), "--out", str(tmp_path / "a"), *common]) == 0
    g = provenance(tmp_path / "a")
    assert g["consistent_with_calls"] is True and g["consistency_refusals"] >= 0
    assert main(["generate", str(EXAMPLES / "manifest.jsonl"), "--out", str(tmp_path / "b"), *common,
                 "--no-consistent-with-calls"]) == 0
    assert provenance(tmp_path / "b")["consistent_with_calls"] is False


def test_tune_decoding_scores_mbr_candidates_and_the_pipeline_decodes_as_chosen(model_dir, capsys):
    """--mbr-samples adds MBR candidates (each temperature x calls-agreement weight) after greedy;
    a decoding.json that chose MBR makes the pipeline sample and choose as it says."""
    rc = main(["tune-decoding", "--model", str(model_dir), "--manifest", str(EXAMPLES / "manifest.jsonl"),
               "--num-beams", "1", "--mbr-samples", "2", "--temperatures", "0.7", "--calls-agreements", "0,1",
               "--record-agreements", "0,0.5", "--acquisition-agreements", "0,1", "--max-new-tokens", "8",
               "--no-progress", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "greedy" in out and "mbr 2 T 0.7 agree 0/0" in out and "mbr 2 T 0.7 agree 1/0" in out
    assert "mbr 2 T 0.7 agree 1/0.5" in out and "mbr 2 T 0.7 agree 1/0.5/1" in out
    assert not (model_dir / DECODING_FILE).exists()  # dry run
    assert [(c["strategy"], c.get("calls_agreement")) for c in candidates(1, (), False, 2, (0.7,), (0.0, 1.0))] == [
        ("greedy", None), ("mbr", 0.0), ("mbr", 1.0)]
    assert [c.get("mbr_from") for c in candidates(1, (), False, 2, (0.7,), (1.0,), mbr_from=("report", "findings"))] == [
        None, "report", "findings"]
    assert [c.get("record_agreement") for c in candidates(1, (), False, 2, (0.7,), (1.0,), record_agreements=(0.0, 0.5))] == [
        None, 0.0, 0.5]
    assert [c.get("acquisition_agreement") for c in candidates(1, (), False, 2, (0.7,), (1.0,),
                                                               acquisition_agreements=(0.0, 1.0))] == [None, 0.0, 1.0]
    mbr = {"strategy": "mbr", "num_samples": 4, "temperature": 0.5, "calls_agreement": 2.0, "mbr_from": "findings"}
    write_decoding(model_dir, mbr, [], "val", 1)
    cfg = ReportPipeline.from_dir(model_dir).config
    assert (cfg.strategy, cfg.num_samples, cfg.temperature, cfg.calls_agreement, cfg.mbr_from) == ("mbr", 4, 0.5, 2.0, "findings")
    for bad in ({"strategy": "mbr", "num_samples": 0}, {"temperature": 0}, {"calls_agreement": -1}, {"mbr_from": "all"},
                {"acquisition_agreement": -0.5}):
        with pytest.raises(DecodingError):
            validate_decoding(bad)
    assert main(["tune-decoding", "--model", str(model_dir), "--manifest", str(EXAMPLES / "manifest.jsonl"),
                 "--temperatures", "hot"]) == 2
    assert "--temperatures 'hot'" in capsys.readouterr().err
    assert main(["tune-decoding", "--model", str(model_dir), "--manifest", str(EXAMPLES / "manifest.jsonl"),
                 "--mbr-from", "report,impression"]) == 2
    assert "--mbr-from 'report,impression'" in capsys.readouterr().err
