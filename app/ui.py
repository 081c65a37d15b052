"""The clinician's web UI (Gradio).

Handlers are plain functions (tested without a server); ``build_app`` wires them into
Gradio Blocks. This first version loads a study (upload or bundled example), shows the
de-identified study facts, which series was used and why, and a slice viewer with the
lung / mediastinal / bone windows. Report generation is wired in once a trained model
ships (see the README's status section); until then the UI says so plainly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app import NOT_FOR_CLINICAL_USE

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = REPO / "examples"
VIEW_WINDOWS = ("lung", "mediastinum", "bone")


@dataclass
class ViewerState:
    """What the session keeps between events: the loaded study and its facts."""

    study: Any
    facts: dict


def list_examples(examples_dir: Path = DEFAULT_EXAMPLES) -> list[Path]:
    """Study folders of the bundled sample (one click each in the UI)."""
    root = Path(examples_dir) / "studies"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir())


def study_facts(study: Any) -> dict:
    """De-identified facts shown to the user (no names, IDs or dates; UIDs are not shown here)."""
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


def load_for_viewer(paths: list[str] | str | None) -> ViewerState:
    """Load an upload (files, a zip, NIfTI, PNG/JPEG) or an example folder for the viewer."""
    from data.errors import EmptyStudyError
    from data.study import load_study

    if not paths:
        raise EmptyStudyError("Nothing was uploaded: add DICOM files, a zip, a NIfTI file or a PNG/JPEG radiograph, or pick an example.")
    if isinstance(paths, (list, tuple)) and len(paths) == 1:
        paths = paths[0]
    target = [Path(p) for p in paths] if isinstance(paths, (list, tuple)) else Path(paths)
    study = load_study(target)
    return ViewerState(study=study, facts=study_facts(study))


def render_slice(state: ViewerState | None, z: int, window: str) -> np.ndarray | None:
    """One slice as an 8-bit grayscale image in the chosen window (radiographs: as stored)."""
    from data.preprocess import window_stack

    if state is None:
        return None
    vol = state.study.volume
    z = int(np.clip(z, 0, vol.shape[0] - 1))
    if state.study.kind == "radiograph":
        img = vol[z]
    else:
        img = window_stack(vol[z : z + 1], windows=(window,))[0, 0]  # (Y, X) in [0, 1]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def build_app(examples_dir: Path = DEFAULT_EXAMPLES):
    """Gradio Blocks for the product. Imported lazily so the CLI does not pay for Gradio."""
    import gradio as gr

    from data.errors import MedreportError

    examples = list_examples(examples_dir)

    def _on_load(files, example):
        try:
            src = files if files else (str(Path(examples_dir) / "studies" / example) if example else None)
            state = load_for_viewer(src)
        except MedreportError as exc:
            raise gr.Error(str(exc)) from None
        n = state.study.volume.shape[0]
        mid = n // 2
        return (
            state,
            state.facts,
            gr.update(minimum=0, maximum=max(n - 1, 0), value=mid, step=1, interactive=n > 1),
            render_slice(state, mid, "lung"),
        )

    with gr.Blocks(title="medreport", delete_cache=(1800, 3600)) as app:
        gr.Markdown("# medreport\nStructured CT radiology reports with the evidence shown.")
        gr.Markdown(f"**{NOT_FOR_CLINICAL_USE}**", elem_id="clinical-notice")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Study: DICOM files, a .zip, NIfTI or PNG/JPEG", file_count="multiple")
                example = gr.Dropdown(
                    choices=[p.name for p in examples], value=None, label="…or an example study (synthetic)"
                )
                load_btn = gr.Button("Load study", variant="primary")
                gr.Markdown(
                    "Report generation appears here once the demo model ships "
                    "(trained on synthetic data, not for clinical use)."
                )
            with gr.Column(scale=2):
                image = gr.Image(label="Slice", type="numpy", image_mode="L", height=420)
                z = gr.Slider(0, 1, value=0, step=1, label="Slice (z)")
                window = gr.Radio(list(VIEW_WINDOWS), value="lung", label="Window")
                facts = gr.JSON(label="Study facts (de-identified) and the series used")
        load_btn.click(_on_load, inputs=[files, example], outputs=[state, facts, z, image])
        z.change(render_slice, inputs=[state, z, window], outputs=image)
        window.change(render_slice, inputs=[state, z, window], outputs=image)
    app.queue(default_concurrency_limit=2, max_size=32)
    return app
