"""data.node_measure: the trachea and carina found, an enlarged node near the airway scored above a
chest without one, its station named, either slice order; and read_study's node evidence."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.node_measure import node_candidates, node_evidence, station_of, tracheal_air

SPACING = (5.0, 2.5, 2.5)  # z, y, x mm
SHAPE = (48, 96, 128)
CARINA_Z = 26  # the trachea runs from here to the top slice


def _chest(node: tuple[float, float, float] | None = None, radius_mm: float = 9.0, seed: int = 0) -> np.ndarray:
    """A chest of mediastinal fat (-90 HU) in air: two lungs (-860 HU), a trachea (air lumen of
    8.5 mm radius in a 3 mm soft-tissue wall) from the top slice down to ``CARINA_Z``, two main
    bronchi below it, an oesophagus (45 HU tube) behind it; ``node``: a 42 HU ball at (z, y, x) mm."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(n) * s for n, s in zip(SHAPE, SPACING))
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    hu = np.full(SHAPE, -1000.0, np.float32)
    body = ((Y - 120.0) / 110.0) ** 2 + ((X - 160.0) / 150.0) ** 2 <= 1.0
    hu[body] = -90.0
    for cx in (85.0, 235.0):  # right and left lung
        lung = (((Y - 120.0) / 80.0) ** 2 + ((X - cx) / 52.0) ** 2 <= 1.0) & (Z >= 15.0)
        hu[lung] = -860.0
    tx, ty = 160.0, 105.0
    r2 = (Y - ty) ** 2 + (X - tx) ** 2
    above = Z >= CARINA_Z * SPACING[0]
    hu[above & (r2 <= 11.5 ** 2)] = 45.0
    hu[above & (r2 <= 8.5 ** 2)] = -1000.0
    for sx in (-1.0, 1.0):  # bronchi: from the carina down and out for 3 slices
        for k in range(1, 4):
            zc = (CARINA_Z - k) * SPACING[0]
            bx = tx + sx * 9.0 * k
            sl = np.abs(Z - zc) < 1.0
            rb = (Y - ty) ** 2 + (X - bx) ** 2
            hu[sl & (rb <= 8.0 ** 2)] = 45.0
            hu[sl & (rb <= 5.5 ** 2)] = -1000.0
    hu[((Y - 135.0) ** 2 + (X - 160.0) ** 2 <= 7.0 ** 2) & (Z >= 30.0)] = 45.0  # oesophagus
    if node is not None:
        d = np.sqrt((Z - node[0]) ** 2 + (Y - node[1]) ** 2 + (X - node[2]) ** 2)
        hu[d <= radius_mm] = 42.0
    hu += rng.normal(0, 8.0, SHAPE).astype(np.float32)
    return hu


RIGHT_PARATRACHEAL = (32 * 5.0, 105.0, 160.0 - 22.0)  # 30 mm above the carina, right of the trachea
LEFT_HILAR = (24 * 5.0, 110.0, 160.0 + 58.0)  # just below the carina, at the left lung's root


def test_the_trachea_is_followed_down_to_the_carina_in_either_slice_order():
    hu = _chest()
    airway = tracheal_air(hu, SPACING)
    assert airway[0][0] == SHAPE[0] - 1 and airway[-1][0] == CARINA_Z
    assert abs(airway[-1][2] - 160.0 / SPACING[2]) < 1.0
    flipped = tracheal_air(hu[::-1].copy(), SPACING, superior_is_high_z=False)
    assert flipped[0][0] == 0 and flipped[-1][0] == SHAPE[0] - 1 - CARINA_Z
    assert tracheal_air(np.full((10, 32, 32), -90.0, np.float32), SPACING) == []  # no lungs, no airway


@pytest.mark.parametrize("where,station", [(RIGHT_PARATRACHEAL, "right paratracheal"), (LEFT_HILAR, "left hilar")])
def test_an_enlarged_node_is_found_and_placed(where, station):
    without = node_candidates(_chest(), SPACING)
    with_node = node_candidates(_chest(where), SPACING)
    best = with_node[0]
    centre_mm = np.asarray(best.center_zyx) * np.asarray(SPACING)
    assert np.linalg.norm(centre_mm - np.asarray(where)) < 9.0 + 5.0
    assert best.station == station
    assert node_evidence(with_node) > node_evidence(without) + 0.5
    # patient's left at low x (a mirrored column order): the same node is named on the other side
    mirrored = node_candidates(_chest(where)[:, :, ::-1].copy(), SPACING, patient_left_is_high_x=False)
    assert mirrored[0].station == station
    # the head end at z = 0: the same node, the same station
    upside = node_candidates(_chest(where)[::-1].copy(), SPACING, superior_is_high_z=False)
    assert upside[0].station == station


def test_no_trachea_no_candidates():
    hu = _chest(RIGHT_PARATRACHEAL)
    hu[hu < -950] = -90.0  # the lumen filled: no airway to place the stations around
    hu[:, :, :10] = -1000.0  # (outside air stays)
    assert node_candidates(hu, SPACING) == []
    assert node_evidence([]) < -6.0


def test_stations_around_the_carina():
    carina, top, sp = (20, 40, 64), 30, (5.0, 2.5, 2.5)
    assert station_of((24, 40, 64 - 8), carina, top, sp, True) == "right paratracheal"  # 20 mm right, above
    assert station_of((24, 40, 64 + 7), carina, top, sp, True) == "left paratracheal"
    assert station_of((24, 40, 64 + 10), carina, top, sp, True) == "aortopulmonary window"
    assert station_of((17, 44, 64), carina, top, sp, True) == "subcarinal"
    assert station_of((18, 44, 64 + 20), carina, top, sp, True) == "left hilar"
    assert station_of((18, 44, 64 + 20), carina, top, sp, False) == "right hilar"
    assert station_of((17, 44, 64 - 8), carina, 10, sp, True) == "right paratracheal"  # head end at low z


def test_the_bundled_ct_with_a_hilar_node_places_it():
    """syn00004 (bundled, DICOM) has a 17 mm left hilar node: read_study places the node there and
    gives its evidence; a detector reading without lungs gives none."""
    from data.detectors import DETECTOR_FINDINGS, evidence_array, evidence_dict, locations_array, locations_dict, read_study
    from data.study import load_study

    studies = Path(__file__).resolve().parents[2] / "examples" / "studies"
    reading = read_study(load_study(studies / "syn00004"))
    assert reading.locations == {"lymphadenopathy": "left hilar"}
    assert "lymphadenopathy" in DETECTOR_FINDINGS and np.isfinite(reading.evidence["lymphadenopathy"])
    assert locations_dict(locations_array(reading.locations)) == reading.locations  # the cache's round trip
    assert locations_dict(locations_array({})) is None
    assert evidence_dict(evidence_array(reading.evidence)) == pytest.approx(reading.evidence, abs=1e-5)
