"""2D radiographs from PNG/JPEG (Pillow) as a one-slice-per-view study.

Radiographs carry no Hounsfield units. Their intensities are scaled to [0, 1] with
*higher = brighter = more attenuating* (DICOM MONOCHROME1 is inverted to match):

* PNG/JPEG: divided by the full scale of the stored bit depth (8-bit: 255; 16-bit: the
  smallest ``2**k - 1`` that holds the image maximum, so 12-bit data in 16-bit PNGs is not
  left dark);
* DICOM CR/DX: after the modality LUT, min-max scaled between the 0.5th and 99.5th
  percentile (clipped), because stored ranges vary by vendor.

Several views (frontal, lateral) become the z axis: each is resized (bilinear) to the
size of the first view, so ``volume`` is (views, y, x). ``data.preprocess`` renders them
with ``RADIOGRAPH_WINDOWS`` instead of HU windows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.errors import PixelDecodeError, StudyTooLargeError, UnsupportedFormatError

if TYPE_CHECKING:
    from data.study import LoadLimits, Study

log = logging.getLogger(__name__)

IMAGE2D_SUFFIXES = {".png", ".jpg", ".jpeg"}


def normalise_radiograph(values: np.ndarray, invert: bool = False) -> np.ndarray:
    """Robust [0, 1] scaling (0.5-99.5th percentile) of a 2D array; ``invert`` for MONOCHROME1."""
    v = np.asarray(values, dtype=np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5]) if v.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = float(v.min(initial=0.0)), float(v.max(initial=1.0))
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    out = np.clip((v - lo) * scale, 0.0, 1.0, dtype=np.float32)
    if invert:
        out = 1.0 - out
    return out


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.float32)).resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float32)


def stack_views(images: list[np.ndarray]) -> tuple[np.ndarray, bool]:
    """Stack 2D views into (V, Y, X) float32, resizing to the first view's size when needed."""
    hw = images[0].shape
    resized = any(im.shape != hw for im in images)
    vol = np.empty((len(images), *hw), dtype=np.float32)      # (V, Y, X)
    for i, im in enumerate(images):
        vol[i] = im if im.shape == hw else _resize(im, hw)
    return vol, resized


def read_image2d(path: Path, max_pixels: int = 100_000_000) -> np.ndarray:
    """One PNG/JPEG as float32 (Y, X) in [0, 1] (colour converted to luminance)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise StudyTooLargeError(f"{path.name} has {im.width}x{im.height} pixels, above the limit; downscale it")
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = float(arr.max(initial=0.0))
                full = float(2 ** max(8, int(np.ceil(np.log2(peak + 1)))) - 1) if peak > 0 else 1.0
                return (arr / full).astype(np.float32)
            if mode == "F":
                return normalise_radiograph(np.asarray(im, dtype=np.float32))
            if mode not in ("L", "1"):
                im = im.convert("L")                                 # ITU-R 601 luma for colour images
            return np.asarray(im, dtype=np.float32) / 255.0
    except StudyTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, Exception) as exc:
        raise PixelDecodeError(f"{path.name} could not be read as an image ({exc.__class__.__name__}); re-save it as PNG") from None


def load_image2d(paths: list[Path], limits: "LoadLimits", skipped_files: list[dict] | None = None,
                 warnings: list[str] | None = None) -> "Study":
    """PNG/JPEG radiograph views as a ``Study`` of kind "radiograph" (modality "XR")."""
    from data.study import Study

    if not paths:
        raise UnsupportedFormatError("no PNG/JPEG images given")
    warn = list(warnings or [])
    images = [read_image2d(p) for p in sorted(paths)]
    vol, resized = stack_views(images)
    if resized:
        warn.append(f"{len(images)} views of different sizes were resized to {vol.shape[1]}x{vol.shape[2]}")
    warn.append("PNG/JPEG carries no pixel spacing or Hounsfield units: spacing assumed 1 mm, intensities in [0, 1]")
    return Study(
        volume=vol, spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0), direction=np.eye(3),
        modality="XR", kind="radiograph", series_description="",
        study_uid=None, series_uid=None, sop_uids=[None] * len(images),
        slice_positions_mm=np.arange(len(images), dtype=np.float64),
        source_format="image2d",
        picked_reason=f"{len(images)} PNG/JPEG radiograph view{'s' if len(images) != 1 else ''}, one per z index",
        skipped_series=[], skipped_files=list(skipped_files or []), warnings=warn,
        metadata={"n_files": len(images)},
    )
