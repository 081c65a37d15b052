"""Pure, vectorised array functions that turn a ``Study`` into encoder input.

Shape legend: Z original slices, S slabs, C window channels (3), Y/X original rows/cols,
H/W output rows/cols.

* ``window_stack``: HU -> C windows in [0, 1] (lung W1500/L-600, mediastinum W350/L50,
  bone W2000/L500), stacked as channels.
* ``make_slabs`` (2.5D): the z axis is split into ``n_slabs`` contiguous runs of original
  slices; each slab is the **mean** HU of its slices (mean rather than MIP: it keeps
  soft-tissue contrast and averages noise; a MIP would exaggerate vessels in the lung
  window), resized in-plane to (H, W) and rendered in the three windows. With fewer
  slices than slabs, slab i takes the nearest single slice (runs repeat). Radiographs give
  one slab per view (S == z, 1 for a single image) rendered with ``RADIOGRAPH_WINDOWS``
  on their [0, 1] intensities.
  Optional extra channels (``mip_windows``): the slab's maximum-intensity projection rendered in
  a window, after the three mean channels. A small solid nodule is one slice of a 4-slice slab
  and loses 3/4 of its contrast in the mean; the MIP keeps all of it (radiologists read lung
  nodules on MIP slabs for that reason). In-plane shrinking of a MIP channel keeps the block
  maximum, for the same reason. A radiograph's MIP channel is its single image in the matching
  radiograph window (``MIP_RADIOGRAPH_WINDOW``).
* ``resample_volume``: trilinear resampling to a target shape or spacing (scipy.ndimage).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from data.study import Study

# (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (500.0, 2000.0),
}
# (level, width) on [0, 1] radiograph intensities: full range, mid-contrast (soft tissue),
# bright (bone / devices).
RADIOGRAPH_WINDOWS: dict[str, tuple[float, float]] = {
    "full": (0.5, 1.0),
    "soft": (0.5, 0.5),
    "bright": (0.75, 0.5),
}
DEFAULT_WINDOWS = ("lung", "mediastinum", "bone")
# A CT window's counterpart on a radiograph (the radiograph's MIP over one image is the image).
MIP_RADIOGRAPH_WINDOW: dict[str, str] = {"lung": "full", "mediastinum": "soft", "bone": "bright"}


@dataclass
class Slabs:
    """Encoder input for one study."""

    pixels: np.ndarray          # float32 (S, C, H, W) in [0, 1]
    z_mm: np.ndarray            # float64 (S,) slab centre positions along the slice normal
    z_index_range: np.ndarray   # int64 (S, 2) original slice index range [start, stop)


def window_stack(volume: np.ndarray, windows: Sequence[str] | Sequence[tuple[float, float]] = DEFAULT_WINDOWS,
                 presets: dict[str, tuple[float, float]] = WINDOWS) -> np.ndarray:
    """(Z, Y, X) values -> float32 (Z, C, Y, X) in [0, 1], one channel per window.

    ``windows`` are preset names or explicit (level, width) pairs.
    """
    lw = np.asarray([presets[w] if isinstance(w, str) else w for w in windows], dtype=np.float32)  # (C, 2)
    if lw.ndim != 2 or lw.shape[1] != 2 or np.any(lw[:, 1] <= 0):
        raise ValueError("windows must be names or (level, width) pairs with width > 0")
    lo = (lw[:, 0] - lw[:, 1] / 2)[None, :, None, None]              # (1, C, 1, 1)
    inv_w = (1.0 / lw[:, 1])[None, :, None, None]                    # (1, C, 1, 1)
    v = np.asarray(volume, dtype=np.float32)[:, None]                # (Z, 1, Y, X)
    out = (v - lo) * inv_w                                           # (Z, C, Y, X)
    return np.clip(out, 0.0, 1.0, out=out)


def _resize_hw(arr: np.ndarray, size_hw: tuple[int, int], reduce: str = "mean") -> np.ndarray:
    """(N, Y, X) -> float32 (N, H, W). Integer downscales reduce blocks (``mean``: exact area
    filter; ``max``: block maximum, for MIP channels); otherwise linear interpolation,
    prefiltered when shrinking (Gaussian anti-aliasing, or a maximum filter for ``max``)."""
    n, y, x = arr.shape
    h, w = size_hw
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if (y, x) == (h, w):
        return arr.astype(np.float32, copy=False)
    if y % h == 0 and x % w == 0:
        fy, fx = y // h, x // w
        blocks = arr.reshape(n, h, fy, w, fx)                         # (N, H, fy, W, fx)
        if reduce == "max":
            return blocks.max(axis=(2, 4)).astype(np.float32, copy=False)  # (N, H, W)
        return blocks.mean(axis=(2, 4), dtype=np.float32)            # (N, H, W)
    from scipy import ndimage

    zy, zx = h / y, w / x
    src = arr.astype(np.float32, copy=False)
    if zy < 1 or zx < 1:
        if reduce == "max":
            size = (1, max(1, int(np.ceil(1 / zy))), max(1, int(np.ceil(1 / zx))))
            src = ndimage.maximum_filter(src, size=size, mode="nearest")
        else:
            sigma = (0.0, max(0.0, (1 / zy - 1) / 2), max(0.0, (1 / zx - 1) / 2))
            src = ndimage.gaussian_filter(src, sigma=sigma, mode="nearest")
    out = ndimage.zoom(src, (1.0, zy, zx), order=1, mode="nearest", grid_mode=True)
    return out[:, :h, :w].astype(np.float32, copy=False)


def slab_ranges(n_slices: int, n_slabs: int) -> np.ndarray:
    """(S, 2) [start, stop) index ranges covering ``n_slices`` with ``n_slabs`` contiguous runs."""
    if n_slices < 1 or n_slabs < 1:
        raise ValueError("need at least one slice and one slab")
    if n_slices >= n_slabs:
        edges = np.floor(np.linspace(0, n_slices, n_slabs + 1)).astype(np.int64)
        return np.stack([edges[:-1], edges[1:]], axis=1)
    centre = np.floor((np.arange(n_slabs) + 0.5) * n_slices / n_slabs).astype(np.int64)
    return np.stack([centre, centre + 1], axis=1)


def make_slabs(study: "Study", n_slabs: int, size_hw: tuple[int, int],
               windows: Sequence[str] | None = None, mip_windows: Sequence[str] = ()) -> Slabs:
    """2.5D encoder input: (S, C, H, W) windowed slab images plus their z positions.

    C = 3 mean channels (``windows``, default lung / mediastinum / bone) + one MIP channel per
    name in ``mip_windows`` (CT window names)."""
    unknown = [w for w in mip_windows if w not in WINDOWS]
    if unknown:
        raise ValueError(f"unknown MIP window(s) {unknown}; use names from {sorted(WINDOWS)}")
    vol = study.volume                                               # (Z, Y, X)
    pos = np.asarray(study.slice_positions_mm, dtype=np.float64)
    if study.kind == "radiograph":
        ranges = np.stack([np.arange(vol.shape[0]), np.arange(vol.shape[0]) + 1], axis=1)
        means = maxes = vol                                          # (S=Z, Y, X)
        presets, default = RADIOGRAPH_WINDOWS, tuple(RADIOGRAPH_WINDOWS)
        mip = [MIP_RADIOGRAPH_WINDOW[w] for w in mip_windows]
    else:
        ranges = slab_ranges(vol.shape[0], n_slabs)                  # (S, 2)
        if vol.shape[0] >= n_slabs:
            counts = (ranges[:, 1] - ranges[:, 0]).astype(np.float32)
            sums = np.add.reduceat(vol, ranges[:, 0], axis=0, dtype=np.float32)  # (S, Y, X)
            means = sums / counts[:, None, None]
            maxes = np.maximum.reduceat(vol, ranges[:, 0], axis=0) if mip_windows else None  # (S, Y, X)
        else:
            means = maxes = vol[ranges[:, 0]]                        # (S, Y, X)
        presets, default = WINDOWS, DEFAULT_WINDOWS
        mip = list(mip_windows)
    small = _resize_hw(means, size_hw)                               # (S, H, W)
    pixels = window_stack(small, windows or default, presets=presets)  # (S, C, H, W)
    if mip:
        small_max = _resize_hw(maxes, size_hw, reduce="max")         # (S, H, W)
        pixels = np.concatenate([pixels, window_stack(small_max, mip, presets=presets)], axis=1)  # (S, C+M, H, W)
    csum = np.concatenate([[0.0], np.cumsum(pos)])
    z_mm = (csum[ranges[:, 1]] - csum[ranges[:, 0]]) / (ranges[:, 1] - ranges[:, 0])
    return Slabs(pixels=np.ascontiguousarray(pixels, dtype=np.float32), z_mm=z_mm, z_index_range=ranges.astype(np.int64))


def resample_volume(volume: np.ndarray, spacing_mm: Sequence[float] | None = None, *,
                    new_spacing_mm: Sequence[float] | None = None,
                    new_shape: Sequence[int] | None = None, order: int = 1) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample (Z, Y, X) to ``new_shape`` or ``new_spacing_mm``; returns (volume, new spacing).

    Linear interpolation by default (``order=1``) with grid-mode alignment, so voxel
    edges, not centres, map onto each other (the field of view is preserved).
    """
    from scipy import ndimage

    shape = np.asarray(volume.shape, dtype=np.float64)
    spacing = np.asarray(spacing_mm if spacing_mm is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    if new_shape is None:
        if new_spacing_mm is None:
            raise ValueError("give new_shape or new_spacing_mm")
        new_shape = np.maximum(1, np.round(shape * spacing / np.asarray(new_spacing_mm, dtype=np.float64))).astype(int)
    new_shape = np.asarray(new_shape, dtype=int)
    if np.any(new_shape < 1):
        raise ValueError("new_shape must be positive")
    zoom = new_shape / shape
    out = ndimage.zoom(np.asarray(volume, dtype=np.float32), zoom, order=order, mode="nearest", grid_mode=True)
    out = out[: new_shape[0], : new_shape[1], : new_shape[2]]
    new_spacing = tuple(float(s) for s in spacing * shape / new_shape)
    return out.astype(np.float32, copy=False), new_spacing  # type: ignore[return-value]
