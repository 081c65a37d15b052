"""data.spine_measure: the vertebral body found in the scan, a sclerotic level and a lytic focus scored."""
from __future__ import annotations

import numpy as np
import pytest

from data.spine_measure import spine_evidence, vertebral_body_mask

SPACING = (5.0, 2.5, 2.5)  # z, y, x mm


def _spine(level: str | None = None, aorta: bool = True, seed: int = 0):
    """A body of soft tissue (40 HU) with a vertebral column: a disk of marrow (230 HU, radius 15 mm)
    in a cortex ring (650 HU), a disc (85 HU) every 6th slice; an enhancing aorta (230 HU, a tube of
    the same size) beside it in the upper half of the scan. ``level``: "sclerotic" (one body at
    420 HU) or "lytic" (a 14 mm ball of 25 HU in one body)."""
    rng = np.random.default_rng(seed)
    shape = (40, 96, 96)
    hu = np.full(shape, 40.0, np.float32)
    y, x = np.meshgrid(np.arange(96) * 2.5, np.arange(96) * 2.5, indexing="ij")
    cy, cx = 70 * 2.5, 48 * 2.5
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    disc = (np.arange(40) % 6) == 5
    for z in range(40):
        hu[z][d <= 15.0] = 85.0 if disc[z] else 230.0
        hu[z][(d <= 15.0) & (d > 12.5) & ~disc[z]] = 650.0
    if aorta:
        da = np.sqrt((y - (cy - 35)) ** 2 + (x - (cx + 22)) ** 2)
        for z in range(20):
            hu[z][da <= 13.0] = 230.0
    if level == "sclerotic":
        for z in range(18, 23):
            hu[z][d <= 12.5] = 420.0
    elif level == "lytic":
        zz, yy, xx = np.meshgrid(np.arange(40) * 5.0, y[:, 0], x[0], indexing="ij")
        ball = np.sqrt((zz - 100.0) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) <= 7.0
        hu[ball] = 25.0
    hu += rng.normal(0, 10.0, shape).astype(np.float32)
    return hu, (int(cy / 2.5), int(cx / 2.5))


def test_the_vertebral_body_is_found_not_the_aorta():
    hu, (cy, cx) = _spine()
    body = vertebral_body_mask(hu, SPACING)
    assert body is not None and body[cy, cx]
    yy, xx = np.nonzero(body)
    assert abs(yy.mean() - cy) < 1.5 and abs(xx.mean() - cx) < 1.5  # the column, not the tube beside it
    assert vertebral_body_mask(np.full((20, 32, 32), 40.0, np.float32), SPACING) is None
    assert spine_evidence(np.full((20, 32, 32), 40.0, np.float32), SPACING) == {}


def test_a_sclerotic_level_and_a_lytic_focus_stand_out():
    normal = spine_evidence(_spine()[0], SPACING)
    sclerotic = spine_evidence(_spine("sclerotic")[0], SPACING)
    lytic = spine_evidence(_spine("lytic")[0], SPACING)
    assert normal["fracture"] < 20 and normal["bone_lesion"] == 0.0  # discs are neither
    assert sclerotic["fracture"] > 150 and sclerotic["bone_lesion"] == 0.0
    assert lytic["bone_lesion"] > 0.05 and lytic["fracture"] < 20  # a share of one slice's marrow


def test_bundled_cts_read_their_spines():
    """The bundled demo-size CTs (DICOM): syn00004's compression fracture stands out, syn00001
    (no bone finding) scores neither."""
    from pathlib import Path

    from data.study import load_study

    studies = Path(__file__).resolve().parents[2] / "examples" / "studies"
    plain, fractured = (load_study(studies / s) for s in ("syn00001", "syn00004"))
    ev = spine_evidence(plain.volume, plain.spacing_mm)
    assert set(ev) == {"fracture", "bone_lesion"}
    assert ev["fracture"] < 50 and ev["bone_lesion"] == pytest.approx(0.0, abs=0.02)
    assert spine_evidence(fractured.volume, fractured.spacing_mm)["fracture"] > 120
