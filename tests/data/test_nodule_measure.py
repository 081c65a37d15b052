"""data.nodule_measure: lung mask, ball-vs-tube ranking, axial diameter, side selection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.detectors import read_study
from data.nodule_measure import (LungLookup, axial_diameter_mm, fit_ball_diameter, largest_axial_diameter, lung_mask,
                                 measure_by_side, measure_nodule, nodule_candidates)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPACING = (5.0, 2.5, 2.5)  # z, y, x mm


def _soft_ball(shape, spacing, centre_mm, radius_mm, edge_mm):
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    d = np.sqrt((z - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2)
    return np.clip((radius_mm - d) / edge_mm + 0.5, 0.0, 1.0)


def _chest(nodule_mm=12.0, nodule_side="right", seed=0):
    """A box chest: soft tissue around two air-filled lungs, a vertical vessel (a tube of 3 mm
    radius at 40 HU) in each lung, and a solid nodule (32 HU) with partial volume in one."""
    rng = np.random.default_rng(seed)
    shape = (24, 96, 128)
    hu = np.full(shape, 40.0, np.float32)
    hu[2:-2, 12:-12, 10:60] = -850.0   # image left half = patient right (LPS +x to the left)
    hu[2:-2, 12:-12, 68:118] = -850.0
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING)), indexing="ij")
    for cx in (25 * 2.5, 100 * 2.5):  # vessels along z
        tube = np.clip((3.0 - np.sqrt((y - 40 * 2.5) ** 2 + (x - cx) ** 2)) / 2.5 + 0.5, 0, 1) * (z > 10) * (z < 100)
        hu += tube * (40.0 - hu)
    cx = 35 * 2.5 if nodule_side == "right" else 93 * 2.5
    w = _soft_ball(shape, SPACING, (12 * 5.0, 60 * 2.5, cx), nodule_mm / 2, 2.5)
    hu += w * (32.0 - hu)
    hu += rng.normal(0, 8.0, shape).astype(np.float32)
    return hu, (12, 60, int(round(cx / 2.5)))


def test_lung_mask_holds_the_lungs_and_what_lies_inside_them():
    hu, centre = _chest()
    lung = lung_mask(hu)
    assert lung[centre]  # the nodule sits inside the (hole-filled) lung
    assert not lung[0, 0, 0] and not lung[12, 50, 64]  # outside air / the mediastinum
    assert lung_mask(np.full((4, 16, 16), 40.0)).sum() == 0


@pytest.mark.parametrize("size", [8.0, 12.0, 16.0])
def test_the_ball_ranks_above_the_tubes_and_measures_to_the_millimetre(size):
    hu, centre = _chest(size)
    cands = nodule_candidates(hu, SPACING)
    (cz, cy, cx), _ = cands[0]
    assert abs(cz - centre[0]) <= 1 and abs(cy - centre[1]) <= 2 and abs(cx - centre[2]) <= 2
    _, d = largest_axial_diameter(hu, SPACING, cands[0][0])
    assert round(d) == size
    m = measure_nodule(hu, SPACING)
    assert m is not None and m.size_mm == size


def test_side_selection_follows_the_column_direction():
    hu, _ = _chest(12.0, "right")
    by = measure_by_side(hu, SPACING)
    assert by["right"].size_mm == 12 and by["any"].size_mm == 12
    assert "left" not in by or by["left"].size_mm != 12  # only vessels on the left
    assert measure_nodule(hu, SPACING, side="right").size_mm == 12
    # the same image with patient-left on the low columns: the nodule is on the patient's left
    assert measure_nodule(hu, SPACING, side="left", patient_left_is_high_x=False).size_mm == 12
    assert measure_nodule(hu, SPACING, side="right", size_range_mm=(20, 30)) is None


def test_nothing_to_measure_gives_nothing():
    flat = np.full((8, 32, 32), -850.0, np.float32)
    assert measure_nodule(flat, SPACING) is None and measure_by_side(flat, SPACING) == {}
    assert measure_nodule(np.zeros((1, 8, 8), np.float32), SPACING) is None  # a single slice
    assert axial_diameter_mm(flat, SPACING, (4, 16, 16)) is None  # no contrast to the lung


def test_bundled_follow_up_study_measures_its_nodule():
    """examples/syn00001: a demo-size CT with a known right-lung nodule (its size in the manifest)."""
    from data.study import load_study

    entry = next(json.loads(line) for line in open(EXAMPLES / "manifest.jsonl") if '"syn00001"' in line)
    label = next(lab for lab in entry["labels"] if lab["finding"] == "nodule" and lab["present"])
    sizes = read_study(load_study(EXAMPLES / "studies" / "syn00001")).sizes_mm
    assert sizes[label["side"]] == label["size_mm"]


def test_a_radiograph_is_not_measured(tmp_path):
    from PIL import Image

    from data.study import load_study

    img = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "chest.png")
    study = load_study(tmp_path / "chest.png")
    assert study.kind == "radiograph" and read_study(study).sizes_mm == {}
    assert read_study(study).evidence == {}  # no detector evidence: the heads alone


def test_detector_evidence_is_higher_with_a_nodule_than_with_vessels_alone():
    """The evidence the heads fuse (data.nodule_measure.detector_evidence): the same chest with a
    12 mm ball scores well above the one with only its tubes, and an empty lung gets the floor."""
    from data.nodule_measure import EVIDENCE_FLOOR, detector_evidence

    with_ball, _ = _chest(12.0)
    without, _ = _chest(0.0)
    e1 = detector_evidence(nodule_candidates(with_ball, SPACING))
    e0 = detector_evidence(nodule_candidates(without, SPACING))
    assert e1 > e0 + 1.0
    flat = np.full((8, 32, 32), -850.0, np.float32)
    assert detector_evidence(nodule_candidates(flat, SPACING)) == pytest.approx(np.log(EVIDENCE_FLOOR))


def test_coarse_grid_block_means_only_a_fine_volume():
    from data.nodule_measure import coarse_grid

    v = np.arange(4 * 9 * 10, dtype=np.float32).reshape(4, 9, 10)
    same, sp, f = coarse_grid(v, (5.0, 2.7, 2.7))
    assert f == (1, 1, 1) and same.shape == v.shape and sp == (5.0, 2.7, 2.7)  # demo geometry: searched as it is
    c, sp, f = coarse_grid(v, (1.0, 0.7, 1.1))
    assert f == (1, 3, 2) and c.shape == (4, 3, 5) and sp == pytest.approx((1.0, 2.1, 2.2))  # z kept >= 3 voxels
    assert c[0, 0, 0] == pytest.approx(v[0, :3, :2].mean()) and c[3, 2, 4] == pytest.approx(v[3, 6:9, 8:10].mean())


def test_a_fine_volume_is_searched_coarse_and_measured_fine():
    """The box chest at 1 x 0.83 x 0.83 mm (each voxel of the 5 x 2.5 x 2.5 mm chest repeated): the
    search runs on 2 x 2 x 2 blocks and its centres map back into the fine volume, where the 12 mm
    ball is measured; the spine scores read the same blocks."""
    hu, centre = _chest(12.0)
    fine = np.repeat(np.repeat(np.repeat(hu, 5, axis=0), 3, axis=1), 3, axis=2)
    spacing = (1.0, 2.5 / 3, 2.5 / 3)
    (cz, cy, cx), _ = nodule_candidates(fine, spacing)[0]
    assert abs(cz - (centre[0] * 5 + 2)) <= 3 and abs(cy - (centre[1] * 3 + 1)) <= 4 and abs(cx - (centre[2] * 3 + 1)) <= 4
    m = measure_nodule(fine, spacing)
    assert m is not None and abs(m.size_mm - 12) <= 1


def _chest_with_ball(size_mm: float, dz_mm: float, centre=(12, 60, 35)):
    """The box chest (vessels only) with a solid ball whose centre lies ``dz_mm`` above a slice centre."""
    hu, _ = _chest(0.0)
    c_mm = (centre[0] * SPACING[0] + dz_mm, centre[1] * SPACING[1], centre[2] * SPACING[2])
    hu += _soft_ball(hu.shape, SPACING, c_mm, size_mm / 2, SPACING[1]) * (32.0 - hu)
    return hu, centre


@pytest.mark.parametrize("size", [5.0, 7.0, 10.0])
@pytest.mark.parametrize("dz", [0.0, 2.5])
def test_the_ball_fit_measures_a_ball_between_slices(size, dz):
    """A ball cut off its equator by 5 mm slices (centre half-way between two): the fit reads the
    diameter to half a millimetre from every slice that cuts it; the one-slice caliper reads the
    narrower cut (a 10 mm ball half-way between slices: about 8 mm)."""
    hu, centre = _chest_with_ball(size, dz)
    d = fit_ball_diameter(hu, SPACING, centre)
    assert d is not None and abs(d - size) < 0.5
    if size == 10.0 and dz == 2.5:
        _, caliper = largest_axial_diameter(hu, SPACING, centre)
        assert caliper < size - 1.0


def test_the_ball_fit_keeps_to_the_lung_beside_the_chest_wall():
    """A 9 mm ball touching the chest wall (the soft tissue outside the lung): fitted only on the
    lung's voxels it is not pulled into the wall; fitted on every voxel of the box it would be."""
    hu, _ = _chest(0.0)
    centre = (12, 60, 11)  # the lung's outer edge is at column 10: the candidate sits next to the wall
    c_mm = (centre[0] * SPACING[0], centre[1] * SPACING[1], 11.5 * SPACING[2])
    hu += _soft_ball(hu.shape, SPACING, c_mm, 4.5, SPACING[1]) * (32.0 - hu)
    d = fit_ball_diameter(hu, SPACING, centre)
    assert d is not None and abs(d - 9.0) < 0.5
    everywhere = LungLookup(hu, SPACING)
    everywhere.mask = np.ones_like(everywhere.mask)
    d_all = fit_ball_diameter(hu, SPACING, centre, everywhere)
    assert d_all is None or abs(d_all - 9.0) > 5.0  # the wall taken for a ball


def test_the_ball_fit_needs_a_ball_and_measure_can_use_the_caliper():
    flat = np.full((8, 32, 32), -850.0, np.float32)
    flat[:, :2], flat[:, -2:] = 40.0, 40.0
    assert fit_ball_diameter(flat, SPACING, (4, 16, 16)) is None  # nothing denser than the lung there
    hu, _ = _chest_with_ball(10.0, 2.5)
    fitted = measure_nodule(hu, SPACING)
    caliper = measure_nodule(hu, SPACING, method="caliper")
    assert fitted.size_mm == 10 and caliper.size_mm < 10
    with pytest.raises(ValueError, match="method"):
        measure_nodule(hu, SPACING, method="calipers")
