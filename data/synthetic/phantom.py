"""Analytic chest CT phantom: a HU volume with anatomy, contrast, noise and the planted findings.

Frame: the array is (z, y, x) with z index 0 the most *inferior* slice (ascending patient z, the
order a loader gets by sorting slices along their normal), y index 0 anterior, x index 0 the
patient's right (radiological display, ImageOrientationPatient 1\\0\\0\\0\\1\\0). Lesion centres
are ``index * spacing`` in mm in this frame.

The anatomy is laid out on a normalised height ``t`` (0 = upper abdomen, 1 = thoracic inlet) so it
fits any number of slices; in-plane and lesion sizes are in millimetres. It is a phantom, not a
simulation: the aim is plausible HU and geometry, varied per patient, with findings visible at
the volume's resolution. Hand-written because no maintained library draws chest CT phantoms with
pathology; scipy does the heavy lifting (distance transforms, zoom).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data.synthetic.findings import Case
from data.vocab import SIZED, Label

# HU of tissues; (non-contrast, contrast) pairs where enhancement matters.
AIR, LUNG, FAT, FLUID, MUSCLE = -1000.0, -860.0, -100.0, 12.0, 45.0
MEDIASTINAL_FAT = -90.0
BLOOD = (40.0, 230.0)
MYOCARDIUM = (45.0, 120.0)
LIVER = (58.0, 105.0)
SPLEEN = (48.0, 115.0)
CANCELLOUS, CORTEX, RIB, DISC = 230.0, 650.0, 480.0, 85.0

LOBE_CODES = {"right upper lobe": 1, "right middle lobe": 2, "right lower lobe": 3, "left upper lobe": 4, "left lower lobe": 5}


@dataclass
class Phantom:
    """A rendered study: ``hu`` int16 (z, y, x), spacing (z, y, x) mm, the lesions and the labels
    (with ``below_resolution`` marked)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    lesions: list[dict]
    labels: list[Label]


