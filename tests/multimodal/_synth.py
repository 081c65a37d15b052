"""Tiny in-test data for the "model uses each modality" and evidence tests.

Volumes: S slabs of a body ellipse with noise; a finding (nodule) is a bright blob planted in one
slab. Audio: log-mel noise; a finding (pleural effusion) is a bright band of mel bins. History:
random tokens carrying no information.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multimodal.model import StudyInputs

S, HW, N_MELS, T_FRAMES = 2, 32, 32, 64
BLOB_R = 4.0
_yy, _xx = np.mgrid[0:HW, 0:HW]
C = HW / 2
BODY = ((_yy - C) / (0.44 * HW)) ** 2 + ((_xx - C) / (0.38 * HW)) ** 2 <= 1.0  # (H, W)


@dataclass
class Case:
    study: StudyInputs
    blob: tuple[int, float, float] | None  # (slab, y, x)
    band: bool


def volume(rng: np.random.Generator, blob: tuple[int, float, float] | None) -> np.ndarray:
    vol = np.where(BODY, 0.4, 0.05)[None].repeat(S, 0) + rng.normal(0, 0.05, (S, HW, HW))
    if blob is not None:
        s, y, x = blob
        vol[s][(_yy - y) ** 2 + (_xx - x) ** 2 <= BLOB_R**2] = 0.95
    return np.clip(vol, 0, 1).astype(np.float32)[:, None].repeat(3, 1)  # (S, 3, H, W)


def mel(rng: np.random.Generator, band: bool) -> np.ndarray:
    m = rng.normal(0, 1, (N_MELS, T_FRAMES)).astype(np.float32)
    if band:
        m[10:15] += 3.0
    return m


def random_blob(rng: np.random.Generator) -> tuple[int, float, float]:
    while True:
        y, x = rng.uniform(0.2 * HW, 0.8 * HW, 2)
        if ((y - C) / (0.3 * HW)) ** 2 + ((x - C) / (0.25 * HW)) ** 2 <= 1.0:
            return int(rng.integers(S)), float(y), float(x)


def make_case(rng, blob, band, audio=True, history=True) -> Case:
    vol = volume(rng, blob)
    return Case(
        StudyInputs(
            pixels=vol,
            z_mm=np.arange(S) * 10.0,
            z_index_range=np.stack([np.arange(S) * 3, np.arange(S) * 3 + 3], 1),
            mel=mel(rng, band) if audio else None,
            history_ids=list(rng.integers(5, 60, 24)) if history else None,
        ),
        blob, band,
    )


def inside_blob(peak_syx: tuple[int, int, int], blob: tuple[int, float, float]) -> bool:
    s, y, x = peak_syx
    return s == blob[0] and (y - blob[1]) ** 2 + (x - blob[2]) ** 2 <= BLOB_R**2


def chance_share() -> float:
    """Blob voxels over body voxels: the hit rate of a random peak inside the body."""
    return float(np.pi * BLOB_R**2 / (BODY.sum() * S))
