"""PNG/JPEG radiographs: [0, 1] intensities, one z index per view."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.errors import PixelDecodeError
from data.study import load_study


def test_png_8bit(tmp_path):
    arr = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    Image.fromarray(arr).save(tmp_path / "cxr.png")
    s = load_study(tmp_path / "cxr.png")
    assert s.kind == "radiograph" and s.modality == "XR" and s.source_format == "image2d"
    assert s.shape == (1, 10, 64)
    np.testing.assert_allclose(s.volume[0], arr / 255.0, atol=1e-6)
    assert any("no pixel spacing" in w for w in s.warnings)


def test_png_16bit_12bit_data_not_dark(tmp_path):
    arr = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 40)      # max 3960 < 4095
    Image.fromarray(arr).save(tmp_path / "cxr.png")
    s = load_study(tmp_path / "cxr.png")
    assert s.volume.max() == pytest.approx(3960 / 4095)


def test_rgb_jpeg_and_two_views(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "frontal.jpg")
    Image.fromarray(np.full((40, 20), 50, np.uint8)).save(tmp_path / "lateral.png")
    s = load_study(tmp_path)
    assert s.shape == (2, 20, 30)
    assert s.sop_uids == [None, None]
    assert abs(s.volume[0].mean() - 200 / 255) < 0.02 and abs(s.volume[1].mean() - 50 / 255) < 0.02


def test_corrupt_png(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(PixelDecodeError, match="PNG"):
        load_study(tmp_path / "x.png")
