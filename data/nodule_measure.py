"""Lung nodule measurement on a CT volume in HU: find the nodule, give its diameter in mm.

Why: a follow-up report states today's size of a known nodule ("increased from 9 mm to 12 mm"),
and no part of the model measures. The image heads say *whether* there is a nodule and roughly
where (a lobe); their token maps are far too coarse to measure (a stride-8 cell of the demo model
is 22 mm, larger than most nodules). Radiologists measure on the axial image with calipers; CAD
tools segment the nodule and report a diameter. This module is such a tool, written with numpy
and scipy because no well-kept offline library does lung-nodule detection on a plain HU array
(pylidc needs LIDC annotations; MONAI's detection networks need trained weights we cannot fetch).

Method (pure functions; Z/Y/X voxel axes, spacing in mm):

1. **Lung mask**: air below -400 HU not connected to the volume's edge (the outside), components
   over 2,000 voxels, each axial slice closed and hole-filled so that nodules and vessels inside
   the lung belong to it.
2. **Candidates**: the lung's soft-tissue weight ``clip((HU + 750) / 780, 0, 1)`` filtered by a
   scale-normalised Laplacian of Gaussian at radii 3 / 4.5 / 6 / 8 mm (sigmas in mm, so the 5 mm
   slices and 0.7-2.7 mm pixels are handled alike); local maxima inside the eroded lung.
3. **Ranking**: blobness times the LoG response. A vessel is a tube (two strong Hessian
   eigenvalues, one near zero along its axis); a nodule is a ball (three alike). Blobness is the
   ratio of the weakest to the strongest eigenvalue at the candidate's scale. Enhancing vessels
   and bone (centre over 100 HU) are not solid nodules and are dropped. On 60 validation studies
   of the synthetic demo data the top candidate was the nodule in 34 (57 %), one of the top three
   in 40 (session 22; the plain LoG ranking found it first in 3 of 30).
4. **Diameter** (since session 27): a ball fitted to the CT around the candidate
   (:func:`fit_ball_diameter`: centre, radius, density and the lung's value, by robust least
   squares on the lung's voxels, a one-pixel partial-volume edge), so that every slice that cuts
   the ball counts and a ball between two thick slices is not measured at its narrower cut. On the
   107 nodules of the demo val split, end to end (search and fit), today's size came out to the
   millimetre for 65 % (solid nodules 78 %), against 48 % (57 %) for the caliper it replaced. The
   caliper (``method="caliper"``, and where the fit fails): on the axial slice where the focus is
   widest among those that cut it at its full density, twice the median distance from the
   centre to where the intensity falls half-way to the lung around it (32 rays): the mean axial
   diameter, which is what Fleischner follow-up uses.

Restricting the search to one side (the heads' or the record's) and to a plausible size range (a
prior size from the record) is up to the caller. The result is a measurement for the decoder and
the findings table, never a diagnosis; it is marked as automatic wherever it is shown.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SCALES_MM = (3.0, 4.5, 6.0, 8.0)  # LoG radii: nodules of ~5 to ~20 mm
MAX_SOLID_HU = 100.0  # a candidate centre above this is enhancing vessel or bone, not a solid nodule
MIN_CONTRAST_HU = 200.0  # a nodule must stand this far above the lung around it to be measured
NODULE_RANGE_MM = (3.0, 30.0)  # a pulmonary nodule by definition (larger is a mass)
# fit_ball_diameter: the box of voxels fitted around a candidate, the radii the fit starts from, and
# the least density over the lung a fitted ball must have (ground glass: about 300 HU)
FIT_BOX_MM = 14.0
FIT_START_RADII_MM = (2.5, 4.0, 6.0, 9.0)
MIN_FIT_CONTRAST_HU = 150.0
FIT_STEP_MM = (2.0, 1.4, 1.4)  # z, in-plane: the finest voxel grid a fit samples
MEASURE_METHODS = ("fit", "caliper")  # the diameter: the ball fit (default), or the one-slice caliper
EVIDENCE_FLOOR = 1e-3  # detector_evidence: log(score + this), finite without any candidate
# The detectors search a grid no finer than this (z, in-plane mm): a full-resolution chest CT
# (312 x 512 x 512 at 1 x 0.69 x 0.69 mm) took 85 s and 10.5 GB for the candidate search alone
# (session 23); on its 2 x 3 x 3 block means (2 x 2.1 x 2.1 mm, 20x fewer voxels) the search
# costs what a demo study does, and the diameter is still measured on the full-resolution
# slices. Demo (5 x 2.7 mm) and coarser studies are searched as they are.
SEARCH_SPACING_MM = (2.5, 2.2)


def coarse_grid(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float]
                ) -> tuple[np.ndarray, tuple[float, float, float], tuple[int, int, int]]:
    """(volume, spacing, factors): the mean of non-overlapping blocks of ``factors`` voxels, the
    largest whole factors that keep the spacing within ``SEARCH_SPACING_MM`` (an incomplete block
    at the far edge is dropped); the volume itself when every factor is 1."""
    fz = max(1, int(SEARCH_SPACING_MM[0] // float(spacing_zyx[0])))
    fy = max(1, int(SEARCH_SPACING_MM[1] // float(spacing_zyx[1])))
    fx = max(1, int(SEARCH_SPACING_MM[1] // float(spacing_zyx[2])))
    fz, fy, fx = (min(f, max(1, n // 3)) for f, n in zip((fz, fy, fx), np.shape(hu_ZYX)))  # keep >= 3 voxels a side
    if (fz, fy, fx) == (1, 1, 1):
        return np.asarray(hu_ZYX, dtype=np.float32), tuple(float(s) for s in spacing_zyx), (1, 1, 1)
    Z, Y, X = (n // f * f for n, f in zip(np.shape(hu_ZYX), (fz, fy, fx)))
    blocks = np.asarray(hu_ZYX[:Z, :Y, :X], dtype=np.float32).reshape(Z // fz, fz, Y // fy, fy, X // fx, fx)
    coarse = blocks.mean(axis=(1, 3, 5), dtype=np.float32)  # [Z/fz, Y/fy, X/fx]
    return coarse, (spacing_zyx[0] * fz, spacing_zyx[1] * fy, spacing_zyx[2] * fx), (fz, fy, fx)


@dataclass(frozen=True)
class NoduleMeasurement:
    """One measured nodule. ``center_zyx``: voxel indices; ``diameter_mm``: mean axial diameter."""

    center_zyx: tuple[int, int, int]
    diameter_mm: float
    score: float  # LoG response x blobness (ranking only)

    @property
    def size_mm(self) -> int:
        """The diameter as reports state it (whole millimetres)."""
        return int(round(self.diameter_mm))


def lung_mask(hu_ZYX: np.ndarray, min_voxels: int = 2000) -> np.ndarray:
    """bool (Z, Y, X): the lungs, with what lies inside them (nodules, vessels) filled in."""
    air = hu_ZYX < -400
    lab, n = ndimage.label(air)
    if n == 0:
        return np.zeros_like(air)
    edge = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(),
                                     lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    sizes = ndimage.sum_labels(air, lab, np.arange(n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes[1:] > min_voxels
    keep[edge] = False
    inner = keep[lab]
    return np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(s, iterations=3)) for s in inner])


def _hessian_at(g: np.ndarray, spacing: tuple[float, float, float], p: tuple[int, int, int]) -> np.ndarray:
    """3x3 Hessian of ``g`` (mm units) at voxel ``p`` by central differences."""
    H = np.zeros((3, 3), np.float64)
    z, y, x = p

    def v(dz=0, dy=0, dx=0):
        zz = min(max(z + dz, 0), g.shape[0] - 1)
        yy = min(max(y + dy, 0), g.shape[1] - 1)
        xx = min(max(x + dx, 0), g.shape[2] - 1)
        return float(g[zz, yy, xx])

    steps = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    c = v()
    for i in range(3):
        e = steps[i]
        H[i, i] = (v(*e) - 2 * c + v(*(-k for k in e))) / spacing[i] ** 2
        for j in range(i + 1, 3):
            f = steps[j]
            pp = v(*(a + b for a, b in zip(e, f)))
            pm = v(*(a - b for a, b in zip(e, f)))
            mp = v(*(-a + b for a, b in zip(e, f)))
            mm = v(*(-a - b for a, b in zip(e, f)))
            H[i, j] = H[j, i] = (pp - pm - mp + mm) / (4 * spacing[i] * spacing[j])
    return H


def nodule_candidates(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float],
                      lung: np.ndarray | None = None, max_candidates: int = 50) -> list[tuple[tuple[int, int, int], float]]:
    """Ranked ``[(centre (z, y, x), score)]`` of ball-shaped soft-tissue foci in the lung, searched
    on the coarse grid of a fine volume (``coarse_grid``; centres given as voxels of ``hu_ZYX``,
    the middle of their block) unless a lung mask of ``hu_ZYX`` is given."""
    if lung is None:
        coarse, spacing_c, f = coarse_grid(hu_ZYX, spacing_zyx)
        if f != (1, 1, 1):
            return [(tuple(int(c * k + k // 2) for c, k in zip(centre, f)), score)
                    for centre, score in nodule_candidates(coarse, spacing_c, lung_mask(coarse), max_candidates)]
    hu = np.asarray(hu_ZYX, dtype=np.float32)
    lung = lung_mask(hu) if lung is None else lung
    if not lung.any():
        return []
    w = np.clip((hu + 750.0) / 780.0, 0.0, 1.0) * lung
    out = [((int(p[0]), int(p[1]), int(p[2])), score)
           for score, p, _ in log_blobs(w, spacing_zyx, SCALES_MM, ndimage.binary_erosion(lung, iterations=1))
           if hu[p] <= MAX_SOLID_HU]
    return out[:max_candidates]


def log_blobs(w_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float], radii_mm: tuple[float, ...],
              within_ZYX: np.ndarray) -> list[tuple[float, tuple[int, int, int], float]]:
    """Ball-shaped foci of the weight ``w_ZYX`` (0-1), best first, as ``[(score, centre voxel,
    radius mm)]``: a scale-normalised Laplacian of Gaussian at ``radii_mm`` (sigmas in mm, so thick
    slices and fine pixels are handled alike), its local maxima inside ``within_ZYX`` over 0.1,
    scored by the response times blobness (the Hessian's weakest / strongest eigenvalue at the
    best scale: a tube scores ~0, a ball ~1). Shared by the nodule and lymph-node detectors."""
    smooth, resp = [], []
    for r in radii_mm:
        s = r / np.sqrt(3.0)  # the LoG of a ball of radius r peaks at sigma r / sqrt(3)
        sig = tuple(max(s / float(sp), 0.5) for sp in spacing_zyx)
        smooth.append(ndimage.gaussian_filter(w_ZYX, sig))
        resp.append(-ndimage.gaussian_laplace(w_ZYX, sig) * s * s)
    R_SZYX = np.stack(resp)
    best_Z = R_SZYX.argmax(0)
    R = R_SZYX.max(0) * within_ZYX
    peaks = np.argwhere((R == ndimage.maximum_filter(R, size=(3, 5, 5))) & (R > 0.1))
    out = []
    for p in map(tuple, peaks):
        k = int(best_Z[p])
        s = radii_mm[k] / np.sqrt(3.0)
        ev = np.linalg.eigvalsh(_hessian_at(smooth[k], spacing_zyx, p) * s * s)  # ascending
        blob = float(ev[2] / ev[0]) if ev[0] < 0 and ev[2] < 0 else 0.0  # weakest / strongest curvature
        if blob > 0:
            out.append((float(R[p]) * blob, p, radii_mm[k]))
    out.sort(key=lambda c: -c[0])
    return out


def _background_and_centre(sl: np.ndarray, y: int, x: int, ry: int, rx: int) -> tuple[float, float]:
    """(the lung around (y, x): median below -500 HU within ry x rx pixels, -850 when too few;
    the centre's value: 3 x 3 median) on one axial slice."""
    patch = sl[max(y - ry, 0): y + ry + 1, max(x - rx, 0): x + rx + 1]
    lung_v = patch[patch < -500]
    background = float(np.median(lung_v)) if lung_v.size >= 10 else -850.0
    return background, float(np.median(sl[max(y - 1, 0): y + 2, max(x - 1, 0): x + 2]))


def axial_diameter_mm(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float],
                      center_zyx: tuple[int, int, int], n_rays: int = 32, max_radius_mm: float = 30.0) -> float | None:
    """Mean axial diameter (mm) of the focus at ``center_zyx``: twice the median distance at which
    the intensity falls half-way to the surrounding lung; None when it does not stand out."""
    z, y, x = center_zyx
    sl = np.asarray(hu_ZYX[z], dtype=np.float32)
    py, px = float(spacing_zyx[1]), float(spacing_zyx[2])
    background, target = _background_and_centre(sl, y, x, int(np.ceil(max_radius_mm / py)),
                                                int(np.ceil(max_radius_mm / px)))
    if target - background < MIN_CONTRAST_HU:
        return None
    step = 0.25
    d_mm = np.arange(0.0, max_radius_mm, step)
    radii = []
    for a in np.linspace(0.0, 2 * np.pi, n_rays, endpoint=False):
        yy, xx = y + d_mm * np.sin(a) / py, x + d_mm * np.cos(a) / px
        prof = ndimage.map_coordinates(sl, [yy, xx], order=1, mode="nearest")
        frac = (prof - background) / (target - background)
        below = np.nonzero(frac < 0.5)[0]
        if len(below) == 0 or below[0] == 0:
            continue
        j = int(below[0])
        radii.append(d_mm[j - 1] + (frac[j - 1] - 0.5) / (frac[j - 1] - frac[j]) * step)
    if len(radii) < n_rays // 4:
        return None
    return 2.0 * float(np.median(radii))


