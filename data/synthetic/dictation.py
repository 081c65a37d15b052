"""Spoken indications: offline speech synthesis with eSpeak NG, varied voice / speed / pitch,
background noise, written as 16 kHz mono 16-bit wav.

eSpeak NG comes from the PyPI wheel ``espeakng-loader`` (bundles the library and its voice data;
no system install) or, failing that, a system ``espeak-ng`` executable (Debian: ``apt-get install
espeak-ng``). :func:`available` says whether either is there; the dataset writer then writes
studies without audio and says so. Only dataset generation needs this: tests and the demo use
the wav files shipped in ``examples/``.
"""
from __future__ import annotations

import ctypes
import io
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
VOICES = ("en-us", "en", "en-us+f3", "en+m3", "en-us+f2", "en+m5", "en-gb-x-rp", "en+f4")


class _LibEngine:
    """eSpeak NG through ctypes (the wheel ships the shared library, not Python bindings)."""

    AUDIO_OUTPUT_SYNCHRONOUS = 2
    RATE, PITCH = 1, 3
    END_PAUSE = 0x1000

    def __init__(self) -> None:
        import espeakng_loader  # optional dependency

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise OSError("espeak_Initialize failed")
        self._chunks: list[np.ndarray] = []
        cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def _cb(wav, n, _events):
            if wav and n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = cb_type(_cb)  # keep a reference: ctypes callbacks must outlive the call
        self.lib.espeak_SetSynthCallback(self._cb)

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            self.lib.espeak_SetVoiceByName(b"en")
        self.lib.espeak_SetParameter(self.RATE, int(rate), 0)
        self.lib.espeak_SetParameter(self.PITCH, int(pitch), 0)
        self._chunks = []
        buf = text.encode("utf-8") + b"\0"
        self.lib.espeak_Synth(buf, len(buf), 0, 0, 0, self.END_PAUSE, None, None)
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return audio.astype(np.float32) / 32768.0, self.rate


class _CliEngine:
    """A system ``espeak-ng`` executable writing wav to stdout."""

    def __init__(self, exe: str) -> None:
        self.exe = exe

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
        out = subprocess.run([self.exe, "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                             check=True, capture_output=True).stdout
        audio, sr = sf.read(io.BytesIO(out), dtype="float32")
        return audio, sr


_ENGINE: object | None = None  # one per process (eSpeak keeps global state); created on first use
_TRIED = False


def _engine():
    global _ENGINE, _TRIED
    if not _TRIED:
        _TRIED = True
        try:
            _ENGINE = _LibEngine()
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next engine"
            log.debug("espeakng-loader unavailable: %s", exc)
            exe = shutil.which("espeak-ng")
            _ENGINE = _CliEngine(exe) if exe else None
    return _ENGINE


def available() -> bool:
    """True if an eSpeak NG engine (wheel or executable) can be used."""
    return _engine() is not None


def _synth_isolated(eng, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """Synthesise in a forked child: eSpeak NG keeps internal state between utterances (the
    same text comes out a few samples different after other text), so each utterance gets a
    fresh copy of the just-initialised engine and the audio is a pure function of its inputs."""
    if not hasattr(os, "fork") or not isinstance(eng, _LibEngine):
        return eng.synth(text, voice, rate, pitch)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: synthesise, send, exit without running the parent's cleanup
        code = 1
        try:
            os.close(r)
            try:  # voice variants add random breath noise: fix eSpeak's seed (and libc's)
                eng.lib.espeak_ng_SetRandSeed(1)
                ctypes.CDLL(None).srand(1)
            except (OSError, AttributeError):
                pass
            audio, sr = eng.synth(text, voice, rate, pitch)
            payload = np.int64(sr).tobytes() + audio.astype(np.float32).tobytes()
            with os.fdopen(w, "wb") as f:
                f.write(payload)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or len(payload) < 8:
        raise RuntimeError("speech synthesis failed in the child process")
    sr = int(np.frombuffer(payload[:8], np.int64)[0])
    return np.frombuffer(payload[8:], np.float32).copy(), sr


def synthesize(text: str, rng: np.random.Generator) -> np.ndarray:
    """``text`` spoken with a random voice, speed, pitch and background noise: float32 at 16 kHz."""
    eng = _engine()
    if eng is None:
        raise RuntimeError("no speech synthesizer: pip install espeakng-loader (or apt-get install espeak-ng)")
    voice = str(rng.choice(VOICES))
    rate = int(rng.integers(135, 195))
    pitch = int(rng.integers(25, 75))
    audio, sr = _synth_isolated(eng, text, voice, rate, pitch)
    if sr != SAMPLE_RATE:
        audio = soxr.resample(audio, sr, SAMPLE_RATE)
    lead = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), np.float32)
    audio = np.concatenate([lead, audio.astype(np.float32), lead[: len(lead) // 2]])
    gain = float(rng.uniform(0.4, 0.9)) / max(float(np.abs(audio).max()), 1e-6)
    audio = audio * gain
    snr_db = float(rng.uniform(12, 35))
    p_sig = float(np.mean(audio**2)) + 1e-12
    noise = rng.standard_normal(len(audio)).astype(np.float32)
    hum = np.sin(2 * np.pi * float(rng.choice([50.0, 60.0])) * np.arange(len(audio)) / SAMPLE_RATE).astype(np.float32)
    noise = noise + 0.5 * hum
    noise *= np.sqrt(p_sig / (10 ** (snr_db / 10)) / (float(np.mean(noise**2)) + 1e-12))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray) -> None:
    """16 kHz mono PCM-16 wav."""
    sf.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16")