class _Grid:
    """Broadcastable coordinates: X (1,1,nx) mm, patient right negative; Y (1,ny,1) mm, anterior
    negative; T (nz,1,1) normalised height; Zmm (nz,1,1) mm from the first slice."""

    def __init__(self, shape: tuple[int, int, int], thk: float, px: float):
        nz, ny, nx = shape
        self.shape, self.thk, self.px = shape, thk, px
        self.X = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * px).reshape(1, 1, nx)
        self.Y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * px).reshape(1, ny, 1)
        self.T = (np.arange(nz, dtype=np.float32) / max(nz - 1, 1)).reshape(nz, 1, 1)
        self.Zmm = (np.arange(nz, dtype=np.float32) * thk).reshape(nz, 1, 1)
        self.zlen = (nz - 1) * thk if nz > 1 else thk

    def t_to_mm(self, t: float) -> float:
        return float(t) * self.zlen

    def to_index(self, z_mm: float, y_mm: float, x_mm: float) -> tuple[float, float, float]:
        nz, ny, nx = self.shape
        return z_mm / self.thk, y_mm / self.px + (ny - 1) / 2, x_mm / self.px + (nx - 1) / 2

    def center_zyx_mm(self, t: float, y_mm: float, x_mm: float) -> list[float]:
        """Lesion centre in the array frame (index * spacing)."""
        nz, ny, nx = self.shape
        return [round(float(self.t_to_mm(t)), 2), round(float(y_mm + (ny - 1) / 2 * self.px), 2),
                round(float(x_mm + (nx - 1) / 2 * self.px), 2)]

    def dist2(self, t: float, y: float, x: float, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
        """Squared ellipsoidal distance (mm, divided by ``scale``) from a point at height t."""
        dz = (self.Zmm - self.t_to_mm(t)) / scale[0]
        return dz**2 + ((self.Y - y) / scale[1]) ** 2 + ((self.X - x) / scale[2]) ** 2


def _soft(d: np.ndarray, r: float, edge: float) -> np.ndarray:
    """Partial-volume weight of a shape of radius r at distance d (1 inside, 0 outside)."""
    return np.clip((r - d) / max(edge, 1e-3) + 0.5, 0.0, 1.0)


def _blend(vol: np.ndarray, w: np.ndarray, value: float) -> None:
    vol += w * (value - vol)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, end points aligned."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    f = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - f
    m[np.arange(n_out), lo + 1] += f
    return m


def _smooth_field(rng: np.random.Generator, shape, coarse=(4, 8, 8)) -> np.ndarray:
    """Low-frequency random field in about [-1, 1] (texture): a coarse random grid upsampled by
    separable linear interpolation (three small matrix products; scipy's zoom is 10x slower)."""
    small = rng.standard_normal([max(2, s // c) for s, c in zip(shape, coarse)]).astype(np.float32)
    mz, my, mx = (_interp_matrix(s, m) for s, m in zip(shape, small.shape))
    f = np.einsum("ijk,xk->ijx", small, mx)  # (cz, cy, nx)
    f = np.einsum("ijx,yj->iyx", f, my)  # (cz, ny, nx)
    f = np.tensordot(mz, f, axes=(1, 0))  # (nz, ny, nx)
    return np.clip(f / 2.0, -1, 1)


_RAMP = np.arange(4096, dtype=np.float32)  # 0, 1, 2, ... (points along a branch)


def _tree(rng: np.random.Generator, start, direction, length, radius, depth, min_r, inside, step) -> list[tuple[np.ndarray, float]]:
    """Segments of a randomly branching tree (vessels or airways): a list of (points (n, 3) as
    x, y, z mm; radius). ``inside(p)`` keeps branches in the lung: a branch whose end leaves it
    is shortened, then dropped."""
    segs: list[tuple[np.ndarray, float]] = []
    stack = [(np.asarray(start, np.float32), np.asarray(direction, np.float32), length, radius, depth)]
    while stack:
        p0, d, ln, r, dep = stack.pop()
        d = d / (np.linalg.norm(d) + 1e-6)
        for _ in range(3):
            if inside(p0 + d * ln):
                break
            ln *= 0.5
        else:
            continue
        n = min(max(2, int(ln / step)), len(_RAMP))
        segs.append((p0[None, :] + (_RAMP[:n] * (ln / (n - 1)))[:, None] * d[None, :], r))
        p1 = p0 + d * ln
        if dep <= 0 or r * 0.72 < min_r:
            continue
        for _ in range(2):
            nd = d + rng.normal(0, 0.6, 3).astype(np.float32)
            stack.append((p1, nd, ln * float(rng.uniform(0.7, 0.9)), r * float(rng.uniform(0.64, 0.8)), dep - 1))
    return segs


def _splat_tree(g: _Grid, pts, mask: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """Partial-volume weight (0..1) of the tubes of radius ``r + grow`` around the tree points,
    inside ``mask``. Vectorised: each point updates its small voxel neighbourhood."""
    nz, ny, nx = g.shape
    w = np.zeros(nz * ny * nx, np.float32)
    if not pts:
        return w.reshape(g.shape)
    P = np.concatenate([p for p, _ in pts])  # (N, 3) x, y, zmm
    R = np.concatenate([np.full(len(p), r, np.float32) for p, r in pts]) + grow  # (N,)
    zi, yi, xi = g.to_index(P[:, 2], P[:, 1], P[:, 0])
    reach = float(R.max()) + g.px
    kz, kxy = int(np.ceil(reach / g.thk)), int(np.ceil(reach / g.px))
    oz, oy, ox = np.meshgrid(np.arange(-kz, kz + 1), np.arange(-kxy, kxy + 1), np.arange(-kxy, kxy + 1), indexing="ij")
    oz, oy, ox = oz.ravel(), oy.ravel(), ox.ravel()  # (K,)
    cz = np.rint(zi)[:, None] + oz[None]  # (N, K) voxel indices
    cy = np.rint(yi)[:, None] + oy[None]
    cx = np.rint(xi)[:, None] + ox[None]
    d = np.sqrt(((cz - zi[:, None]) * g.thk) ** 2 + ((cy - yi[:, None]) * g.px) ** 2 + ((cx - xi[:, None]) * g.px) ** 2)
    val = np.clip((R[:, None] - d) / g.px + 0.5, 0.0, 1.0)
    ok = (val > 0) & (cz >= 0) & (cz < nz) & (cy >= 0) & (cy < ny) & (cx >= 0) & (cx < nx)
    flat = (cz[ok].astype(np.int64) * ny + cy[ok].astype(np.int64)) * nx + cx[ok].astype(np.int64)
    np.maximum.at(w, flat, val[ok].astype(np.float32))
    return w.reshape(g.shape) * mask


def below_resolution(size_mm: float, spacing: tuple[float, float, float]) -> bool:
    """A finding smaller than about two voxels (geometric-mean voxel edge) at this spacing."""
    edge = float(np.prod(spacing)) ** (1.0 / 3.0)
    return size_mm < 2.0 * edge


PHANTOM_VERSIONS = (1, 2)


def render(case: Case, version: int = 1) -> Phantom:
    """Render the case's anatomy and findings. Deterministic for ``case.seed`` and ``version``.

    ``version`` 1: the thoracic cavity outside lungs, heart and vessels is 35 HU soft tissue (the
    shipped session 1-10 datasets). 2: above the diaphragm it is mediastinal fat (-90 HU), as in
    a real chest, so the vessels, airway, oesophagus and enlarged lymph nodes stand out against
    it; in version 1 a lymph node (42 HU) was invisible against its surroundings. The upper
    abdomen (liver, spleen, stomach, bowel) keeps 35 HU soft tissue in both."""
    if version not in PHANTOM_VERSIONS:
        raise ValueError(f"phantom version must be one of {PHANTOM_VERSIONS}, got {version!r}")
    rng = np.random.default_rng([case.seed, 7])
    acq, ana = case.acquisition, case.anatomy
    shape = tuple(acq["shape"])
    thk, px = float(acq["slice_thickness"]), float(acq["pixel_spacing"])
    g = _Grid(shape, thk, px)
    X, Y, T = g.X, g.Y, g.T
    c = 1 if case.contrast else 0
    blood = BLOOD[c]

    # --- body wall --------------------------------------------------------------------------
    a = 150.0 * ana["body_scale"]
    b = a * ana["ap_ratio"]
    taper = 1.0 - 0.18 * np.clip((T - 0.85) / 0.15, 0, 1)  # narrower at the thoracic inlet
    body = (X / (a * taper)) ** 2 + (Y / (b * taper)) ** 2
    vol = np.full(shape, AIR, np.float32)
    vol[np.broadcast_to(body <= 1.0, shape)] = FAT
    fat = ana["fat_mm"]
    a_m, b_m = a - fat, b - fat
    muscle_e = (X / (a_m * taper)) ** 2 + (Y / (b_m * taper)) ** 2
    vol[np.broadcast_to(muscle_e <= 1.0, shape)] = MUSCLE
    a_in, b_in = a_m - 12.0, b_m - 12.0
    cav = (X / (a_in * taper)) ** 2 + (Y / (b_in * taper)) ** 2  # thoracic cavity (<= 1)
    cavity = np.broadcast_to(cav <= 1.0, shape)
    vol[cavity] = 35.0  # soft tissue default (version 1: also the whole mediastinum)
    if version >= 2:
        vol[cavity & np.broadcast_to(T >= 0.34, shape)] = MEDIASTINAL_FAT  # above the diaphragm

    # --- lungs ------------------------------------------------------------------------------
    ls = ana["lung_scale"]
    y_spine = b_in - 32.0
    lung = np.zeros(shape, bool)
    lobes = np.zeros(shape, np.int8)
    heart_t, heart_x, heart_y = 0.38, 22.0, -0.22 * b_in
    shift = 0.0
    if case.lobectomy_lobe:
        shift = -10.0 if case.lobectomy_lobe.startswith("right") else 10.0  # mediastinal shift to the operated side
    dome_base = {"right": 0.13, "left": 0.10}
    for side, sx in (("right", -1.0), ("left", 1.0)):
        cx = sx * 0.47 * a_in + shift * 0.3
        cy = 0.05 * b_in
        ax, by = 0.44 * a_in * ls, 0.86 * b_in
        top = 1.0
        base = dome_base[side]
        lob = case.lobectomy_lobe
        # After a lobectomy the remaining lobes expand: modest volume loss (lower apex or raised
        # hemidiaphragm) rather than an empty hemithorax.
        if lob == f"{side} upper lobe":
            top, base = 0.93, base + 0.04
        if lob == f"{side} lower lobe":
            base += 0.1
        apex = np.sqrt(np.clip((top - T) / 0.28, 0, 1))  # rounded apex
        e = ((X - cx) / (ax * np.maximum(apex, 1e-3))) ** 2 + ((Y - cy) / (by * np.maximum(apex, 1e-3))) ** 2
        r2 = np.clip(((X - cx) / ax) ** 2 + ((Y - cy) / by) ** 2, 0, 1)
        dome = base + 0.19 * (1.0 - r2)  # diaphragm: high centrally, low in the recesses
        m = (e <= 1.0) & (T > dome) & (T < top) & (cav <= 0.97)
        m &= np.abs(X) > 18.0  # mediastinum
        lung |= m
        yn = np.clip((Y - (cy - by)) / (2 * by), 0, 1)  # 0 anterior .. 1 posterior
        lower = T < 0.24 + 0.52 * yn  # oblique fissure
        if side == "right":
            upper_or_mid = np.where(T >= 0.5, 1, 2)
            code = np.where(lower, 3, upper_or_mid)
            if lob == "right upper lobe":
                code = np.where(lower, 3, 2)
            if lob == "right lower lobe":
                code = upper_or_mid
        else:
            code = np.where(lower, 5, 4)
            if lob == "left upper lobe":
                code = np.full_like(code, 5)
        lobes[m] = np.broadcast_to(code, shape)[m].astype(np.int8)

    # --- heart and great vessels -------------------------------------------------------------
    hs = ana["heart_scale"] * (1.32 if case.present("cardiomegaly") else 1.0)
    hx, hy, hz = 58.0 * hs, 44.0 * hs, g.zlen * 0.13 * hs
    hxc = heart_x + shift
    d_heart = np.sqrt(g.dist2(heart_t, heart_y, hxc, (hz, hy, hx)))  # 1.0 on the heart's surface
    peri = case.present("pericardial_effusion")
    peri_th = {"small": 0.08, "moderate": 0.16, "large": 0.26}[peri.attributes["amount"]] if peri else 0.0
    heart_outer = d_heart <= 1.0 + peri_th + 0.06
    lung &= ~heart_outer
    vol[heart_outer] = FAT
    if peri:
        vol[(d_heart <= 1.0 + peri_th) & (d_heart > 1.0)] = FLUID
    vol[d_heart <= 1.0] = MYOCARDIUM[c]
    vol[d_heart <= 0.8] = blood
    vol[(d_heart <= 0.8) & (np.abs(X - hxc - 5) < 2.5)] = MYOCARDIUM[c]  # septum

    def tube(t0, t1, y0, x0, r, y1=None, x1=None, value=blood):
        """A vertical vessel/airway from t0 to t1 whose centre moves linearly (y0,x0)->(y1,x1)."""
        y1 = y0 if y1 is None else y1
        x1 = x0 if x1 is None else x1
        k0 = int(np.ceil(t0 * (shape[0] - 1) - 1e-6))
        k1 = int(np.floor(t1 * (shape[0] - 1) + 1e-6)) + 1
        m = np.zeros(shape, bool)
        if k1 <= k0:
            return m
        Ts = T[k0:k1]
        f = np.clip((Ts - t0) / max(t1 - t0, 1e-3), 0, 1)
        yc, xc = y0 + (y1 - y0) * f, x0 + (x1 - x0) * f
        m[k0:k1] = (Y - yc) ** 2 + (X - xc) ** 2 <= r * r
        vol[k0:k1][m[k0:k1]] = value
        return m

    y_trach = y_spine - 48.0
    carina_t = 0.6
    lung &= ~tube(0.18, 0.76, y_spine - 26, 20 + shift, 12.5)  # descending aorta
    lung &= ~tube(0.48, 0.76, heart_y + 18, 6 + shift, 14.5)  # ascending aorta
    lung &= ~tube(0.74, 0.8, heart_y + 18, 6 + shift, 12.5, y_spine - 26, 20 + shift)  # arch
    lung &= ~tube(0.52, 0.6, heart_y + 25, 22 + shift, 13.0, y_trach + 5, 38 + shift)  # pulmonary trunk
    lung &= ~tube(0.5, 0.85, heart_y + 20, -22 + shift, 9.0, value=blood)  # SVC
    lung &= ~tube(0.15, 1.0, y_spine - 30, 6, 7.0, value=MUSCLE)  # oesophagus
    for v, r in ((MUSCLE, 11.0), (AIR, 8.5)):
        lung &= ~tube(carina_t, 1.0, y_trach, shift * 0.5, r, value=v)  # trachea
        for sx in (-1.0, 1.0):
            lung &= ~tube(carina_t - 0.1, carina_t, y_trach + 8, sx * 48.0, r * 0.7, y_trach, shift * 0.5, value=v)

    # --- upper abdomen ----------------------------------------------------------------------
    below = cavity & ~lung & (T < 0.34)
    dist_r = ((X + 0.35 * a_in) / (0.75 * a_in)) ** 2 + ((Y - 0.05 * b_in) / (0.95 * b_in)) ** 2
    liver = below & (dist_r <= 1.0) & (T < 0.12 + 0.2 * (1 - np.clip(dist_r, 0, 1)))
    vol[liver] = LIVER[c]
    spleen = below & (((X - 0.6 * a_in) / 30) ** 2 + ((Y - 0.55 * b_in) / 40) ** 2 <= 1) & (T < 0.14)
    vol[spleen] = SPLEEN[c]
    stom = below & (((X - 0.35 * a_in) / 45) ** 2 + ((Y + 0.1 * b_in) / 40) ** 2 <= 1) & (T < 0.15)
    vol[stom] = 20.0
    vol[stom & (Y < -0.1 * b_in - 15)] = AIR

    # --- lung parenchyma, vessels, airways ----------------------------------------------------
    tex = _smooth_field(rng, shape)
    vol[lung] = (LUNG + 22.0 * tex + 0.2 * Y)[lung]  # texture + gravity gradient (posterior denser)
    vrng = np.random.default_rng(ana["vessel_seed"])
    vpts, apts = [], []

    def inside(p: np.ndarray) -> bool:
        zi, yi, xi = g.to_index(float(p[2]), float(p[1]), float(p[0]))
        zi, yi, xi = int(round(zi)), int(round(yi)), int(round(xi))
        return 0 <= zi < shape[0] and 0 <= yi < shape[1] and 0 <= xi < shape[2] and bool(lung[zi, yi, xi])

    step = 0.6 * min(px, thk)
    for sx in (-1.0, 1.0):
        hil = np.array([sx * 62.0 + shift, y_trach + 10, g.t_to_mm(0.52)], np.float32)
        for d in ((sx * 0.3, 0.1, 1.0), (sx * 0.3, 0.3, -1.0), (sx, -0.6, 0.1), (sx, 0.7, -0.2), (sx * 0.6, -0.4, 0.6),
                  (sx, 0.0, 0.4), (sx * 0.5, 0.6, 0.6), (sx * 0.7, -0.5, -0.6), (sx, 0.4, 0.3), (sx * 0.4, 0.8, -0.5)):
            vpts += _tree(vrng, hil, np.array(d, np.float32), 42.0, 5.0, 7, 0.7, inside, step)
        for d in ((sx * 0.5, 0.1, 0.8), (sx * 0.5, 0.3, -0.8)):
            apts += _tree(vrng, hil + np.array([0, -6, 0], np.float32), np.array(d, np.float32), 35.0, 4.0, 3, 1.2, inside, step)
    _blend(vol, _splat_tree(g, vpts, lung), 35.0 + 110.0 * c)
    _blend(vol, _splat_tree(g, apts, lung, grow=1.2), 0.0)  # airway wall
    _blend(vol, _splat_tree(g, apts, lung), AIR)  # lumen

    # --- spine, ribs, sternum ----------------------------------------------------------------
    n_lv = 14
    lv_pos = (1.0 - T) * n_lv  # vertebral level coordinate (0 = top of T1)
    disc = (lv_pos % 1.0) > 0.84
    vb_r = 16.0 * ana["body_scale"]
    d_vb = np.sqrt((X**2) + (Y - y_spine) ** 2)
    vb = np.broadcast_to(d_vb <= vb_r, shape)
    vol[vb] = np.where(np.broadcast_to(disc, shape), DISC, CANCELLOUS)[vb]
    cortex = np.broadcast_to((d_vb <= vb_r) & (d_vb > vb_r - 2.5) & ~disc, shape)
    vol[cortex] = CORTEX
    d_canal = np.sqrt(X**2 + (Y - (y_spine + vb_r + 9)) ** 2)
    vol[np.broadcast_to((d_canal <= 15) & (d_canal > 9) & ~disc, shape)] = CORTEX * 0.8
    vol[np.broadcast_to(d_canal <= 9, shape)] = 15.0
    ang = np.arctan2(X, Y)  # 0 = posterior, +-pi = anterior
    rib_phase = lv_pos + 0.9 * (1.0 - np.cos(ang))
    ring = (cav > 1.0) & (muscle_e <= 1.0) & (cav <= ((a_in + 9) / a_in) ** 2)
    ribs = ring & ((rib_phase % 1.0) < 0.3) & (np.abs(np.abs(ang) - np.pi) > 0.45) & (np.abs(ang) > 0.35) & (T > 0.12)
    vol[np.broadcast_to(ribs, shape)] = RIB
    sternum = ((X / 16) ** 2 + ((Y + b_in + 2) / 8) ** 2 <= 1) & (T > 0.35) & (T < 0.92)
    vol[np.broadcast_to(sternum, shape)] = 380.0

    # --- findings ----------------------------------------------------------------------------
    lesions: list[dict] = []
    labels = [Label(lab.finding, lab.present, lab.side, lab.location, lab.size_mm, dict(lab.attributes)) for lab in case.labels]

    def add_lesion(name: str, t: float, y: float, x: float, r: float) -> None:
        cz, cy, cx = g.center_zyx_mm(float(t), float(y), float(x))
        lesions.append({"finding": name, "center_zyx_mm": [cz, cy, cx], "radius_mm": round(float(r), 2)})

    def lesion_from_mask(name: str, m: np.ndarray) -> None:
        if not m.any():
            return
        zz, yy, xx = np.nonzero(m)
        vox = thk * px * px
        r = (3.0 * len(zz) * vox / (4.0 * np.pi)) ** (1 / 3)
        lesions.append({"finding": name, "center_zyx_mm": [round(float(zz.mean() * thk), 2), round(float(yy.mean() * px), 2),
                                                            round(float(xx.mean() * px), 2)], "radius_mm": round(float(r), 2)})

    def place_in_lobe(lobe: str, r: float) -> tuple[float, float, float]:
        """A point (t, y_mm, x_mm) inside ``lobe``, at least ~r from the lung edge where possible."""
        code = LOBE_CODES[lobe]
        cand = np.argwhere(lobes == code)
        if len(cand) == 0:
            cand = np.argwhere(lung)
        best, best_score = cand[0], -1
        for k in rng.permutation(len(cand))[:60]:
            zi, yi, xi = cand[k]
            score = 0
            for dz, dy, dx in ((r / thk, 0, 0), (-r / thk, 0, 0), (0, r / px, 0), (0, -r / px, 0), (0, 0, r / px), (0, 0, -r / px)):
                zj, yj, xj = int(round(zi + dz)), int(round(yi + dy)), int(round(xi + dx))
                if 0 <= zj < shape[0] and 0 <= yj < shape[1] and 0 <= xj < shape[2] and lung[zj, yj, xj]:
                    score += 1
            if score > best_score:
                best, best_score = cand[k], score
            if score == 6:
                break
        zi, yi, xi = best
        return zi / max(shape[0] - 1, 1), (yi - (shape[1] - 1) / 2) * px, (xi - (shape[2] - 1) / 2) * px

    def side_mask(side: str) -> np.ndarray:
        if side == "bilateral":
            return lung
        return lung & np.broadcast_to((X < 0) if side == "right" else (X > 0), shape)

    for lab in labels:
        name = lab.finding
        if name == "nodule":
            r = lab.size_mm / 2
            t, y, x = place_in_lobe(lab.location, r)
            d = np.sqrt(g.dist2(t, y, x))
            dens = lab.attributes.get("density", "solid")
            if dens == "part-solid":
                _blend(vol, _soft(d, r, px), -420.0)
                _blend(vol, _soft(d, r * 0.5, px), 30.0)
            elif dens == "ground-glass":
                _blend(vol, _soft(d, r, px), -560.0)
            elif dens == "calcified":
                _blend(vol, _soft(d, r, px), 420.0)
            else:
                _blend(vol, _soft(d, r, px), 32.0)
            add_lesion(name, t, y, x, r)
        elif name == "mass":
            r = lab.size_mm / 2
            t, y, x = place_in_lobe(lab.location, r * 0.8)
            w = np.zeros(shape, np.float32)
            for _ in range(4):
                off = rng.normal(0, r * 0.25, 3)
                d = np.sqrt(g.dist2(t + off[0] / g.zlen, y + off[1], x + off[2]))
                w = np.maximum(w, _soft(d, r * 0.75, px))
            _blend(vol, w * np.broadcast_to(cavity, shape), 38.0)
            add_lesion(name, t, y, x, r)
        elif name in ("consolidation", "ground_glass_opacity"):
            r = float(rng.uniform(22, 38))
            t, y, x = place_in_lobe(lab.location, r * 0.6)
            d = np.sqrt(g.dist2(t, y, x))
            region = (lobes == LOBE_CODES[lab.location]) & (d <= r)
            w = _soft(d, r, px * 2) * region
            if name == "consolidation":
                keep_air = vol < -950  # air bronchograms survive
                _blend(vol, w * ~keep_air, 30.0)
            else:
                vol += w * 260.0 * (vol < -300)
            lesion_from_mask(name, region)
        elif name == "atelectasis":
            code = LOBE_CODES[lab.location]
            lm = lobes == code
            post_edge = np.where(lm.any(axis=1, keepdims=True), (lm * np.arange(shape[1]).reshape(1, -1, 1)).max(axis=1, keepdims=True), 0)
            band = lm & ((post_edge - np.arange(shape[1]).reshape(1, -1, 1)) * px < 14.0) & np.broadcast_to(T < 0.45, shape)
            vol[band] = 15.0
            lesion_from_mask(name, band)
        elif name in ("pleural_effusion", "pneumothorax"):
            amt = lab.attributes.get("amount", "small")
            for s in (["left", "right"] if lab.side == "bilateral" else [lab.side]):
                sm = side_mask(s)
                col = np.arange(shape[1]).reshape(1, -1, 1)
                any_y = sm.any(axis=1, keepdims=True)
                if name == "pleural_effusion":
                    depth = {"small": 14.0, "moderate": 32.0, "large": 60.0}[amt]
                    height = {"small": 0.38, "moderate": 0.55, "large": 0.8}[amt]
                    edge = np.where(any_y, (sm * col).max(axis=1, keepdims=True), 0)
                    taper_h = np.clip(1.0 - T / height, 0, 1)
                    m = sm & ((edge - col) * px < depth * (0.3 + 0.7 * taper_h)) & np.broadcast_to(T < height, shape)
                    vol[m] = FLUID
                else:
                    depth = {"small": 10.0, "moderate": 22.0, "large": 40.0}[amt]
                    edge = np.where(any_y, np.where(sm, col, 10**6).min(axis=1, keepdims=True), 0)
                    m = sm & ((col - edge) * px < depth)
                    vol[m] = AIR
                    rim = sm & ((col - edge) * px >= depth) & ((col - edge) * px < depth + 1.5 * px)
                    vol[rim] = -420.0
                lesion_from_mask(name, m)
        elif name == "emphysema":
            n = {"mild": 40, "moderate": 90, "severe": 160}[lab.attributes.get("severity", "mild")]
            upper = lung & np.broadcast_to(T > 0.45, shape)
            vol[upper] -= {"mild": 25, "moderate": 45, "severe": 70}[lab.attributes.get("severity", "mild")]
            cand = np.argwhere(upper)
            if len(cand):
                holes = np.zeros(shape, bool)
                for k in rng.choice(len(cand), size=min(n, len(cand)), replace=False):
                    holes[tuple(cand[k])] = True
                rr = max(1, int(round(4.0 / px)))
                holes = ndimage.binary_dilation(holes, iterations=rr) & upper
                vol[holes] = -985.0
                lesion_from_mask(name, upper)
        elif name == "cardiomegaly":
            add_lesion(name, heart_t, heart_y, hxc, (hx + hy + hz) / 3)
        elif name == "pericardial_effusion":
            add_lesion(name, heart_t, heart_y, hxc, (hx + hy + hz) / 3 * (1 + peri_th))
        elif name == "lymphadenopathy":
            r = lab.size_mm / 2
            st = lab.location
            pos = {
                "right paratracheal": (carina_t + 0.08, y_trach, -18.0),
                "left paratracheal": (carina_t + 0.08, y_trach, 18.0),
                "subcarinal": (carina_t - 0.07, y_trach + 8, 0.0),
                "aortopulmonary window": (0.69, y_trach - 6, 24.0),
                "right hilar": (0.52, y_trach + 12, -60.0),
                "left hilar": (0.52, y_trach + 12, 60.0),
            }[st]
            t, y, x = pos[0], pos[1], pos[2] + shift * 0.5
            d = np.sqrt(g.dist2(t, y, x))
            _blend(vol, _soft(d, r, px), 42.0)
            add_lesion(name, t, y, x, r)
        elif name == "hiatal_hernia":
            r = {"small": 16.0, "moderate": 26.0, "large": 38.0}[lab.attributes.get("amount", "small")]
            t, y, x = 0.3, y_spine - 34.0, 8.0
            d = np.sqrt(g.dist2(t, y, x))
            m = d <= r
            vol[m] = 18.0
            vol[m & np.broadcast_to(Y < y - 0.35 * r, shape)] = AIR
            lung &= ~m
            add_lesion(name, t, y, x, r)
        elif name in ("fracture", "bone_lesion"):
            level = lab.location or "T8"
            li = _level_index(level)
            t_top, t_bot = 1.0 - li / n_lv, 1.0 - (li + 0.84) / n_lv
            tc = (t_top + t_bot) / 2
            if name == "fracture":
                # Anterior wedge: the upper front of the body collapses and the rest is sclerotic.
                in_body = np.broadcast_to((d_vb <= vb_r) & (T <= t_top) & (T >= t_bot), shape)
                vol[in_body] = 420.0
                frac = np.clip((Y - (y_spine - vb_r)) / (2 * vb_r), 0, 1)  # 0 front .. 1 back
                collapsed = in_body & np.broadcast_to(T > t_bot + (t_top - t_bot) * (0.35 + 0.55 * frac), shape)
                vol[collapsed] = DISC
                add_lesion(name, tc, y_spine, 0.0, vb_r)
            else:
                r = min(lab.size_mm / 2, vb_r * 0.9)
                d = np.sqrt(g.dist2(tc, y_spine, 0.0))
                m = (d <= r) & np.broadcast_to(d_vb <= vb_r, shape)
                vol[m] = 25.0
                add_lesion(name, tc, y_spine, 0.0, r)
        elif name == "lobectomy":
            # Surgical staple line near the hilum of the operated side.
            sx = -1.0 if lab.side == "right" else 1.0
            t0 = 0.62 if "upper" in (lab.location or "") else 0.4
            for k in range(6):
                x = sx * (60.0 + 5 * k) + shift
                zi, yi, xi = g.to_index(g.t_to_mm(t0 - 0.01 * k), y_trach + 10 + 3 * k, x)
                zi, yi, xi = int(round(zi)), int(round(yi)), int(round(xi))
                if 0 <= zi < shape[0] and 0 <= yi < shape[1] and 0 <= xi < shape[2]:
                    vol[zi, yi, xi] = 2800.0
            add_lesion(name, t0 - 0.03, y_trach + 17, sx * 72.0 + shift, 15.0)

    # --- noise and output --------------------------------------------------------------------
    noise = rng.standard_normal(shape, dtype=np.float32) * acq["noise_hu"]
    body_m = np.broadcast_to(body <= 1.0, shape)
    vol += noise * np.where(body_m, 1.0, 0.4)
    hu = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    spacing = (thk, px, px)
    for lab in labels:
        if lab.finding in SIZED and lab.size_mm is not None and below_resolution(lab.size_mm, spacing):
            lab.attributes["below_resolution"] = True
    return Phantom(hu=hu, spacing=spacing, lesions=lesions, labels=labels)


def _level_index(level: str) -> int:
    """0 for T1 ... 11 for T12, 12 for L1, 13 for L2."""
    if level.startswith("T"):
        return int(level[1:]) - 1
    return 11 + int(level[1:])