def _on_side(cands, side: str | None, width: int, patient_left_is_high_x: bool):
    if side not in ("left", "right"):
        return cands
    mid = (width - 1) / 2.0
    want_high = (side == "left") == patient_left_is_high_x
    return [c for c in cands if (c[0][2] > mid) == want_high]


def _centre_contrast(sl: np.ndarray, y: int, x: int) -> float:
    """Centre value over the lung around it within 16 px (:func:`_background_and_centre`)."""
    background, centre = _background_and_centre(sl, y, x, 16, 16)
    return centre - background


def largest_axial_diameter(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float],
                           centre_zyx: tuple[int, int, int], search_px: int = 2,
                           full_share: float = 0.85) -> tuple[tuple[int, int, int], float] | None:
    """The focus near ``centre_zyx`` measured where it is widest among the axial slices that cut it
    through its full density (the slice above, at or below, whose centre contrast reaches
    ``full_share`` of the best; the in-plane centre re-found on each as the brightest smoothed point
    within ``search_px``). A LoG peak of a ball cut by thick slices can sit one slice off its
    equator; a slice that only grazes the ball shows a faint, wide blur and is not measured."""
    z0, y0, x0 = centre_zyx
    seen = []
    for z in (z0 - 1, z0, z0 + 1):
        if not 0 <= z < hu_ZYX.shape[0]:
            continue
        sl = np.asarray(hu_ZYX[z], np.float32)
        ys, xs = slice(max(y0 - search_px, 0), y0 + search_px + 1), slice(max(x0 - search_px, 0), x0 + search_px + 1)
        sm = ndimage.gaussian_filter(sl[max(ys.start - 3, 0): ys.stop + 3, max(xs.start - 3, 0): xs.stop + 3], 1.0)
        oy, ox = ys.start - max(ys.start - 3, 0), xs.start - max(xs.start - 3, 0)
        win = sm[oy: oy + (ys.stop - ys.start), ox: ox + (xs.stop - xs.start)]
        dy, dx = np.unravel_index(int(np.argmax(win)), win.shape)
        c = (z, ys.start + int(dy), xs.start + int(dx))
        seen.append((c, _centre_contrast(sl, c[1], c[2])))
    if not seen:
        return None
    top = max(con for _, con in seen)
    best = None
    for c, con in seen:
        if con < full_share * top:
            continue
        d = axial_diameter_mm(hu_ZYX, spacing_zyx, c)
        if d is not None and (best is None or d > best[1]):
            best = (c, d)
    return best


