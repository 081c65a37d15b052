"""Safe extraction of uploaded ``.zip`` studies.

The standard library's ``zipfile`` parses the archive; what it does not do is refuse
hostile archives, so the checks here are hand-written (no maintained library covers
this policy): no absolute paths or ``..`` components, no symlinks, a limit on the entry
count, on the total uncompressed size (counted while streaming, not trusted from the
header) and on the compression ratio. ``__MACOSX/``, ``._*`` AppleDouble files,
``.DS_Store`` and ``Thumbs.db`` are junk and skipped; nested folders are kept.
"""
from __future__ import annotations

import logging
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data.errors import StudyTooLargeError, UnsafeArchiveError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    """Limits applied to an uploaded archive (defaults fit a 2000-slice CT comfortably)."""

    max_entries: int = 20_000
    max_total_bytes: int = 8 << 30          # 8 GiB uncompressed
    max_ratio: float = 200.0                # uncompressed / compressed, per entry and in total
    ratio_min_bytes: int = 1 << 20          # ratios are only judged above this size (tiny files compress oddly)


def is_junk(name: str) -> bool:
    """True for macOS/Windows metadata that never carries images."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(p == "__MACOSX" for p in parts):
        return True
    base = parts[-1] if parts else ""
    return base.startswith("._") or base in {".DS_Store", "Thumbs.db", "desktop.ini"}


def _safe_relpath(name: str) -> PurePosixPath:
    """The member's path inside the destination, or raise for traversal / absolute paths."""
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or any(part == ".." for part in p.parts):
        raise UnsafeArchiveError(
            f"the zip contains an entry that points outside the archive ({name!r}); "
            "re-create the archive from the study folder itself"
        )
    parts = [part for part in p.parts if part not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath("")


def extract_zip(path: str | Path, dest: str | Path, limits: ZipLimits = ZipLimits()) -> list[Path]:
    """Extract ``path`` into ``dest`` (which must exist) after the safety checks.

    Returns the extracted regular files. Raises ``UnsafeArchiveError`` or
    ``StudyTooLargeError``; a file that is not a zip raises ``UnsafeArchiveError``
    with a message saying so.
    """
    path, dest = Path(path), Path(dest)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UnsafeArchiveError(f"{path.name} is not a readable zip archive ({exc.__class__.__name__}); re-export it") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise UnsafeArchiveError(
                f"{path.name} has {len(infos)} entries, more than the limit of {limits.max_entries}; "
                "upload one study per archive"
            )
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        declared = 0
        for info in infos:
            rel = _safe_relpath(info.filename)
            if info.is_dir() or is_junk(info.filename) or not rel.parts:
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"the zip contains a symbolic link ({info.filename!r}); archive the files themselves")
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"{path.name} is encrypted; upload an unencrypted archive")
            declared += info.file_size
            if info.file_size >= limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise UnsafeArchiveError(
                    f"entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                    f"(limit {limits.max_ratio:.0f}x): refusing a likely zip bomb"
                )
            plan.append((info, rel))
        if declared > limits.max_total_bytes:
            raise StudyTooLargeError(
                f"{path.name} expands to {declared / 2**30:.1f} GiB, more than the limit of "
                f"{limits.max_total_bytes / 2**30:.1f} GiB; upload a single series"
            )
        compressed = sum(i.compress_size for i, _ in plan)
        if declared >= limits.ratio_min_bytes and declared > limits.max_ratio * max(compressed, 1):
            raise UnsafeArchiveError(
                f"{path.name} expands {declared / max(compressed, 1):.0f}x (limit {limits.max_ratio:.0f}x): refusing a likely zip bomb"
            )

        out: list[Path] = []
        written = 0
        root = dest.resolve()
        for info, rel in plan:
            target = (root / rel).resolve()
            if root not in target.parents:
                raise UnsafeArchiveError(f"the zip entry {info.filename!r} points outside the archive; re-create the archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            entry_written = 0
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    # Count real bytes: headers can lie about sizes.
                    while chunk := src.read(_CHUNK):
                        entry_written += len(chunk)
                        written += len(chunk)
                        if written > limits.max_total_bytes:
                            raise StudyTooLargeError(
                                f"{path.name} expands beyond {limits.max_total_bytes / 2**30:.1f} GiB; upload a single series"
                            )
                        if entry_written > max(info.file_size, 0) and entry_written > limits.ratio_min_bytes:
                            raise UnsafeArchiveError(f"entry {info.filename!r} is larger than its header says: refusing the archive")
                        dst.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as exc:
                raise UnsafeArchiveError(
                    f"entry {info.filename!r} of {path.name} could not be extracted ({exc.__class__.__name__}); re-create the archive"
                ) from None
            out.append(target)
        log.debug("extracted %d files (%d bytes) from %s", len(out), written, path.name)
        return out


def remove_tree(path: str | Path) -> None:
    """Delete an extraction folder, ignoring errors (used for temporary folders)."""
    shutil.rmtree(path, ignore_errors=True)
