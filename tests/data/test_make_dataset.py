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


def test_compressed_dataset_holds_the_same_pixels(tmp_path):
    """--compression rle / j2k: the same studies in a lossless compressed transfer syntax; every
    volume loads back identical to the uncompressed build, and the setting is recorded."""
    load_study = pytest.importorskip("data.study").load_study
    common = ["--n", "2", "--seed", "3", "--size", "tiny", "--history-tokens", "200:400", "--workers", "1",
              "--no-audio", "--no-progress"]
    for name in ("explicit", "rle", "j2k"):
        assert main(["make-dataset", "--out", str(tmp_path / name), "--compression", name, *common]) == 0
    for sid in ("syn00000", "syn00001"):
        ref = load_study(tmp_path / "explicit" / "studies" / sid)
        for name, syntax in (("rle", "RLE Lossless"), ("j2k", "JPEG 2000 Image Compression (Lossless Only)")):
            st = load_study(tmp_path / name / "studies" / sid)
            assert st.metadata["transfer_syntax"] == syntax
            assert np.array_equal(st.volume, ref.volume) and st.spacing_mm == ref.spacing_mm
    cfg = json.loads((tmp_path / "j2k" / "dataset_config.json").read_text())
    assert cfg["compression"] == "j2k" and "compression" not in json.loads((tmp_path / "explicit" / "dataset_config.json").read_text())


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
    # demo-size studies (the shipped model's geometry) in JPEG 2000 lossless: about 1.2 MB each
    assert total < 9 * 1024 * 1024
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
        # the demo model's geometry, compressed as a PACS may send it
        assert study.shape == (64, 128, 128)
        assert study.metadata["transfer_syntax"] == "JPEG 2000 Image Compression (Lossless Only)"
        assert np.isfinite(study.volume).all() and study.volume.min() >= -1024