class LungLookup:
    """The lung mask of a volume, computed once (on the coarse search grid of a fine volume,
    ``coarse_grid``) and read at any voxels of the volume itself."""

    def __init__(self, hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float]):
        coarse, _, self.factors = coarse_grid(hu_ZYX, spacing_zyx)
        self.mask = lung_mask(coarse)

    def at(self, zs: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """bool [len(zs), len(ys), len(xs)]: the lung at those voxel indices of the volume."""
        idx = [np.minimum(a // f, n - 1) for a, f, n in zip((zs, ys, xs), self.factors, self.mask.shape)]
        return self.mask[np.ix_(*idx)]


def fit_ball_diameter(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float], centre_zyx: tuple[int, int, int],
                      lung: LungLookup | None = None, box_mm: float = FIT_BOX_MM,
                      start_radii_mm: tuple[float, ...] = FIT_START_RADII_MM) -> float | None:
    """Diameter (mm) of the ball that best explains the CT around ``centre_zyx``; None when the fit
    fails or the ball does not stand ``MIN_FIT_CONTRAST_HU`` above the lung.

    The model: ``background + (density - background) * clip((r - d) / edge + 1/2, 0, 1)``, ``d`` the
    distance in mm from a centre free to move a slice and two pixels, ``edge`` one in-plane pixel
    (the partial volume of a voxel on the ball's surface); centre, radius, density and background
    fitted by robust least squares (``soft_l1``) to the lung's voxels within ``box_mm`` (a nodule
    touching the chest wall or the mediastinum is not pulled into them), from several starting radii.
    Unlike the caliper on one slice (:func:`largest_axial_diameter`) it uses every slice that cuts
    the ball, and a ball smaller than its slice spacing still pins its radius by how much of the
    density each slice holds: at the true centre of the 107 demo val nodules it gave the size to
    the millimetre for 83 % (solid 90 %), against 51 % for the caliper (session 27)."""
    from scipy.optimize import least_squares

    hu = np.asarray(hu_ZYX)
    sz, sy, sx = (float(v) for v in spacing_zyx)
    z0, y0, x0 = (int(v) for v in centre_zyx)
    half = [max(1, int(np.ceil(box_mm / s))) for s in (sz, sy, sx)]
    # a fine volume is fitted on every k-th voxel (no coarser than FIT_STEP_MM): the model is
    # continuous, and a 0.7 mm study would otherwise fit ~50,000 voxels per candidate
    step = [max(1, int(FIT_STEP_MM[i] // s)) for i, s in enumerate((sz, sy, sx))]
    zs, ys, xs = (np.arange(c - (min(h, c) // k) * k, min(c + h + 1, n), k)
                  for c, h, n, k in zip((z0, y0, x0), half, hu.shape, step))
    box_V = hu[np.ix_(zs, ys, xs)].astype(np.float64)  # [z, y, x] HU
    inside = (lung or LungLookup(hu, spacing_zyx)).at(zs, ys, xs).ravel()
    if inside.sum() < 8:
        return None
    Z, Y, X = np.meshgrid(zs * sz, ys * sy, xs * sx, indexing="ij")  # mm, each [z, y, x]
    Z, Y, X, V = Z.ravel()[inside], Y.ravel()[inside], X.ravel()[inside], box_V.ravel()[inside]
    edge = sy

    def residuals(p):
        cz, cy, cx, r, density, background = p
        d = np.sqrt((Z - cz) ** 2 + (Y - cy) ** 2 + (X - cx) ** 2)
        return (background + (density - background) * np.clip((r - d) / edge + 0.5, 0.0, 1.0) - V) / 50.0

    air = V[V < -500]
    background0 = float(np.median(air)) if air.size >= 10 else -850.0
    centre_mm = np.array([z0 * sz, y0 * sy, x0 * sx])
    move = np.array([max(sz, 2.5), max(2 * sy, 3.0), max(2 * sx, 3.0)])
    lo = np.concatenate([centre_mm - move, [0.5, -700.0, -1000.0]])
    hi = np.concatenate([centre_mm + move, [NODULE_RANGE_MM[1], 600.0, -400.0]])
    density0 = max(float(hu[z0, y0, x0]), background0 + 100.0)
    best = None
    for r0 in start_radii_mm:
        p0 = np.clip(np.concatenate([centre_mm, [r0, density0, background0]]), lo + 1e-6, hi - 1e-6)
        try:
            fit = least_squares(residuals, p0, bounds=(lo, hi), loss="soft_l1", max_nfev=200)
        except (ValueError, np.linalg.LinAlgError):
            continue
        if best is None or fit.cost < best.cost:
            best = fit
    if best is None or best.x[4] - best.x[5] < MIN_FIT_CONTRAST_HU:
        return None
    return 2.0 * float(best.x[3])


def _measure_at(hu, spacing_zyx, centre, lung: LungLookup | None, method: str):
    """(centre, diameter mm) of the focus at a candidate centre, or None."""
    if method == "fit":
        d = fit_ball_diameter(hu, spacing_zyx, centre, lung or LungLookup(hu, spacing_zyx))
        if d is not None:
            return centre, d
    return largest_axial_diameter(hu, spacing_zyx, centre)  # method "caliper", or where the ball model fails


def _first_measured(hu, spacing_zyx, cands, size_range_mm, top_k, lung: LungLookup | None = None,
                    method: str = "fit", memo: dict | None = None) -> NoduleMeasurement | None:
    if method not in MEASURE_METHODS:
        raise ValueError(f"method must be one of {MEASURE_METHODS}, not {method!r}")
    memo = {} if memo is None else memo  # centre -> measurement, shared by the sides of one study
    if method == "fit" and lung is None and cands:
        lung = LungLookup(hu, spacing_zyx)  # once for all candidates
    for centre, score in cands[:top_k]:
        if centre not in memo:
            memo[centre] = _measure_at(hu, spacing_zyx, centre, lung, method)
        if memo[centre] is None:
            continue
        centre, d = memo[centre]
        if size_range_mm is not None and not (size_range_mm[0] <= d <= size_range_mm[1]):
            continue
        return NoduleMeasurement(tuple(int(v) for v in centre), d, score)
    return None


def measure_nodule(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float], side: str | None = None,
                   patient_left_is_high_x: bool = True, size_range_mm: tuple[float, float] | None = NODULE_RANGE_MM,
                   top_k: int = 3, method: str = "fit") -> NoduleMeasurement | None:
    """The best-ranked lung nodule (optionally on ``side`` "left"/"right" of the patient, and with a
    diameter in ``size_range_mm``) among the ``top_k`` candidates that can be measured; None if none.
    ``patient_left_is_high_x``: whether column index grows toward the patient's left (axial images
    in the radiological convention, LPS +x)."""
    hu = np.asarray(hu_ZYX, dtype=np.float32)
    if hu.ndim != 3 or hu.shape[0] < 3:
        return None
    cands = _on_side(nodule_candidates(hu, spacing_zyx), side, hu.shape[2], patient_left_is_high_x)
    return _first_measured(hu, spacing_zyx, cands, size_range_mm, top_k, method=method)


def measure_by_side(hu_ZYX: np.ndarray, spacing_zyx: tuple[float, float, float],
                    patient_left_is_high_x: bool = True, top_k: int = 3,
                    cands: list | None = None, method: str = "fit") -> dict[str, NoduleMeasurement]:
    """The best nodule measurement (3-30 mm) in either lung and in each (keys "any", "left",
    "right"; a key is missing when nothing there can be measured), from one candidate search: the heads' side call
    is not known before the model runs, and the measurement goes in with the study's inputs.
    ``cands``: the search's result when the caller already has it (``nodule_candidates``)."""
    hu = np.asarray(hu_ZYX, dtype=np.float32)
    if hu.ndim != 3 or hu.shape[0] < 3:
        return {}
    cands = nodule_candidates(hu, spacing_zyx) if cands is None else cands
    lung = LungLookup(hu, spacing_zyx) if method == "fit" and cands else None
    out, memo = {}, {}
    for key in ("any", "left", "right"):
        m = _first_measured(hu, spacing_zyx, _on_side(cands, key, hu.shape[2], patient_left_is_high_x),
                            NODULE_RANGE_MM, top_k, lung, method, memo)
        if m is not None:
            out[key] = m
    return out


def detector_evidence(cands: list[tuple[tuple[int, int, int], float]]) -> float:
    """The detector's evidence that the study has a lung nodule: log(best candidate's score +
    0.001), about -6.9 when the lung holds no ball-shaped focus at all. The finding heads fuse it
    with their own logit (``multimodal.heads.fit_evidence_fusion``). On the demo val split it
    separated studies with and without a nodule at AUC 0.81 alone, 0.86 with the heads (0.78)."""
    return float(np.log((cands[0][1] if cands else 0.0) + EVIDENCE_FLOOR))
