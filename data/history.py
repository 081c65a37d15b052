"""Patient-history files (txt, md, pdf) -> text.

Text files are decoded as UTF-8 (BOM accepted), falling back to Windows-1252, the usual
encoding of exports that are not UTF-8. PDFs go through ``pypdf``; a PDF without a text
layer (a scan) is refused with a message asking for OCR or a text file. Length policy
(what is cut when the record exceeds the decoder's budget) belongs to the tokenizer side;
here only a byte limit guards against absurd inputs.
"""
from __future__ import annotations

import logging
from pathlib import Path

from data.errors import HistoryError

log = logging.getLogger(__name__)

HISTORY_SUFFIXES = {".txt", ".md", ".pdf"}
MAX_BYTES = 50 << 20


def _decode_text(raw: bytes, name: str) -> str:
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")  # every byte sequence decodes; last resort


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception:
                ok = 0
            if not ok:
                raise HistoryError(f"{path.name} is password-protected; save an unprotected copy")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except HistoryError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError, IndexError, RecursionError) as exc:
        raise HistoryError(f"{path.name} could not be read as PDF ({exc.__class__.__name__}); export the history as .txt") from None
    text = "\n\n".join(p for p in pages if p)
    if not text.strip():
        raise HistoryError(f"{path.name} has no text layer (a scanned PDF?); run OCR on it or provide history.txt")
    return text


def read_history(path: str | Path, max_bytes: int = MAX_BYTES) -> str:
    """Text of a history file (.txt, .md or .pdf). Raises ``HistoryError`` with the fix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in HISTORY_SUFFIXES:
        raise HistoryError(f"{path.name}: history files must be {', '.join(sorted(HISTORY_SUFFIXES))}")
    try:
        size = path.stat().st_size
    except OSError:
        raise HistoryError(f"{path.name} does not exist or cannot be read; check the path") from None
    if size > max_bytes:
        raise HistoryError(f"{path.name} is {size / 2**20:.0f} MiB, above the {max_bytes / 2**20:.0f} MiB limit; shorten it")
    if suffix == ".pdf":
        text = _read_pdf(path)
    else:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise HistoryError(f"{path.name} cannot be read ({exc.__class__.__name__})") from None
        if b"\x00" in raw[:4096] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise HistoryError(f"{path.name} looks binary, not text; save it as plain text")
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            try:
                text = raw.decode("utf-16")
            except UnicodeDecodeError:
                raise HistoryError(f"{path.name} is not valid UTF-16 text; save it as UTF-8") from None
        else:
            text = _decode_text(raw, path.name)
    return text.replace("\r\n", "\n").replace("\r", "\n")
