"""The clinician's web UI (Gradio 6).

Handlers are plain functions (tested without a server); ``build_app`` wires them into Gradio
Blocks. The flow: pick an example (one click: it also fills history, dictation and reference) or
upload a study (DICOM files / a zip / NIfTI / PNG / JPEG, companions ``history.*`` and
``dictation.*`` recognised among the files) -> Generate (progress by pipeline stage) -> edit
the report sections -> export TXT / JSON / FHIR / DICOM SR, with scoring against a reference
when one is given.

Operation: one model loaded per server (``ReportPipeline``), a queue with a concurrency limit,
a maximum upload size (``launch(max_file_size=)``), a per-session temporary folder deleted when
the session ends or times out (``gr.State(delete_callback=, time_to_live=)``) and Gradio's cache
swept (``Blocks(delete_cache=)``). Loader errors reach the browser as ``gr.Error`` (message only,
no traceback); logs carry counts and timings, never names, paths or UIDs.
"""
# No ``from __future__ import annotations`` here: Gradio reads the ``gr.Request`` annotations of
# the handlers defined inside ``build_app`` at runtime, which string annotations would hide.
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from app import NOT_FOR_CLINICAL_USE

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = REPO / "examples"
DEFAULT_MODEL_DIR = REPO / "models" / "demo"
VIEW_WINDOWS = ("lung", "mediastinum", "bone")
NO_HEATMAP = "(none)"
NO_MODEL_MESSAGE = (
    "Report generation needs a trained model: run `make demo-model` (or start with "
    "`medreport serve --model DIR`). The study viewer works without one."
)
FINDING_COLUMNS = ["finding", "p", "call", "where", "key z"]  # narrow: fits beside the report
# The per-report fast path: greedy decoding instead of the server's (the demo model's MBR over 8
# sampled reports takes ~3x as long: 4.4 s against 1.5 s at a 2K-token record, bench.e2e).
FAST_DRAFT = "Fast draft: greedy decoding, about 3x faster (the server's decoding scored higher on validation)"


@dataclass
class UIConfig:
    """Server-side settings of the UI (``medreport serve`` fills them from its flags)."""

    model_dir: Path | None = None  # None: the UI runs as a viewer and says how to get a model
    examples_dir: Path = DEFAULT_EXAMPLES
    concurrency_limit: int = 2  # reports generated at once (CPU-bound)
    max_queue: int = 32
    session_ttl_s: int = 3600  # a session's temp folder is deleted after this long at the latest
    cache_sweep: tuple[int, int] = (1800, 3600)  # Gradio cache: (every s, older than s)


@dataclass
class ViewerState:
    """The loaded study and its de-identified facts."""

    study: Any
    facts: dict


@dataclass
class Session:
    """Per-browser-session state: the study on screen, the last report and a private temp folder."""

    viewer: ViewerState | None = None
    report: Any = None  # app.report.Report
    workdir: Path | None = None

    def dir(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="medreport_ui_"))
        return self.workdir


def cleanup_session(session: Session | None) -> None:
    """Delete the session's temporary folder (exports); called when the session ends or times out."""
    if isinstance(session, Session) and session.workdir is not None:
        shutil.rmtree(session.workdir, ignore_errors=True)
        session.workdir = None


# ------------------------------------------------------------------------------ inputs
def list_examples(examples_dir: Path = DEFAULT_EXAMPLES) -> list[Path]:
    """Study folders of the bundled sample (one click each in the UI)."""
    root = Path(examples_dir) / "studies"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir())


@dataclass
class ExampleInputs:
    study_dir: Path
    history_text: str
    dictation: str | None
    reference_text: str


def example_inputs(examples_dir: Path, name: str) -> ExampleInputs:
    """What one click on an example fills in: the study, its history, dictation and reference."""
    from data.errors import MedreportError
    from data.study import find_study_files

    folder = Path(examples_dir) / "studies" / name
    if not name or not folder.is_dir():
        raise MedreportError(f"no example study named {name!r}: pick one from the list")
    sf = find_study_files(folder)
    history = sf.history.read_text(encoding="utf-8", errors="replace") if sf.history and sf.history.suffix != ".pdf" else ""
    ref = folder / "reference.txt"
    return ExampleInputs(folder, history, str(sf.dictation) if sf.dictation else None,
                         ref.read_text(encoding="utf-8") if ref.is_file() else "")


