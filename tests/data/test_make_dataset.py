"""`medreport make-dataset` end to end, and the bundled examples/ sample."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from data.datasets import read_manifest
from data.labeler import label_report, presence
from data.synthetic import dictation

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


@pytest.mark.integration
def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    rc = main(["make-dataset", "--out", str(tmp_path / "ds"), "--n", "3", "--seed", "2", "--size", "tiny",
               "--history-tokens", "200:600", "--workers", "1", "--no-audio", "--no-progress"])
    assert rc == 0 and "wrote 3 tiny studies" in capsys.readouterr().out
    entries = read_manifest(tmp_path / "ds" / "manifest.jsonl", check_files=True)
    assert len(entries) == 3 and all(e.audio is None for e in entries)
    load_study = pytest.importorskip("data.study").load_study
    for e in entries:
        study = load_study(e.study_path)
        assert study.shape == (16, 64, 64)
        assert (e.study_path / "reference.txt").read_text() == e.report


def test_cli_rejects_bad_token_range(capsys):
    with pytest.raises(SystemExit):
        main(["make-dataset", "--out", "x", "--history-tokens", "500"])
    assert "MIN:MAX" in capsys.readouterr().err


def test_cli_without_synthesizer_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dictation, "available", lambda: False)
    rc = main(["make-dataset", "--out", str(tmp_path / "x"), "--n", "1", "--size", "tiny", "--no-progress"])
    assert rc == 2 and "--no-audio" in capsys.readouterr().err


def test_examples_sample_is_complete_and_small():
    entries = read_manifest(EXAMPLES / "manifest.jsonl", check_files=True)
    assert 5 <= len(entries) <= 8
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 3 * 1024 * 1024
    assert any(e.audio is None for e in entries) and any(e.history is None for e in entries)
    assert any(not any(lab.present for lab in e.labels) for e in entries)  # a normal study
    assert any(sum(lab.present for lab in e.labels) >= 2 for e in entries)
    from data.synthetic.histories import approx_tokens

    lengths = [approx_tokens(e.path(e.history).read_text()) for e in entries if e.history]
    assert max(lengths) >= 1800
    import soundfile as sf

    for e in entries:
        if e.audio:
            info = sf.info(str(e.path(e.audio)))
            assert info.samplerate == 16000 and info.channels == 1 and info.duration > 1.0
        truth = {lab.finding: lab.present for lab in e.labels}
        assert presence(label_report(e.report)) == truth  # the labeller reads the truth back
        for f in e.facts:
            history = e.path(e.history).read_text(encoding="utf-8")
            assert history[f.char_offset:f.char_offset + len(f.text)] == f.text
            if f.kind != "distractor":
                assert f.expect_in_report.lower() in e.report.lower()


def test_examples_load():
    load_study = pytest.importorskip("data.study").load_study
    for line in (EXAMPLES / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        study = load_study(EXAMPLES / entry["study"])
        assert study.shape == (16, 64, 64)
        assert np.isfinite(study.volume).all() and study.volume.min() >= -1024
