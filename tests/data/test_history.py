"""History files: txt / md / pdf -> text, with clear errors."""
from __future__ import annotations

import pytest

from data.errors import HistoryError
from data.history import read_history


def _pdf_with_text(path, text):
    """A minimal one-page PDF with a text layer (hand-built: pypdf does not author text)."""
    content = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(bytes(out))


def test_txt_md_encodings(tmp_path):
    (tmp_path / "history.txt").write_bytes("\ufeffFièvre 38,5 °C\r\nToux".encode("utf-8"))
    assert read_history(tmp_path / "history.txt") == "\ufeffFièvre 38,5 °C\nToux".lstrip("\ufeff")
    (tmp_path / "history.md").write_bytes("# Hx\nCaf\xe9 worker".encode("cp1252"))
    assert read_history(tmp_path / "history.md") == "# Hx\nCafé worker"


def test_pdf(tmp_path):
    _pdf_with_text(tmp_path / "history.pdf", "Smoker 40 pack years")
    assert "Smoker 40 pack years" in read_history(tmp_path / "history.pdf")


def test_errors(tmp_path):
    with pytest.raises(HistoryError, match="must be"):
        read_history(tmp_path / "history.docx")
    with pytest.raises(HistoryError, match="does not exist"):
        read_history(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(HistoryError, match="binary"):
        read_history(tmp_path / "bin.txt")
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(HistoryError, match="PDF"):
        read_history(tmp_path / "bad.pdf")
    _pdf_with_text(tmp_path / "empty.pdf", "")
    with pytest.raises(HistoryError, match="no text layer"):
        read_history(tmp_path / "empty.pdf")
    (tmp_path / "big.txt").write_text("x" * 2000)
    with pytest.raises(HistoryError, match="limit"):
        read_history(tmp_path / "big.txt", max_bytes=1000)
