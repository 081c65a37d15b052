"""Zip safety: traversal, entry count, size, ratio bombs, junk; zipped studies load."""
from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _io_dicom import write_ct_series  # noqa: E402

from data.archive import ZipLimits, extract_zip, is_junk  # noqa: E402
from data.errors import StudyTooLargeError, UnsafeArchiveError  # noqa: E402
from data.study import LoadLimits, load_study  # noqa: E402


def _zip(path: Path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("name", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm", "C:/evil.dcm", "..\\evil.dcm"])
def test_path_traversal_refused(tmp_path, name):
    z = _zip(tmp_path / "x.zip", {"ok.dcm": b"1", name: b"2"})
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract_zip(z, tmp_path / "out")
    assert not (tmp_path / "evil.dcm").exists()


def test_symlink_entry_refused(tmp_path):
    z = tmp_path / "x.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(z, tmp_path / "out")


def test_too_many_entries(tmp_path):
    z = _zip(tmp_path / "x.zip", {f"f{i}": b"x" for i in range(30)})
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match="30 entries"):
        extract_zip(z, tmp_path / "out", ZipLimits(max_entries=10))


def test_too_large_total(tmp_path):
    z = _zip(tmp_path / "x.zip", {"a": np.random.default_rng(0).bytes(40_000), "b": np.random.default_rng(1).bytes(40_000)})
    (tmp_path / "out").mkdir()
    with pytest.raises(StudyTooLargeError, match="GiB"):
        extract_zip(z, tmp_path / "out", ZipLimits(max_total_bytes=50_000))


def test_ratio_bomb(tmp_path):
    z = _zip(tmp_path / "x.zip", {"bomb": b"\0" * (8 << 20)})
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        extract_zip(z, tmp_path / "out")


def test_lying_header_is_caught_while_streaming(tmp_path):
    """An entry whose header under-states its size is stopped by counting real bytes."""
    data = np.random.default_rng(2).bytes(3 << 20)
    z = _zip(tmp_path / "x.zip", {"a": data}, compression=zipfile.ZIP_STORED)
    raw = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.infolist()[0]
    # Patch the central directory's uncompressed size to 1 MiB (offset 24 in the central header).
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24: cd + 28] = (1 << 20).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    (tmp_path / "out").mkdir()
    with pytest.raises((UnsafeArchiveError, StudyTooLargeError)):
        extract_zip(z, tmp_path / "out", ZipLimits(max_total_bytes=2 << 20))
    assert info.file_size == 3 << 20


def test_not_a_zip(tmp_path):
    p = tmp_path / "x.zip"
    p.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(UnsafeArchiveError, match="not a readable zip"):
        load_study(p)


def test_junk_names():
    assert is_junk("__MACOSX/a/._b") and is_junk("x/.DS_Store") and is_junk("._IM0001") and is_junk("Thumbs.db")
    assert not is_junk("study/IM0001") and not is_junk("MACOSX/a")


def test_zipped_study_with_nested_folders_and_macosx_loads(tmp_path):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 2000, size=(5, 8, 8)).astype(np.float32)
    w = write_ct_series(tmp_path / "s", hu, rng=rng)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in w.files:
            zf.write(f, f"export/DICOM/{f.name}")
            zf.writestr(f"__MACOSX/export/DICOM/._{f.name}", b"\0\5\26\7 junk")
        zf.writestr("export/.DS_Store", b"junk")
        zf.writestr("export/history.txt", b"62-year-old smoker with cough.")
    (tmp_path / "study.zip").write_bytes(buf.getvalue())
    study = load_study(tmp_path / "study.zip")
    np.testing.assert_array_equal(study.volume, w.hu)
    assert study.metadata["archive"] == "study.zip"
    assert not any("._" in f["file"] and "MACOSX" in f["file"] for f in study.skipped_files)


def test_zip_limits_flow_through_load_study(tmp_path):
    z = _zip(tmp_path / "x.zip", {f"f{i}": b"x" for i in range(5)})
    with pytest.raises(UnsafeArchiveError):
        load_study(z, limits=LoadLimits(zip=ZipLimits(max_entries=2)))
