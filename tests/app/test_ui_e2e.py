"""The UI end to end against a live local server: ``gradio_client`` uploads the sample study as a
zip and receives the report (tiny untrained model, fast); with the shipped demo model, as
``make serve`` runs it, an example with findings the model has learned comes back with its
evidence heatmap, and a real browser (Debian's chromium driven by Playwright) clicks that
example, generates, edits, exports and saves a screenshot."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the test server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import EXAMPLES, REPO, tiny_model_dir  # noqa: E402

from app.pipeline import PipelineConfig, ReportPipeline  # noqa: E402
from data.report_format import SECTION_KEYS  # noqa: E402

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT_COPY = REPO / "bench" / "results" / "ui_screenshot.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live(app):
    """Launch a built UI on a free local port; yields its URL, closes it afterwards."""
    from app.ui import launch_kwargs

    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               max_file_size="50mb", **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live UI on 127.0.0.1 with the tiny model; yields its URL."""
    from app.ui import UIConfig, build_app

    pipe = ReportPipeline.from_dir(tiny_model_dir(tmp_path_factory),
                                   PipelineConfig(max_new_tokens=24, max_evidence_findings=2, evidence_threshold=0.0))
    yield from _live(build_app(EXAMPLES, pipeline=pipe, config=UIConfig(examples_dir=EXAMPLES)))


@pytest.fixture(scope="module")
def demo_server():
    """A live UI exactly as ``make serve`` builds it: the shipped demo model, default settings."""
    from app.ui import UIConfig, build_app

    demo = REPO / "models" / "demo"
    assert (demo / "model.safetensors").is_file(), "models/demo is shipped with the repository"
    yield from _live(build_app(EXAMPLES, config=UIConfig(model_dir=demo, examples_dir=EXAMPLES)))


HEATMAP_EXAMPLE = "syn00005"


def test_demo_model_example_comes_back_with_its_heatmap(demo_server):
    from gradio_client import Client

    from app.ui import NO_HEATMAP

    client = Client(demo_server, verbose=False)
    out = client.predict(None, HEATMAP_EXAMPLE, "", None, None, "", "lung", api_name="/generate")
    facts, _z, image, heat, jump, table, summary, scores, *sections = out
    calls = {row[0].lower(): row[2] for row in table["data"]}
    assert calls.get("hiatal hernia") == "present" and calls.get("emphysema") == "present", calls
    assert heat not in (None, "", NO_HEATMAP), "a finding's evidence heatmap should be shown"
    assert image and any(s.strip() for s in sections)


def test_client_uploads_zip_and_receives_report(server, tmp_path):
    from gradio_client import Client, handle_file

    study = EXAMPLES / "studies" / "syn00002"
    zpath = tmp_path / "study.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(study.glob("*.dcm")):
            zf.write(f, f"series/{f.name}")
    client = Client(server, verbose=False)
    out = client.predict(
        [handle_file(str(zpath))], None, (study / "history.txt").read_text(), None, None,
        (study / "reference.txt").read_text(), "lung", api_name="/generate",
    )
    facts, _z, image, _heat, _jump, table, summary, scores, *sections = out
    assert len(sections) == len(SECTION_KEYS) and any(s.strip() for s in sections)
    assert facts["modality"] == "CT" and len(facts["shape_zyx"]) == 3
    assert image  # the slice picture came back
    assert len(table["data"]) >= 1 and table["headers"][0] == "finding"
    assert "PRELIMINARY" in summary and "tokens" in summary  # the pasted history was read
    assert "BLEU-1" in scores


def test_client_example_by_name_uses_its_history(server):
    """An example named through the API with no history given reads the example's own record."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    out = client.predict(None, "syn00000", "", None, None, "", "lung", api_name="/generate")
    summary = out[6]
    assert (EXAMPLES / "studies" / "syn00000" / "history.txt").is_file()
    assert "**History**: none given" not in summary and "tokens" in summary
    assert "**Dictation**: none used" not in summary  # the example's dictation came along


def test_bad_upload_is_a_clean_error(server, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"not a dicom file")
    client = Client(server, verbose=False)
    with pytest.raises(Exception) as info:
        client.predict([handle_file(str(bad))], None, "", None, None, "", "lung", api_name="/generate")
    msg = str(info.value)
    print(msg)
    assert msg.strip() and "Traceback" not in msg and 'File "' not in msg


def test_without_model_generate_says_how_to_get_one():
    from gradio_client import Client

    from app.ui import UIConfig, build_app, launch_kwargs

    app = build_app(EXAMPLES, config=UIConfig(model_dir=None, examples_dir=EXAMPLES))
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="make demo-model"):
            client.predict(None, "syn00000", "", None, None, "", "lung", api_name="/generate")
    finally:
        app.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                    "(CI installs it: apt-get install -y chromium)")
def test_browser_example_generate_screenshot(demo_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

    shot = tmp_path / "ui.png"
    before = set(Path(tempfile.gettempdir()).glob("medreport_ui_*"))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(demo_server, wait_until="domcontentloaded")  # Gradio keeps a stream open: no "networkidle"
            sync_api.expect(page.locator("#clinical-notice")).to_contain_text("not for clinical use", timeout=30_000)
            page.get_by_label(HEATMAP_EXAMPLE).check()
            ref = page.locator("#reference textarea")
            sync_api.expect(ref).not_to_have_value("", timeout=30_000)  # the example filled its reference
            page.locator("#generate").click()
            findings = page.locator("#section-findings textarea")
            sync_api.expect(findings).not_to_have_value("", timeout=60_000)
            for key in SECTION_KEYS:
                assert page.locator(f"#section-{key} textarea").count() == 1
            sync_api.expect(page.locator("#context")).to_contain_text("PRELIMINARY", timeout=10_000)
            sync_api.expect(page.locator("#scores")).to_contain_text("BLEU-1", timeout=10_000)
            sync_api.expect(page.locator("#findings")).to_contain_text("Hiatal hernia", timeout=10_000)
            assert "present" in page.locator("#findings").inner_text()
            page.locator("#section-impression textarea").fill("Edited by the test clinician.")
            page.locator("#export").click()
            for name in ("report.txt", "report.json", "report.fhir.json", "report.sr.dcm"):
                link = page.locator(f"#downloads a[href$='/{name}']")  # the file's download link
                sync_api.expect(link).to_have_count(1, timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            made = set(Path(tempfile.gettempdir()).glob("medreport_ui_*")) - before
            assert made, "the export should have created the session's temp folder"
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    # closing the tab deletes the session's folder (Blocks.unload)
    deadline = time.monotonic() + 30
    while any(d.exists() for d in made) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(d.exists() for d in made), "session folder not deleted after the tab closed"
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)