def split_companions(paths: list[str | Path]) -> tuple[list[Path], Path | None, Path | None]:
    """Uploaded files -> (image files, history file, dictation file), companions found by name."""
    from data.study import COMPANION_SUFFIXES

    images, history, dictation = [], None, None
    for p in map(Path, paths):
        stem, suf = p.stem.lower(), p.suffix.lower()
        if stem == "history" and suf in COMPANION_SUFFIXES["history"]:
            history = history or p
        elif stem == "dictation" and suf in COMPANION_SUFFIXES["dictation"]:
            dictation = dictation or p
        elif stem == "reference" and suf in COMPANION_SUFFIXES["reference"]:
            continue  # a reference is scored against, never fed to the model
        else:
            images.append(p)
    return images, history, dictation


def study_facts(study: Any) -> dict:
    """De-identified facts shown to the user (no names, IDs, dates or UIDs)."""
    vol = study.volume
    return {
        "modality": study.modality,
        "kind": study.kind,
        "series_description": study.series_description,
        "shape_zyx": list(vol.shape),
        "spacing_mm_zyx": [round(float(s), 3) for s in study.spacing_mm],
        "value_range": [round(float(vol.min()), 1), round(float(vol.max()), 1)],
        "series_picked_because": study.picked_reason,
        "skipped_series": study.skipped_series,
        "skipped_files": study.skipped_files[:20],
        "warnings": study.warnings,
        "metadata": study.metadata,
    }


def load_for_viewer(paths: list[str] | str | Path | None) -> ViewerState:
    """Load an upload (files, a zip, NIfTI, PNG/JPEG) or an example folder for the viewer."""
    from data.errors import EmptyStudyError
    from data.study import load_study

    if not paths:
        raise EmptyStudyError("Nothing was uploaded: add DICOM files, a zip, a NIfTI file or a PNG/JPEG radiograph, or pick an example.")
    if isinstance(paths, (list, tuple)):
        images, _, _ = split_companions(list(paths))
        if not images:
            raise EmptyStudyError("Only companion files (history / dictation / reference) were uploaded: add the images too.")
        target: Path | list[Path] = images[0] if len(images) == 1 else images
    else:
        target = Path(paths)
    study = load_study(target)
    return ViewerState(study=study, facts=study_facts(study))


# ------------------------------------------------------------------------------ viewer
def slab_of_z(report: Any, z: int) -> int | None:
    """The model slab whose original z range holds slice ``z`` (None without slab ranges)."""
    rng = getattr(report, "slab_z_ranges", None)
    if rng is None or len(rng) == 0:
        return None
    rng = np.asarray(rng)  # (S, 2) [start, stop)
    inside = np.nonzero((rng[:, 0] <= z) & (z < rng[:, 1]))[0]
    if len(inside):
        return int(inside[0])
    return int(np.argmin(np.abs((rng[:, 0] + rng[:, 1]) / 2 - z)))  # nearest slab centre


