"""Study-loading benchmark: ``python -m bench.io [--quick] [--slices N] [--size S]``.

Writes a synthetic CT series (default 300 slices of 512x512 int16, shuffled file names,
per-slice intercepts) and compares ``data.study.load_study`` with the plain baseline
(per file ``dcmread`` + ``pixel_array`` + ``apply_modality_lut``, then ``np.stack``):
wall time (best of ``--repeats``, warm page cache) and peak Python-heap memory
(``tracemalloc``, which sees numpy's buffers), relative to the float32 volume size.
Then the same for the series JPEG 2000-lossless compressed. Targets: time <= 1.5x the
baseline, peak memory <= 2.5x the float32 volume. Results: table on stdout and
``bench/results/io.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def write_series(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """A phantom-like int16 series: body ellipse, lungs, noise; per-slice intercepts."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1
    lungs = ((np.abs(xx) - 0.18) / 0.14) ** 2 + (yy / 0.22) ** 2 < 1
    base_hu = np.where(body, 40, -1000) + np.where(lungs & body, -850, 0)
    study, series = generate_uid(), generate_uid()
    names = rng.permutation(n)
    files = []
    for i in range(n):
        hu = base_hu + rng.normal(0, 20, base_hu.shape)
        intercept = -1024.0 if i % 7 else -1000.0
        stored = np.clip(np.round(hu - intercept), -32768, 32767).astype("<i2")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, int(names[i]) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-200, -200, -300 + 1.25 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.78, 0.78], 1.25
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{names[i]:05d}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def compress_series(files: list[Path], dest: Path) -> list[Path]:
    """JPEG 2000 lossless copies (pylibjpeg-openjpeg encoder)."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    dest.mkdir(parents=True, exist_ok=True)

    def one(f: Path) -> Path:
        ds = pydicom.dcmread(f)
        ds.compress(JPEG2000Lossless)
        out = dest / f.name
        ds.save_as(out, enforce_file_format=True)
        return out

    # Sequential: encoding from several threads crashed (segfault) in pylibjpeg-openjpeg here.
    return [one(f) for f in files]


def baseline(files: list[Path]) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        slices.append(apply_modality_lut(ds.pixel_array, ds))
    return np.stack(slices)


def ours(folder: Path) -> np.ndarray:
    from data.study import load_study

    return load_study(folder).volume


def _time(fn, arg, repeats: int) -> float:
    fn(arg)  # warm-up: page cache, imports
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        out = fn(arg)
        best = min(best, time.perf_counter() - t)
        del out
    return best


def _peak(fn, arg) -> int:
    gc.collect()
    tracemalloc.start()
    out = fn(arg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    return peak


def run_case(name: str, folder: Path, files: list[Path], repeats: int, vol_bytes: int) -> dict:
    ref = baseline(files)
    got = ours(folder)
    order = np.argsort([float(__import__("pydicom").dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files])
    exact = bool(np.array_equal(got, ref[order].astype(np.float32)))
    del ref, got
    tb, to = _time(baseline, files, repeats), _time(ours, folder, repeats)
    mb, mo = _peak(baseline, files), _peak(ours, folder)
    return {"case": name, "baseline_s": tb, "ours_s": to, "time_ratio": to / tb,
            "baseline_peak_mib": mb / 2**20, "ours_peak_mib": mo / 2**20,
            "ours_peak_vs_volume": mo / vol_bytes, "baseline_peak_vs_volume": mb / vol_bytes, "exact": exact}


def _load_note(detail: str) -> str:
    from bench.common import load_note  # imports torch: only at the end of a run

    return load_note(detail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 slices of 256x256, one repeat")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-j2k", action="store_true", help="skip the JPEG 2000 case")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "io.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.slices, args.size, args.repeats = 40, 256, 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_io_"))
    try:
        t = time.perf_counter()
        files = write_series(tmp / "raw", args.slices, args.size)
        print(f"wrote {args.slices} x {args.size}x{args.size} series in {time.perf_counter() - t:.1f} s")
        vol_bytes = args.slices * args.size * args.size * 4
        rows = [run_case("uncompressed", tmp / "raw", files, args.repeats, vol_bytes)]
        if not args.no_j2k:
            t = time.perf_counter()
            jfiles = compress_series(files, tmp / "j2k")
            print(f"JPEG 2000 lossless encode took {time.perf_counter() - t:.1f} s")
            rows.append(run_case("jpeg2000-lossless", tmp / "j2k", jfiles, max(1, args.repeats - 1), vol_bytes))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nfloat32 volume: {vol_bytes / 2**20:.0f} MiB; targets: time <= 1.5x baseline, peak <= 2.5x volume")
    print(f"{'case':<20}{'baseline s':>11}{'ours s':>9}{'ratio':>7}{'base MiB':>10}{'ours MiB':>10}{'ours/vol':>9}{'exact':>7}")
    for r in rows:
        print(f"{r['case']:<20}{r['baseline_s']:>11.2f}{r['ours_s']:>9.2f}{r['time_ratio']:>7.2f}"
              f"{r['baseline_peak_mib']:>10.0f}{r['ours_peak_mib']:>10.0f}{r['ours_peak_vs_volume']:>9.2f}{str(r['exact']):>7}")
    result = {"slices": args.slices, "size": args.size, "repeats": args.repeats, "volume_mib": vol_bytes / 2**20,
              "cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows,
              "note": _load_note("peak = tracemalloc heap peak")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
