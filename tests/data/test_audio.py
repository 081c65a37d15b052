"""Dictation audio: formats, mono, resampling, duration limit, log-mel."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from data.audio import AudioConfig, load_audio, log_mel
from data.errors import AudioError


def _tone(sr, seconds, freq=440.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    w = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([w] * channels, axis=1) if channels > 1 else w


@pytest.mark.parametrize("fmt,ext", [("WAV", ".wav"), ("FLAC", ".flac"), ("OGG", ".ogg"), ("MP3", ".mp3")])
def test_formats_load_mono_16k(tmp_path, fmt, ext):
    p = tmp_path / f"dictation{ext}"
    sf.write(str(p), _tone(44_100, 1.0, channels=2), 44_100, format=fmt)
    w = load_audio(p, sr=16_000, max_seconds=10)
    assert w.dtype == np.float32 and w.ndim == 1
    assert abs(len(w) - 16_000) < 16_000 * 0.1         # lossy codecs pad a little
    spec = np.abs(np.fft.rfft(w[2000:14000]))
    peak_hz = np.argmax(spec) * 16_000 / 12000
    assert abs(peak_hz - 440) < 10


def test_duration_limit(tmp_path):
    p = tmp_path / "d.wav"
    sf.write(str(p), _tone(8000, 3.0), 8000)
    with pytest.raises(AudioError, match="limit is 2 s"):
        load_audio(p, max_seconds=2)
    assert len(load_audio(p, sr=8000, max_seconds=None)) == 24000


def test_bad_audio(tmp_path):
    p = tmp_path / "d.wav"
    p.write_bytes(b"RIFF0000WAVEjunkjunk")
    with pytest.raises(AudioError, match="WAV or FLAC"):
        load_audio(p)
    with pytest.raises(AudioError, match="unsupported audio type"):
        load_audio(tmp_path / "d.m4a")
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_log_mel_shape_and_energy():
    cfg = AudioConfig.preset("tiny")
    w = _tone(16_000, 1.0, freq=1000.0)
    m = log_mel(w, cfg)
    assert m.shape == (1, cfg.n_mels, 1 + len(w) // cfg.hop_length) and m.dtype == np.float32
    band = m[0].mean(axis=1).argmax()
    import librosa

    centres = librosa.mel_frequencies(n_mels=cfg.n_mels + 2, fmin=cfg.fmin, fmax=cfg.fmax)[1:-1]
    assert abs(centres[band] - 1000) < 250
    silent = log_mel(np.zeros(16_000, np.float32), cfg)
    np.testing.assert_allclose(silent, np.log(cfg.log_floor), rtol=1e-5)
    with pytest.raises(AudioError):
        log_mel(np.zeros((2, 10), np.float32), cfg)
    with pytest.raises(KeyError):
        AudioConfig.preset("huge")