def render_slice(state: ViewerState | None, z: int, window: str, report: Any = None,
                 finding: str | None = None, alpha: float = 0.45) -> np.ndarray | None:
    """One slice in the chosen window: 8-bit grayscale (Y, X), or RGB (Y, X, 3) with the evidence
    heatmap of ``finding`` blended on top (jet colormap, weighted by the heat itself)."""
    from data.preprocess import window_stack

    if state is None:
        return None
    vol = state.study.volume
    z = int(np.clip(z, 0, vol.shape[0] - 1))
    if state.study.kind == "radiograph":
        img = vol[z]
    else:
        img = window_stack(vol[z : z + 1], windows=(window,))[0, 0]  # (Y, X) in [0, 1]
    gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    heat = None
    if report is not None and finding and finding in getattr(report, "heatmaps", {}):
        s = slab_of_z(report, z)
        if s is not None:
            heat = _resize(report.heatmaps[finding][s], gray.shape)  # (Y, X) in [0, 1]
    if heat is None:
        return (gray * 255.0 + 0.5).astype(np.uint8)
    from matplotlib import colormaps

    color = colormaps["jet"](heat)[..., :3].astype(np.float32)  # (Y, X, 3)
    w = (alpha * heat)[..., None]  # cold areas stay plain grayscale
    rgb = gray[..., None] * (1.0 - w) + color * w
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _resize(a_HW: np.ndarray, shape_YX: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a heatmap to the slice size (PIL, float mode), clipped to [0, 1]."""
    from PIL import Image

    img = Image.fromarray(np.asarray(a_HW, dtype=np.float32), mode="F")
    out = np.asarray(img.resize((shape_YX[1], shape_YX[0]), Image.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


# ------------------------------------------------------------------------------ report views
def findings_table(report: Any) -> list[list]:
    """Rows for the findings table, most probable first."""
    rows = []
    for f in sorted(report.findings, key=lambda r: -r.probability):
        call = "UNCERTAIN" if f.uncertain else ("present" if f.present else "absent")
        side = None if (f.side and f.location and f.location.startswith(f.side)) else f.side  # not "right right upper lobe"
        where = " ".join(x for x in (side, f.location) if x)
        if getattr(f, "location_from_record", False):
            where += " (from the record)"
        elif getattr(f, "location_from_detector", False):
            where += " (placed by the detector)"
        if getattr(f, "size_mm", None) is not None:
            where += f", {f.size_mm:g} mm (auto-measured)"
        if getattr(f, "detector", None):
            call += f" (with the {f.detector})"
        rows.append([f.display, round(float(f.probability), 2), call, where,
                     ", ".join(str(k.z) for k in f.key_slices)])
    return rows


def key_slice_choices(report: Any) -> list[tuple[str, str]]:
    """(label, value) pairs for the jump-to-key-slice list; value is ``finding|z``."""
    display = {f.name: f.display for f in report.findings}
    return [(f"{display.get(n, n)} - z {k.z} (evidence {k.score:.2f})", f"{n}|{k.z}") for n, k in report.key_slices()]


def parse_key_slice(value: str | None) -> tuple[str, int] | None:
    if not value or "|" not in value:
        return None
    name, z = value.rsplit("|", 1)
    return name, int(z)


def context_summary(report: Any) -> str:
    """Markdown: what the history and the dictation contributed (token counts, truncation, the
    audio's gate weight; there is no transcript), consistency and warnings."""
    h, a, g = report.history, report.audio, report.gates
    lines = [f"**Status: {report.status.upper()}** - {NOT_FOR_CLINICAL_USE}", ""]
    if h.get("given"):
        lines.append(f"**History** ({h.get('source', 'text')}): {h['message']}; "
                     f"policy when too long: {h.get('policy', 'keep the most recent tokens')}.")
    else:
        lines.append("**History**: none given.")
    if a.get("given"):
        lines.append(f"**Dictation**: {a['seconds']} s of audio. The model listens to it through a gate: "
                     f"weight {g.get('audio', 0.0):.2f} (0 = ignored, 1 = full weight). "
                     "There is no transcript: the audio only shifts the model's reading.")
    else:
        lines.append("**Dictation**: none used" + (f" ({a['error']})" if a.get("error") else "") + ".")
    if g:
        lines.append("**Modality gates**: " + ", ".join(f"{k} {v:.2f}" for k, v in g.items()))
    c = report.consistency
    if c.get("n"):
        lines.append(f"**Text vs finding heads**: {c['agreement_rate']:.0%} of {c['n']} findings agree.")
        lines += [f"- {d['message']}" for d in c.get("disagreements", [])]
    lines += [f"- WARNING: {w}" for w in report.warnings]
    gen = report.provenance.get("generation", {})
    if gen.get("strategy"):
        how = {"greedy": "greedy (one report)", "beam": f"beam search ({gen.get('num_beams', '?')} beams)",
               "mbr": f"MBR over {gen.get('num_samples', '?')} sampled reports", "sample": "sampling"}
        # the provenance holds the MBR weights only when MBR decoded
        favours = [what for key, what in (("calls_agreement", "agreement with the findings table"),
                                          ("record_agreement", "the record's known cancers and resections answered"),
                                          ("acquisition_agreement", "a Technique that states the scan's contrast"))
                   if (gen.get(key) or 0) > 0]
        lines.append(f"**Decoding**: {how.get(gen['strategy'], gen['strategy'])}"
                     + (f", the choice favouring {_and_list(favours)}" if favours else "") + ".")
    t = report.provenance.get("timings_s", {})
    if t:
        lines.append("**Timings**: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    return "\n\n".join(lines)


def _and_list(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def score_markdown(scores: dict | None) -> str:
    """Markdown for ``app.evaluate.score_single``'s result, the differing findings highlighted."""
    if not scores:
        return "No reference report: paste or upload one to score the generated report against it."
    b = " | ".join(f"{scores[k]:.3f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4") if k in scores)
    lines = [f"**Against the reference** ({scores.get('bleu_kind', 'BLEU')}):", "",
             "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | finding agreement |", "|---|---|---|---|---|",
             f"| {b} | {scores['finding_agreement']:.0%} |", ""]
    differ = scores.get("findings_that_differ", [])
    if differ:
        lines.append("**Findings that differ** (labeller reading of both texts):")
        for d in differ:
            lines.append(f"- <mark>**{d['finding']}**</mark>: generated {'present' if d['generated'] else 'absent'}, "
                         f"reference {'present' if d['reference'] else 'absent'}")
    else:
        lines.append("The generated and reference reports agree on every finding.")
    return "\n".join(lines)


def score_report(report: Any, sections: dict[str, str] | None, reference_text: str | None) -> dict | None:
    """Score the (edited) report against a reference text with ``app.evaluate.score_single``."""
    from app.evaluate import score_single

    if report is None or not (reference_text or "").strip():
        return None
    rep = report.with_edits(sections) if sections else report
    return score_single(rep.report_text, reference_text)


def read_reference(path: str | Path | None) -> str:
    """An uploaded reference: ``.txt`` as is, ``.json`` via ``app.evaluate.read_reports``."""
    if not path:
        return ""
    import json

    from data.errors import MedreportError
    from data.report_format import SECTION_KEYS, format_report

    p = Path(path)
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() != ".json":
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise MedreportError("the reference .json is not valid JSON: upload a report.json / reference.json "
                             "(with 'report' or 'sections') or a plain .txt report") from None
    if isinstance(obj, dict) and isinstance(obj.get("report"), str):
        return obj["report"]
    if isinstance(obj, dict) and isinstance(obj.get("sections"), dict):
        return format_report({k: v for k, v in obj["sections"].items() if k in SECTION_KEYS})
    raise MedreportError("the reference .json has neither a 'report' text nor 'sections': upload a .txt report instead")


def export_report(report: Any, sections: dict[str, str] | None, out_dir: Path) -> list[Path]:
    """The edited report (generated original kept alongside) as TXT, JSON, FHIR and DICOM SR."""
    from app.export import write_report

    rep = report.with_edits(sections) if sections else report
    out = write_report(rep, out_dir, formats=("txt", "json", "fhir", "sr"))
    return [out[k] for k in ("txt", "json", "fhir", "sr")]


# ------------------------------------------------------------------------------ generation
def digest_markdown(pipe: Any, history_text: str | None = None, history_path: str | Path | None = None) -> str:
    """Markdown: the relevant-history digest the model read right before writing (models trained
    with ``history_digest_words``), so the clinician sees which sentences of the record it could
    draw on; "" when the model reads no digest or there is no history. Shown in the UI only: the
    digest is record text, so it is never written to report files or logs."""
    from data.errors import MedreportError
    from data.history import read_history
    from data.history_digest import digest

    words = pipe.model.cfg.history_digest_words
    if not words:
        return ""
    text = history_text if (history_text or "").strip() else None
    if text is None and history_path:
        try:
            text = read_history(history_path)
        except MedreportError:
            return ""
    d = digest(text, words) if text else ""
    if not d:
        return ""
    body = "\n".join(d.splitlines()[1:])
    return ("\n\n**Relevant history the model read** (sentences extracted from the record by rule - "
            "indication, allergies, cancer, surgery, prior chest imaging, smoking - and read right before the "
            "report; the model can copy from them):\n\n```text\n" + body + "\n```")


def run_generation(pipe: Any, viewer: ViewerState, history_text: str | None = None,
                   history_file: str | Path | None = None, audio_path: str | Path | None = None,
                   companions: tuple[Path | None, Path | None] = (None, None),
                   progress: Callable[[str, float], None] | None = None, fast_draft: bool = False):
    """Report of the loaded study. A pasted history wins over a history file, an explicit file
    over one found among the uploads; likewise for the dictation. ``fast_draft``: decode this one
    report greedily whatever the server's decoding (``FAST_DRAFT``); the report's provenance says
    which decoding wrote it."""
    from app.pipeline import StudyParts

    if fast_draft and pipe.config.strategy != "greedy":
        pipe = pipe.with_config(strategy="greedy")

    hist_path = history_file or companions[0]
    audio = audio_path or companions[1]
    parts = StudyParts(images=viewer.study, history_path=hist_path,
                       history_text=history_text if (history_text or "").strip() else None, audio_path=audio)
    return pipe.run(parts, progress=progress)


def warm_up(pipe: Any, examples_dir: Path = DEFAULT_EXAMPLES) -> float:
    """Run the pipeline's loading stage once on the first example (imports, audio resampler,
    tokenizer caches: ~4-7 s on a cold process) so the first clinician does not pay for it.
    Returns the seconds spent; never raises (a failed warm-up only costs the first user time)."""
    import time

    t0 = time.perf_counter()
    try:
        ex = list_examples(examples_dir)
        if ex:
            inputs = example_inputs(examples_dir, ex[0].name)
            viewer = load_for_viewer(str(inputs.study_dir))
            pipe.prepare(viewer.study, inputs.history_text or None,
                         Path(inputs.dictation) if inputs.dictation else None, [])
    except Exception as exc:  # noqa: BLE001 - best effort by design
        log.warning("UI warm-up skipped: %s", type(exc).__name__)
    return time.perf_counter() - t0


def theme():
    """Gradio's default look with system fonts: the default theme fetches Google Fonts, which an
    offline hospital network (and CI) cannot reach. Pass to ``launch(theme=...)`` (Gradio 6)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


CSS = (
    "#clinical-notice { border-left: 4px solid #b91c1c; padding-left: 8px; } mark { background: #fde68a; }\n"
    # small volumes (64 px synthetic slices) are scaled up to the viewer's size, pixels kept sharp
    "#slice img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
)


def launch_kwargs() -> dict:
    """What ``launch`` needs besides host/port/auth: theme and CSS (moved there in Gradio 6), no
    public share link, no footer links, errors as messages only."""
    return {"theme": theme(), "css": CSS, "share": False, "footer_links": [], "show_error": False}


def build_app(examples_dir: Path = DEFAULT_EXAMPLES, model_dir: Path | None = None,
              config: UIConfig | None = None, pipeline: Any = None):
    """Gradio Blocks for the product. ``pipeline`` (a loaded ``ReportPipeline``) or ``model_dir``
    enables generation; without either the UI is a viewer that says how to get a model.
    Imported lazily so the CLI does not pay for Gradio."""
    import gradio as gr

    from data.errors import MedreportError
    from data.report_format import SECTION_HEADINGS, SECTION_KEYS

    cfg = config or UIConfig(model_dir=model_dir, examples_dir=Path(examples_dir))
    examples = list_examples(cfg.examples_dir)
    holder: dict[str, Any] = {"pipe": pipeline}  # the model is loaded once per server, on first use
    live_dirs: dict[str, Path] = {}  # session hash -> that session's temp folder (this server only)

    def user_error(message: str):
        """A message for the browser; not printed on the server (it may name an uploaded file)."""
        return gr.Error(message, print_exception=False)

    def get_pipe():
        if holder["pipe"] is None and cfg.model_dir is not None and Path(cfg.model_dir).is_dir():
            from app.pipeline import ReportPipeline

            holder["pipe"] = ReportPipeline.from_dir(cfg.model_dir)
        return holder["pipe"]

    def _load(files, example) -> ViewerState:
        try:
            if files:
                return load_for_viewer(list(files) if isinstance(files, (list, tuple)) else [files])
            if example:
                return load_for_viewer(str(Path(cfg.examples_dir) / "studies" / example))
            return load_for_viewer(None)
        except MedreportError as exc:
            raise user_error(str(exc)) from None

    def _viewer_outputs(viewer: ViewerState, z: int | None = None):
        n = viewer.study.volume.shape[0]
        z = n // 2 if z is None else z
        return (viewer.facts, gr.update(minimum=0, maximum=max(n - 1, 0), value=z, step=1, interactive=n > 1))

    # ---- event handlers (thin wrappers around the functions above)
    def on_example(name, session):
        if not name:
            return gr.update(), gr.update(), gr.update(), gr.update(), session, gr.update(), gr.update(), gr.update()
        try:
            ex = example_inputs(cfg.examples_dir, name)
        except MedreportError as exc:
            raise user_error(str(exc)) from None
        viewer = _load(None, name)
        session.viewer, session.report = viewer, None
        facts, zu = _viewer_outputs(viewer)
        img = render_slice(viewer, viewer.study.volume.shape[0] // 2, "lung")
        return None, ex.history_text, ex.dictation, ex.reference_text, session, facts, zu, img

    def on_load(files, example, session, window):
        viewer = _load(files, example)
        session.viewer, session.report = viewer, None
        facts, zu = _viewer_outputs(viewer)
        return session, facts, zu, render_slice(viewer, viewer.study.volume.shape[0] // 2, window)

    def on_generate(files, example, history_text, history_file, audio, reference_text, window, session,
                    fast_draft=False, progress=gr.Progress()):
        pipe = get_pipe()
        if pipe is None:
            raise user_error(NO_MODEL_MESSAGE)
        progress(0.0, desc="loading")
        viewer = _load(files, example)
        companions = (None, None)
        if example and not files and not (history_text or "").strip() and not history_file:
            # An example named without a history (the API, or a cleared box): the example study
            # comes with its own record and dictation, as a study folder brings its companions.
            try:
                ex = example_inputs(cfg.examples_dir, example)
            except MedreportError as exc:
                raise user_error(str(exc)) from None
            history_text, audio = ex.history_text, audio or ex.dictation
        if files:
            _, h, d = split_companions(list(files) if isinstance(files, (list, tuple)) else [files])
            companions = (h, d)
        try:
            report = run_generation(pipe, viewer, history_text, history_file, audio, companions,
                                    progress=lambda stage, f: progress(f, desc=stage), fast_draft=bool(fast_draft))
        except MedreportError as exc:
            raise user_error(str(exc)) from None
        session.viewer, session.report = viewer, report
        facts, _ = _viewer_outputs(viewer)
        keys = key_slice_choices(report)
        first = parse_key_slice(keys[0][1]) if keys else None
        finding = first[0] if first else NO_HEATMAP
        z = first[1] if first else viewer.study.volume.shape[0] // 2
        n = viewer.study.volume.shape[0]
        heat_choices = [NO_HEATMAP] + sorted(report.heatmaps)
        scores = score_report(report, None, reference_text)
        sect = [report.sections.get(k, "") for k in SECTION_KEYS]
        log.info("UI: report generated (%d findings, %d key slices)", len(report.findings), len(keys))
        return (session, facts,
                gr.update(minimum=0, maximum=max(n - 1, 0), value=z, step=1, interactive=n > 1),
                render_slice(viewer, z, window, report, finding if finding != NO_HEATMAP else None),
                gr.update(choices=heat_choices, value=finding),
                gr.update(choices=keys, value=keys[0][1] if keys else None),
                findings_table(report),
                context_summary(report) + digest_markdown(pipe, history_text, history_file or companions[0]),
                score_markdown(scores), *sect)

    def on_view(session, z, window, finding):
        if session.viewer is None:
            return None
        return render_slice(session.viewer, z, window, session.report, None if finding == NO_HEATMAP else finding)

    def on_jump(session, value, window):
        ks = parse_key_slice(value)
        if ks is None or session.viewer is None:
            return gr.update(), gr.update(), gr.update()
        name, z = ks
        return gr.update(value=z), gr.update(value=name), render_slice(session.viewer, z, window, session.report, name)

    def _sections(values) -> dict[str, str]:
        return {k: (v or "") for k, v in zip(SECTION_KEYS, values)}

    def on_export(request: gr.Request, session, *values):
        if session.report is None:
            raise user_error("Generate a report first.")
        if request is not None and request.session_hash:
            live_dirs[request.session_hash] = session.dir()  # deleted by ``on_unload`` when the tab closes
        out = session.dir() / f"export_{len(list(session.dir().iterdir()))}"
        return [str(p) for p in export_report(session.report, _sections(values), out)]

    def on_score(session, reference_text, reference_file, *values):
        if session.report is None:
            raise user_error("Generate a report first.")
        try:
            ref = reference_text if (reference_text or "").strip() else read_reference(reference_file)
        except MedreportError as exc:
            raise user_error(str(exc)) from None
        return score_markdown(score_report(session.report, _sections(values), ref))

    def on_unload(request: gr.Request):
        """Tab closed: delete the session's exports now (the State's delete_callback and time-out
        are the backstops; Gradio deletes the State itself only 60 minutes after a disconnect)."""
        d = live_dirs.pop(getattr(request, "session_hash", None), None)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    def on_reference_file(path):
        try:
            return read_reference(path) if path else gr.update()
        except MedreportError as exc:
            raise user_error(str(exc)) from None

    # ---- layout
    with gr.Blocks(title="medreport", delete_cache=cfg.cache_sweep) as app:
        gr.Markdown("# medreport\nStructured CT radiology reports, with the evidence shown. **Every report is PRELIMINARY.**")
        gr.Markdown(f"**{NOT_FOR_CLINICAL_USE}**", elem_id="clinical-notice")
        session = gr.State(Session(), time_to_live=cfg.session_ttl_s, delete_callback=cleanup_session)
        with gr.Row():
            with gr.Column(scale=1):
                example = gr.Radio([p.name for p in examples], value=None, label="Example studies (synthetic): one click",
                                   elem_id="examples")
                files = gr.File(label="…or upload a study: DICOM files, a .zip, NIfTI or PNG/JPEG "
                                      "(history.* and dictation.* among them are used too)",
                                file_count="multiple", type="filepath")
                history_text = gr.Textbox(label="Patient history (paste)", lines=4, max_lines=12)
                history_file = gr.File(label="…or a history file (txt, md, pdf)", file_types=[".txt", ".md", ".pdf"],
                                       type="filepath")
                audio = gr.Audio(label="Dictation (upload or record; no transcript is made)",
                                 sources=["upload", "microphone"], type="filepath")
                fast = gr.Checkbox(value=False, label=FAST_DRAFT, elem_id="fast-draft")
                with gr.Row():
                    load_btn = gr.Button("Load study")
                    gen_btn = gr.Button("Generate report", variant="primary", elem_id="generate")
                if pipeline is None and (cfg.model_dir is None or not Path(cfg.model_dir).is_dir()):
                    gr.Markdown(NO_MODEL_MESSAGE, elem_id="no-model")
            with gr.Column(scale=2):
                image = gr.Image(label="Slice (evidence heatmap overlaid)", type="numpy", image_mode=None, height=420,
                                 elem_id="slice")
                z = gr.Slider(0, 1, value=0, step=1, label="Slice (z)")
                with gr.Row():
                    window = gr.Radio(list(VIEW_WINDOWS), value="lung", label="Window")
                    heat = gr.Dropdown([NO_HEATMAP], value=NO_HEATMAP, label="Evidence heatmap of")
                    jump = gr.Dropdown([], value=None, label="Jump to a finding's key slice")
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("## Report (PRELIMINARY) - edit before export; the generated original is kept")
                boxes = [gr.Textbox(label=SECTION_HEADINGS[k].title(), lines=6 if k == "findings" else 2,
                                    interactive=True, elem_id=f"section-{k}") for k in SECTION_KEYS]
                export_btn = gr.Button("Export TXT / JSON / FHIR / DICOM SR", elem_id="export")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
            with gr.Column(scale=2):
                table = gr.Dataframe(headers=FINDING_COLUMNS, interactive=False, elem_id="findings", max_height=420,
                                     label="Findings (p = probability; UNCERTAIN when 0.3-0.7; key z = key slices)",
                                     column_widths=["34%", "10%", "20%", "22%", "14%"], wrap=True)
                summary = gr.Markdown(elem_id="context")
        with gr.Accordion("Study facts (de-identified) and the series used", open=False):
            facts = gr.JSON()
        with gr.Accordion("Score against a reference report", open=True):
            reference = gr.Textbox(label="Reference report (examples fill theirs)", lines=4, elem_id="reference")
            reference_file = gr.File(label="…or upload one (.txt / .json)", file_types=[".txt", ".json"], type="filepath")
            score_btn = gr.Button("Score (edited) report")
            scores = gr.Markdown(elem_id="scores")

        example.change(on_example, [example, session],
                       [files, history_text, audio, reference, session, facts, z, image])
        load_btn.click(on_load, [files, example, session, window], [session, facts, z, image])
        gen_btn.click(on_generate, [files, example, history_text, history_file, audio, reference, window, session, fast],
                      [session, facts, z, image, heat, jump, table, summary, scores, *boxes],
                      concurrency_limit=cfg.concurrency_limit, api_name="generate")
        for comp in (z, window, heat):
            comp.change(on_view, [session, z, window, heat], image, show_progress="hidden")
        jump.change(on_jump, [session, jump, window], [z, heat, image])
        export_btn.click(on_export, [session, *boxes], downloads)
        reference_file.change(on_reference_file, reference_file, reference)
        score_btn.click(on_score, [session, reference, reference_file, *boxes], scores)
        app.unload(on_unload)
    app.queue(default_concurrency_limit=cfg.concurrency_limit, max_size=cfg.max_queue)
    return app
