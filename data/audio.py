"""Dictation audio -> mono waveform at the model's rate -> log-mel spectrogram.

Reading: ``soundfile`` (libsndfile: wav, flac, ogg/vorbis/opus, mp3 with libsndfile >= 1.1).
Resampling: ``soxr`` (high quality, fast). Mel filterbank and STFT: ``librosa``
(``librosa.feature.melspectrogram``), a maintained reference implementation.
Output of ``log_mel``: float32 (1, n_mels, T), natural log of mel power with a floor
(``log(mel + 1e-6)``), T = 1 + len(wave) // hop_length.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.errors import AudioError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


@dataclass(frozen=True)
class AudioConfig:
    """Front-end of the audio encoder (25 ms windows, 10 ms hop at 16 kHz by default)."""

    sample_rate: int = 16_000
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    win_length: int = 400
    fmin: float = 0.0
    fmax: float | None = 8_000.0
    max_seconds: float = 300.0
    log_floor: float = 1e-6

    @classmethod
    def preset(cls, name: str) -> "AudioConfig":
        """``tiny`` (tests), ``demo`` (CPU demo), ``full``."""
        presets = {
            "tiny": cls(n_mels=32, max_seconds=30.0),
            "demo": cls(n_mels=64, max_seconds=120.0),
            "full": cls(),
        }
        if name not in presets:
            raise KeyError(f"unknown audio preset {name!r}; choose from {sorted(presets)}")
        return presets[name]


def load_audio(path: str | Path, sr: int = 16_000, max_seconds: float | None = 300.0) -> np.ndarray:
    """Read ``path`` as float32 mono at ``sr`` Hz. Longer than ``max_seconds`` -> ``AudioError``."""
    import soundfile as sf
    import soxr

    path = Path(path)
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise AudioError(f"{path.name}: unsupported audio type {path.suffix or '(none)'}; use {', '.join(sorted(AUDIO_SUFFIXES))}")
    if not path.is_file():
        raise AudioError(f"{path.name} does not exist; check the path")
    try:
        info = sf.info(str(path))
        if info.samplerate <= 0 or info.channels <= 0:
            raise AudioError(f"{path.name} has no audio stream; re-record or re-export it")
        # Frame counts of some mp3/ogg files are estimates; the read below checks the real length.
        if max_seconds is not None and info.frames > 0 and info.frames / info.samplerate > max_seconds * 1.01:
            raise AudioError(
                f"{path.name} is {info.frames / info.samplerate:.0f} s long; the limit is {max_seconds:.0f} s. Trim the dictation"
            )
        limit = None if max_seconds is None else int(max_seconds * info.samplerate * 1.01) + 1
        wave, file_sr = sf.read(str(path), dtype="float32", always_2d=True, frames=-1 if limit is None else limit + 1)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        raise AudioError(f"{path.name} could not be decoded as audio ({exc.__class__.__name__}); export it as WAV or FLAC") from None
    if limit is not None and wave.shape[0] > limit:
        raise AudioError(f"{path.name} is longer than the {max_seconds:.0f} s limit; trim the dictation")
    if wave.shape[0] == 0:
        raise AudioError(f"{path.name} contains no samples; re-record it")
    mono = wave.mean(axis=1, dtype=np.float32)                   # (T, C) -> (T,)
    if file_sr != sr:
        mono = soxr.resample(mono, file_sr, sr, quality="HQ").astype(np.float32, copy=False)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path.name} holds non-finite samples; re-export it")
    return np.ascontiguousarray(mono, dtype=np.float32)


def log_mel(wave: np.ndarray, cfg: AudioConfig = AudioConfig()) -> np.ndarray:
    """float32 mono waveform at ``cfg.sample_rate`` -> float32 (1, n_mels, T) log-mel power."""
    import librosa

    w = np.asarray(wave, dtype=np.float32)
    if w.ndim != 1 or w.size == 0:
        raise AudioError(f"expected a non-empty mono waveform, got shape {w.shape}")
    mel = librosa.feature.melspectrogram(
        y=w, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
        n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, power=2.0, center=True, pad_mode="constant",
    )                                                            # (n_mels, T)
    return np.log(mel + cfg.log_floor).astype(np.float32)[None]  # (1, n_mels, T)
