"""HU windows, 2.5D slabs and resampling."""
from __future__ import annotations

import numpy as np
import pytest

from data.preprocess import (
    MIP_RADIOGRAPH_WINDOW, RADIOGRAPH_WINDOWS, WINDOWS, _resize_hw, make_slabs, resample_volume, slab_ranges,
    window_stack,
)
from data.study import Study


def _study(vol, kind="volume", spacing=(2.0, 1.0, 1.0)):
    z = vol.shape[0]
    return Study(volume=vol.astype(np.float32), spacing_mm=spacing, origin_mm=(0, 0, 0), direction=np.eye(3),
                 modality="CT" if kind == "volume" else "XR", kind=kind, series_description="", study_uid=None,
                 series_uid=None, sop_uids=[None] * z, slice_positions_mm=np.arange(z) * spacing[0] + 10.0,
                 source_format="dicom", picked_reason="")


def test_window_presets_and_values():
    assert WINDOWS == {"lung": (-600, 1500), "mediastinum": (50, 350), "bone": (500, 2000)}
    vol = np.array([-1350, -600, 150, -125, 225, 1500, -500], np.float32).reshape(1, 1, 7)
    out = window_stack(vol)
    assert out.shape == (1, 3, 1, 7) and out.dtype == np.float32
    lung, med, bone = out[0, :, 0]
    np.testing.assert_allclose(lung[:3], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(med[3:5], [0.0, 1.0])
    np.testing.assert_allclose(bone[5:7], [1.0, 0.0])
    assert out.min() >= 0 and out.max() <= 1


def test_window_stack_custom_and_errors():
    out = window_stack(np.zeros((2, 3, 4)), windows=[(0, 2), "lung"])
    assert out.shape == (2, 2, 3, 4)
    np.testing.assert_allclose(out[:, 0], 0.5)
    with pytest.raises(ValueError):
        window_stack(np.zeros((1, 1, 1)), windows=[(0, 0)])


def test_slab_ranges_cover_everything():
    r = slab_ranges(10, 4)
    assert r[0, 0] == 0 and r[-1, 1] == 10 and np.all(r[1:, 0] == r[:-1, 1]) and np.all(r[:, 1] > r[:, 0])
    r = slab_ranges(3, 8)                        # fewer slices than slabs: nearest slice, repeated
    assert r.shape == (8, 2) and np.all(r[:, 1] - r[:, 0] == 1) and set(r[:, 0]) == {0, 1, 2}


def test_make_slabs_mean_positions_and_shape():
    vol = np.zeros((8, 64, 64), np.float32)
    vol[:4] = -1000.0
    vol[4:] = 1000.0
    s = make_slabs(_study(vol), n_slabs=2, size_hw=(16, 16))
    assert s.pixels.shape == (2, 3, 16, 16) and s.pixels.dtype == np.float32
    np.testing.assert_array_equal(s.z_index_range, [[0, 4], [4, 8]])
    np.testing.assert_allclose(s.z_mm, [10 + 3.0, 10 + 11.0])
    np.testing.assert_allclose(s.pixels[0, 0], np.clip((-1000 + 1350) / 1500, 0, 1))
    np.testing.assert_allclose(s.pixels[1, 2], np.clip((1000 + 500) / 2000, 0, 1))


def test_make_slabs_mean_is_mean_not_mip():
    vol = np.zeros((2, 4, 4), np.float32)
    vol[0] = -600 - 750 + 300   # lung window value 0.2
    vol[1] = -600 - 750 + 900   # lung window value 0.6
    s = make_slabs(_study(vol), n_slabs=1, size_hw=(4, 4))
    np.testing.assert_allclose(s.pixels[0, 0], 0.4, atol=1e-6)


def test_mip_channel_keeps_a_one_slice_nodule_that_the_mean_dilutes():
    """mip_windows=("lung",): a 4th channel, the slab's maximum in the lung window. A solid
    nodule on one slice of a 4-slice slab keeps its full contrast there and a quarter of it in
    the mean channel; the three mean channels are unchanged."""
    vol = np.full((8, 16, 16), -850.0, np.float32)   # aerated lung
    vol[1, 7:9, 7:9] = 30.0                          # a small solid nodule on one slice
    plain = make_slabs(_study(vol), n_slabs=2, size_hw=(16, 16))
    s = make_slabs(_study(vol), n_slabs=2, size_hw=(16, 16), mip_windows=("lung",))
    assert s.pixels.shape == (2, 4, 16, 16)
    np.testing.assert_array_equal(s.pixels[:, :3], plain.pixels)
    lung = lambda hu: (hu + 1350) / 1500
    np.testing.assert_allclose(s.pixels[0, 3, 8, 8], lung(30.0), atol=1e-6)            # MIP: full contrast
    np.testing.assert_allclose(s.pixels[0, 0, 8, 8], lung((30.0 - 3 * 850) / 4), atol=1e-6)  # mean: a quarter
    np.testing.assert_allclose(s.pixels[1, 3], lung(-850.0), atol=1e-6)                # slab without it
    two = make_slabs(_study(vol), n_slabs=2, size_hw=(16, 16), mip_windows=("lung", "bone"))
    assert two.pixels.shape == (2, 5, 16, 16)
    np.testing.assert_allclose(two.pixels[0, 4, 8, 8], (30.0 - 500 + 1000) / 2000, atol=1e-6)
    with pytest.raises(ValueError, match="unknown MIP window"):
        make_slabs(_study(vol), n_slabs=2, size_hw=(16, 16), mip_windows=("soft",))


def test_mip_channel_shrinks_by_block_maximum_and_radiographs_reuse_their_window():
    img = np.zeros((1, 32, 32), np.float32)
    img[0, 5, 9] = 1.0                               # one bright pixel
    assert _resize_hw(img, (8, 8), reduce="max").max() == 1.0          # integer factor: block max
    assert _resize_hw(img, (8, 8)).max() == pytest.approx(1 / 16)      # mean: diluted
    assert _resize_hw(img, (10, 10), reduce="max").max() >= 0.99       # non-integer: max filter first
    with pytest.raises(ValueError):
        _resize_hw(img, (8, 8), reduce="median")
    xr = _study(np.linspace(0, 1, 30 * 30).reshape(1, 30, 30), kind="radiograph")
    r = make_slabs(xr, n_slabs=16, size_hw=(30, 30), mip_windows=("lung",))
    assert r.pixels.shape == (1, 4, 30, 30)
    assert MIP_RADIOGRAPH_WINDOW["lung"] == "full"
    np.testing.assert_allclose(r.pixels[0, 3], r.pixels[0, list(RADIOGRAPH_WINDOWS).index("full")])


def test_make_slabs_non_integer_resize_and_radiograph():
    vol = np.random.default_rng(0).uniform(-1000, 1000, (5, 50, 70)).astype(np.float32)
    s = make_slabs(_study(vol), n_slabs=3, size_hw=(32, 24))
    assert s.pixels.shape == (3, 3, 32, 24) and 0 <= s.pixels.min() and s.pixels.max() <= 1
    xr = _study(np.linspace(0, 1, 2 * 30 * 30).reshape(2, 30, 30), kind="radiograph")
    r = make_slabs(xr, n_slabs=16, size_hw=(10, 10))
    assert r.pixels.shape == (2, len(RADIOGRAPH_WINDOWS), 10, 10)
    np.testing.assert_array_equal(r.z_index_range, [[0, 1], [1, 2]])


def test_resample_volume_shape_spacing_and_values():
    vol = np.full((10, 20, 20), 7.0, np.float32)
    out, sp = resample_volume(vol, (2.0, 1.0, 1.0), new_shape=(5, 10, 10))
    assert out.shape == (5, 10, 10) and sp == pytest.approx((4.0, 2.0, 2.0))
    np.testing.assert_allclose(out, 7.0)
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 4))
    out, sp = resample_volume(ramp, (1.0, 1.0, 1.0), new_spacing_mm=(0.5, 1.0, 1.0))
    assert out.shape == (20, 4, 4) and np.all(np.diff(out[:, 0, 0]) >= 0)
    with pytest.raises(ValueError):
        resample_volume(vol)
