"""The one path a study travels at inference: files -> ``Study`` -> model inputs -> ``Report``.

    pipe = ReportPipeline.from_dir("models/demo")            # model + tokenizer loaded once
    report = pipe.run("examples/studies/syn00000")           # folder: companions found by name
    report = pipe.run(files, history_text=..., audio_path=..., progress=lambda stage, f: ...)

Stages (named in ``progress(stage, fraction)`` calls and in ``provenance.timings_s``):
``loading`` (study, slabs, dictation log-mel, history tokens), ``encoding`` (image/audio/history
encoders, fusion, finding heads), ``generating`` (decoder), ``evidence`` (Grad-CAM key slices).

History policy: a record longer than ``PipelineConfig.max_history_tokens`` (100,000 by default,
the decoder's budget in contracts.md) keeps its **most recent** tokens: records are
chronological and the newest notes matter most. The report states how many tokens were cut. A
model with a history digest reads it inside the same budget (as in training), taken from the
whole record, so a fact older than the cut still reaches it.

Runs on CPU in fp32; ``quantize=True`` swaps the decoder's Linear layers (except the MoE
router, whose argmax decides routing) for int8 dynamic-quantized ones
(``torch.ao.quantization.quantize_dynamic``). Nothing here logs patient data, paths or UIDs.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from app import __version__
from app.decoding import mbr_rerank
from app.report import UNCERTAIN_BAND, FindingRow, KeySlice, Report, consistency
from core.generate import GenerationConfig, Guidance, any_veto, generate
from data.errors import AudioError, HistoryError, MedreportError
from data.finding_prompt import (contrast_of_line, known_locations, record_locations, record_prior_nodule_mm,
                                 study_acquisition)
from data.detectors import DETECTOR_LABELS, read_study
from data.history_digest import digest_ids, record_facts
from data.report_consistency import CallsVeto, MeasurementVeto, acquisition_veto
from data.report_coverage import CoverageVeto, RecordVeto
from data.report_format import SECTION_KEYS
from data.report_outline import OutlineVeto
from data.study import COMPANION_SUFFIXES, Study, StudyFiles, find_study_files, load_study
from multimodal.fusion import MODALITIES
from multimodal.model import WEIGHTS_FILE, ReportModel, StudyInputs, collate, digest_spans, uses_prompt

log = logging.getLogger(__name__)

STAGES = ("loading", "encoding", "generating", "evidence")
_STAGE_SPAN = {"loading": (0.0, 0.2), "encoding": (0.2, 0.35), "generating": (0.35, 0.8), "evidence": (0.8, 1.0)}
# SOP classes of the images a key slice points at (the Study does not keep the class; by modality).
SOP_CLASS_BY_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"

Progress = Callable[[str, float], None]


class PipelineError(MedreportError):
    """The pipeline was given something it cannot run on."""


@dataclass
class PipelineConfig:
    max_history_tokens: int = 100_000  # longer records keep their most recent tokens
    max_new_tokens: int = 320
    strategy: str = "greedy"  # core.generate: "greedy" | "beam" | "sample" | "mbr"
    num_beams: int = 4
    # Sampling and MBR (strategy "mbr", core.generate): ``num_samples`` reports are sampled per study
    # at ``temperature`` / ``top_p`` (seeded with ``seed``) and the one that agrees best with the
    # others is kept, plus ``calls_agreement`` times the share of findings on which its text agrees
    # with the findings table (data.report_consistency.CallsAgreement; 0 = off). The report is one
    # the decoder wrote; MBR only chooses. Costs about num_samples / 2 times greedy decoding's time.
    # Measured on the demo model (session 26; docs/training.md): 80 val studies, BLEU-4 0.382 greedy
    # -> 0.436 MBR 8 at temperature 0.7 -> 0.432 with calls_agreement 1, which also lifts the text's
    # agreement with the table 0.963 -> 0.994 and the labeller F1 of the text 0.686 -> 0.791; 310
    # test studies, BLEU-4 0.208 -> 0.211, labeller F1 0.679 -> 0.787. Not the shipped default: the
    # sampled Technique line is sometimes broken text (MBR compares from the Findings on).
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.9
    calls_agreement: float = 1.0
    # mbr: what the samples are compared on: "report" (every section) or "findings" (the Findings and
    # Impression, the scored part). Session 26/27, 310 test studies: from the Findings on, the sections
    # before them are left to the sample: 55 Technique lines off the training templates (9 broken
    # text), facts 86.0 %; compared whole, 37 (9-12 broken; greedy 26, 13 broken), facts 88.1 %.
    mbr_from: str = "report"
    # mbr: weight of the record's facts carried (data.report_consistency.RecordAgreement: the share
    # of the known malignancies and lung resections the record names that a sample's Findings or
    # Impression names); 0 = off. Off: on 80 val studies (session 26) weight 1 carried 91.8 % of the
    # facts instead of 90.2 % but lowered BLEU-4 0.432 -> 0.422 and once chose a runaway sample
    # for naming the lobectomy; weight 0.1 changed nothing but BLEU (0.424).
    record_agreement: float = 0.0
    # mbr: weight of the Technique stating the scan's contrast as the DICOM header gives it
    # (data.report_consistency.AcquisitionAgreement: "without intravenous contrast" for a non-contrast
    # scan); 0 = off. For a model that reads the acquisition line (the header's contrast is then
    # known). The acquisition veto only refuses the opposite statement; session 29's shipped decoding
    # still chose a Technique that left the contrast out or broke off ("CT chest with 5 mm axial
    # reconstructions. Axial reconstructions.") where another sample stated it. On by default, like the
    # veto: what the scanner did is not a matter of style (docs/training.md, session 30).
    acquisition_agreement: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum log p / length ** length_penalty
    seed: int | None = 0
    evidence: bool = True
    evidence_threshold: float = UNCERTAIN_BAND[0]  # Grad-CAM for findings at or above (present + uncertain)
    max_evidence_findings: int = 5  # the most probable ones; each costs one backward pass
    n_key_slices: int = 3
    quantize: bool = False  # int8 dynamic quantization of the decoder's Linear layers
    # Never end a numbered impression item empty ("1." then nothing): off by default. Measured on
    # the demo test split (session 5) it fills the 150 empty impressions with the model's next
    # choice, mostly a finding the heads did not call (text-finding consistency 0.95 -> 0.89), so
    # an incomplete report is left visibly incomplete rather than completed with a guess.
    nonempty_items: bool = False
    # Keep the report whole (data.tokenizer.complete_constraints): it may not end before the
    # impression has content, and no findings line starts with a list enumerator (numbered items
    # belong to the impression). Measured on the demo test split (session 13, 1,100-step model):
    # empty impressions 12 -> 1, numbered items inside the findings 7 -> 0, BLEU-4 0.153 -> 0.156,
    # consistency 0.966 -> 0.968. Unlike ``nonempty_items`` it adds no item the model did not start.
    complete_sections: bool = True
    # Keep the text consistent with the findings table (data.report_consistency.CallsVeto): in the
    # Findings and Impression a continuation is refused when the sentence being written denies a
    # finding the table calls present or asserts one it does not call; the decoder then writes its
    # next most likely token. See docs/training.md (session 14) for what it does to the demo model.
    consistent_with_calls: bool = False
    # Keep the Technique to the scan's contrast (data.report_consistency.AcquisitionVeto), for a
    # model that reads the acquisition line: when the DICOM header says whether IV contrast was
    # given, a Technique sentence stating the opposite is refused. Session 21's demo model wrote
    # a contrast sentence for 8 of 39 contrast-allergic test patients without it (0 with it).
    consistent_with_acquisition: bool = True
    # With it, the Technique must also *state* the contrast the header gives (AcquisitionVeto.require):
    # its first sentence may not end, nor the section close, before it does ("CT chest." is
    # refused for a non-contrast scan, so the decoder goes on to "without intravenous contrast").
    # Off: on the demo test split (session 24) it carried 30 of 39 contrast allergies instead of
    # 28, but BLEU-4 fell from 0.2073 to 0.2035 (longer, less usual Technique lines).
    technique_states_contrast: bool = False
    # A lobectomy call takes the lobe the patient's record names ("right upper lobectomy in 2015"),
    # and a nodule call the lobe of the known nodule a prior CT in the record describes ("a 9 mm
    # solid nodule in the left lower lobe"; data.finding_prompt.record_locations), in the prompt
    # the decoder reads, the side the nodule is measured on, and the findings table
    # (location_source "record"). The heads only see a staple line and guess the lobe, and named
    # the wrong lobe for 27 of 66 test nodule follow-ups (session 23).
    locations_from_record: bool = True
    # Keep a nodule's stated change to its own numbers (data.report_consistency.MeasurementVeto):
    # "increased from 12 mm to 10 mm" is refused at the "10". Session 21's demo model contradicted
    # itself in 60 of the 113 change phrases it wrote on the test split.
    consistent_measurements: bool = True
    # Keep the report to the product's outline (data.report_outline.OutlineVeto): every Findings
    # line opens with the next organ-system heading, no heading elsewhere, one line for the
    # clinical information / technique / comparison, impression items numbered 1., 2., ... each
    # with text. Session 23's demo model broke the outline in 28 of 310 test reports; with the
    # veto 8 (session 24), at the same BLEU-4 (0.2073 -> 0.2071).
    report_outline: bool = True
    # Keep every called finding in the report, under its own organ system
    # (data.report_coverage.CoverageVeto): an organ-system line may not end while a finding the
    # table calls in that system is unmentioned, no finding is asserted under another system, and
    # the report may not end while the Impression leaves a call out. Off: the demo decoder has no
    # good second choice where it skips a call, so refusing its line end made it run on (session 25,
    # test split: BLEU-4 0.207 -> 0.106, reports 2.1x the references' length; with a 20-word cap per
    # line, first 48 test studies: 0.215 -> 0.159). Built and tested for a better-trained decoder.
    calls_covered: bool = False
    # Keep the patient record's known malignancies and lung resections in the report
    # (data.report_coverage.RecordVeto, the facts read by data.history_digest.record_facts): the
    # Clinical information may not close before the known cancer is named, and the lungs line may
    # not end before the resection is. Off: on the 84 val studies whose record names one (session
    # 27) facts rose 83.3 -> 87.9 % but BLEU-4 fell 0.379 -> 0.363 and one report ran away (a
    # Comparison paragraph of contradicting nodule changes); with MBR likewise (0.376 -> 0.353).
    record_covered: bool = False
    # Contrastive calls guidance (core.generate.Guidance; > 0 = its weight): each report is decoded
    # beside a twin of the same study with no finding called, and among the decoder's plausible
    # next tokens those the calls make more likely win. Off: with the demo decoder it wrote the called
    # findings in their lines more often but also into other lines ("The lungs are clear without is
    # identified in the cardi"): first 48 test studies, BLEU-4 0.215 -> 0.160 at weight 0.5, 0.104 at
    # 1.0 (session 25).
    calls_guidance: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "beam", "sample", "mbr"):
            raise ValueError(f"strategy must be greedy, beam, sample or mbr, not {self.strategy!r}")
        if (self.num_samples < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.calls_agreement < 0
                or self.record_agreement < 0 or self.acquisition_agreement < 0):
            raise ValueError(f"sampling needs num_samples >= 1, temperature > 0, 0 < top_p <= 1 and calls_agreement, "
                             f"record_agreement, acquisition_agreement >= 0; got {self.num_samples}, {self.temperature}, "
                             f"{self.top_p}, {self.calls_agreement}, {self.record_agreement}, {self.acquisition_agreement}")
        if self.mbr_from not in ("report", "findings"):
            raise ValueError(f"mbr_from must be 'report' or 'findings', not {self.mbr_from!r}")
        if self.calls_guidance > 0 and self.strategy == "mbr":
            raise ValueError("calls_guidance works with greedy decoding or sampling: use --strategy greedy, "
                             "or set --calls-guidance 0 for mbr")
        if self.calls_guidance < 0:
            raise ValueError(f"calls_guidance must be >= 0 (0 = off), got {self.calls_guidance}")
        if self.calls_guidance > 0 and self.strategy == "beam":
            raise ValueError("calls_guidance works with greedy decoding or sampling: use --strategy greedy, "
                             "or set --calls-guidance 0 for beam search")

    def generation(self, tokenizer) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, eos_id=tokenizer.eos_id, strategy=self.strategy,
            num_beams=self.num_beams, no_repeat_ngram_size=self.no_repeat_ngram_size, length_penalty=self.length_penalty,
            num_samples=self.num_samples, temperature=self.temperature, top_p=self.top_p,
            mbr_from_id=tokenizer.section_ids[SECTION_KEYS.index("findings")] if self.mbr_from == "findings" else None,
            section_ids=list(tokenizer.section_ids), seed=self.seed, pad_id=tokenizer.pad_id,
            **tokenizer.report_constraints(self.nonempty_items, self.complete_sections),
        )


@dataclass
class StudyParts:
    """A study given as parts (batch manifests, the UI): images plus optional companions."""

    images: str | Path | Sequence[str | Path] | Study
    history_path: str | Path | None = None
    history_text: str | None = None
    audio_path: str | Path | None = None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def quantize_decoder(model: ReportModel) -> ReportModel:
    """int8 dynamic quantization of the decoder's Linear layers (router kept fp32), in place."""
    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao (not installed here)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {name: default_dynamic_qconfig for name, m in model.decoder.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("router")}
    with warnings.catch_warnings():  # deprecation notices of torch.ao (still supported in this torch)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        model.decoder = quantize_dynamic(model.decoder, spec, dtype=torch.qint8)
    return model


def truncate_history(ids: list[int], limit: int) -> tuple[list[int], int]:
    """Keep the most recent ``limit`` tokens; returns (kept ids, number cut from the start)."""
    if limit < 0:
        raise ValueError("max_history_tokens must be >= 0")
    cut = max(0, len(ids) - limit)
    return (ids[cut:] if cut else ids), cut


class ReportPipeline:
    """A loaded model + tokenizer and the code that turns one study into a ``Report``."""

    def __init__(self, model: ReportModel, tokenizer=None, config: PipelineConfig | None = None,
                 model_name: str = "model", checkpoint_sha256: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise PipelineError("the model has no tokenizer: save it with save_pretrained(dir, tokenizer)")
        self.config = config or PipelineConfig()
        self.model_name = model_name
        self.checkpoint_sha256 = checkpoint_sha256
        if self.config.quantize:
            quantize_decoder(self.model)
        cfg = model.cfg
        self.n_slabs = cfg.image.max_slabs
        self.size_hw = (cfg.image.image_size, cfg.image.image_size)
        self.mip_windows = tuple(cfg.image.mip_windows)
        self.audio_config = _audio_config(cfg)

    @classmethod
    def from_dir(cls, model_dir: str | Path, config: PipelineConfig | None = None, quantize: bool | None = None) -> "ReportPipeline":
        """Load a ``save_pretrained`` directory once (CPU, fp32). Without ``config``, the model
        decodes as its folder's ``decoding.json`` chose (``app.decoding``; greedy if it has none)."""
        from app.decoding import read_decoding

        d = Path(model_dir)
        model = ReportModel.from_pretrained(d, device="cpu")
        model.float()
        config = config or PipelineConfig(**read_decoding(d))
        if quantize is not None:
            config = dataclasses.replace(config, quantize=quantize)
        return cls(model, model.tokenizer, config, model_name=d.resolve().name, checkpoint_sha256=sha256_file(d / WEIGHTS_FILE))

    def with_config(self, **changes) -> "ReportPipeline":
        """The same loaded model and tokenizer with some of the decoding settings changed (a
        ``PipelineConfig`` field each, e.g. ``strategy="greedy"`` for one fast draft): nothing is
        copied or reloaded, and this pipeline keeps its own config. ``quantize`` cannot change here
        (it rewrites the shared model's layers): load another pipeline for that."""
        if "quantize" in changes and bool(changes["quantize"]) != self.config.quantize:
            raise PipelineError("quantize cannot change on a loaded pipeline: load one with ReportPipeline.from_dir("
                                "..., quantize=True)")
        new = copy.copy(self)
        new.config = dataclasses.replace(self.config, **changes)
        return new

    # ------------------------------------------------------------------------------ inputs
    def _resolve(self, source, history_text, history_path, audio_path) -> tuple[Study, str | None, str | None, Path | None, list[str]]:
        """(study, history text, history source kind, audio path, warnings)."""
        from data.history import read_history

        warnings: list[str] = []
        companion_history = companion_audio = None
        if isinstance(source, StudyParts):
            history_text = history_text if history_text is not None else source.history_text
            history_path = history_path or source.history_path
            audio_path = audio_path or source.audio_path
            source = source.images
        if isinstance(source, Study):
            study = source
        elif isinstance(source, StudyFiles):
            if not source.images:
                raise PipelineError("the study has no image files")
            study = load_study(source.images)
            companion_history, companion_audio = source.history, source.dictation
        elif isinstance(source, (list, tuple)):
            paths = [Path(p) for p in source]
            for p in paths:
                stem, suf = p.name.lower().rsplit(".", 1)[0] if "." in p.name else p.name.lower(), p.suffix.lower()
                if stem == "history" and suf in COMPANION_SUFFIXES["history"]:
                    companion_history = companion_history or p
                elif stem == "dictation" and suf in COMPANION_SUFFIXES["dictation"]:
                    companion_audio = companion_audio or p
            study = load_study(paths)
        else:
            path = Path(source)
            study = load_study(path)
            if path.is_dir():
                sf = find_study_files(path)
                companion_history, companion_audio = sf.history, sf.dictation
        history_kind = None
        text = None
        if history_text is not None and history_text.strip():
            text, history_kind = history_text, "text"
        else:
            hp = history_path or companion_history
            if hp is not None:
                try:
                    text, history_kind = read_history(hp), "file"
                except HistoryError as exc:
                    warnings.append(f"history not used: {exc}")
        return study, text, history_kind, (Path(audio_path) if audio_path else companion_audio), warnings

    def prepare(self, study: Study, history: str | None, audio: Path | None, warnings: list[str]) -> tuple[StudyInputs, dict, dict]:
        """Model inputs of one study + what the report says about history and audio."""
        from data.audio import load_audio, log_mel
        from data.preprocess import make_slabs

        slabs = make_slabs(study, self.n_slabs, self.size_hw, mip_windows=self.mip_windows)
        mel, audio_info = None, {"given": False}
        if audio is not None:
            ac = self.audio_config
            try:
                wave = load_audio(audio, ac.sample_rate, ac.max_seconds)
                mel = log_mel(wave, ac)
                audio_info = {"given": True, "seconds": round(len(wave) / ac.sample_rate, 2), "frames": int(mel.shape[-1])}
            except AudioError as exc:
                warnings.append(f"dictation not used: {exc}")
                audio_info = {"given": False, "error": str(exc)}
        limit = self.config.max_history_tokens
        hist_info: dict = {"given": False, "limit": limit, "message": "no patient history was given"}
        ids, n_digest = None, 0
        if history:
            # The relevant-history digest is taken from the whole record (a fact older than the
            # cut still reaches it), read right before the report (data.history_digest), and
            # counts toward the limit like in training: the record gets what the digest leaves.
            words = self.model.cfg.history_digest_words
            dig = digest_ids(self.tokenizer, history, words) if words else []
            all_ids = self.tokenizer.encode(history)
            ids, cut = truncate_history(all_ids, max(0, limit - len(dig)))
            hist_info = {
                "given": True, "tokens_total": len(all_ids), "tokens_used": len(ids), "tokens_cut": cut,
                "truncated": cut > 0, "limit": limit, "policy": "keep the most recent tokens",
                "message": (f"{len(all_ids):,} tokens; the oldest {cut:,} were cut to fit the model's limit of "
                            f"{limit:,} tokens (the most recent {len(ids):,} were read"
                            + (f", with a {len(dig):,}-token digest of the whole record)" if dig else ")")) if cut else
                           f"{len(all_ids):,} tokens, all read (limit {limit:,})",
            }
            if cut:
                warnings.append(f"patient history truncated: {hist_info['message']}")
            if words:
                ids = ids + dig
                n_digest = len(dig)
                hist_info["digest_tokens"] = n_digest
            ids = ids or None
        acq = study_acquisition(study) if self.model.cfg.acquisition_prompt else None
        # where the whole record locates a finding (a lobectomy's lobe, a known nodule's): the call takes it
        rec = (record_locations(history) or None) if history and self.config.locations_from_record else None
        # the classical detectors on the CT (data.detectors), for a model whose nodule call carries
        # the measured size or whose heads fuse the detectors' evidence
        sizes = evidence = None
        detected: dict[str, str] = {}
        if self.model.cfg.runs_detectors:
            reading = read_study(study)
            if self.model.cfg.nodule_size_prompt:
                sizes = {k: float(v) for k, v in reading.sizes_mm.items()} or None
            evidence = reading.evidence or None
            detected = reading.locations
        locations, placed = known_locations(rec, detected)  # the record's word first
        inputs = StudyInputs(pixels=slabs.pixels, z_mm=slabs.z_mm, z_index_range=slabs.z_index_range, mel=mel,
                             history_ids=ids, digest_len=n_digest, acquisition=acq,
                             record_locations=locations, detector_located=placed,
                             nodule_mm=sizes, prior_nodule_mm=record_prior_nodule_mm(history) if history else None,
                             evidence=evidence)
        return inputs, hist_info, audio_info

    # ------------------------------------------------------------------------------ run
    def run(self, source, history_text: str | None = None, history_path: str | Path | None = None,
            audio_path: str | Path | None = None, progress: Progress | None = None) -> Report:
        """Report of one study. ``source``: a study folder (companions found by name), a file, a
        list of files, a ``StudyFiles``, a ``StudyParts`` or a loaded ``Study``. Explicit
        ``history_text`` / ``history_path`` / ``audio_path`` take precedence over companions."""
        notify = progress or (lambda stage, fraction: None)
        notify("loading", 0.0)
        item = self._load(source, history_text, history_path, audio_path)
        notify("loading", _STAGE_SPAN["loading"][1])
        self._infer([item], notify)
        return self._finish(item, notify)

    def run_many(self, sources: Sequence, max_batch: int = 8, max_batch_tokens: int = 65_536) -> list:
        """Reports of many studies, each encoded alone, their reports generated together in
        batches (the batch CLI).
        ``sources``: what :meth:`run` takes, or ``StudyParts``. Returns, in input order, a
        ``Report`` or the exception that study raised (one bad study never stops the others).
        Studies are grouped by history length, at most ``max_batch`` per batch and at most
        ``max_batch_tokens`` history tokens in the batch's padded prefix (a 100K-token record
        runs alone). Findings equal :meth:`run`'s; the text equals it up to floating-point
        rounding of the padded decoding batch; ``provenance.timings_s`` holds this study's loading and evidence times and its
        share of the batch's encoding and generating time (``provenance.batch_size``)."""
        results: list = [None] * len(sources)
        items: list[tuple[int, _Item]] = []
        for n, src in enumerate(sources):
            try:
                items.append((n, self._load(src)))
            except Exception as exc:  # reported per study by the caller
                results[n] = exc
        items.sort(key=lambda t: len(t[1].inputs.history_ids or ()))
        batches, cur = [], []
        for t in items:
            longest = len(t[1].inputs.history_ids or ()) + 2
            if cur and (len(cur) >= max_batch or longest * (len(cur) + 1) > max_batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(t)
        if cur:
            batches.append(cur)
        quiet = lambda stage, fraction: None  # noqa: E731
        for batch in batches:
            try:
                self._infer([it for _, it in batch], quiet)
            except Exception as exc:
                for n, _ in batch:
                    results[n] = exc
                continue
            for n, it in batch:
                try:
                    results[n] = self._finish(it, quiet)
                except Exception as exc:
                    results[n] = exc
        return results

    def _load(self, source, history_text=None, history_path=None, audio_path=None) -> "_Item":
        t0 = time.perf_counter()
        study, history, history_kind, audio, warnings = self._resolve(source, history_text, history_path, audio_path)
        inputs, hist_info, audio_info = self.prepare(study, history, audio, warnings)
        if history_kind:
            hist_info["source"] = history_kind
        item = _Item(study, inputs, hist_info, audio_info, warnings)
        if (self.config.strategy == "mbr" and self.config.record_agreement > 0) or self.config.record_covered:
            item.record_facts = record_facts(history if isinstance(history, str) else None)
        item.timings["loading"] = round(time.perf_counter() - t0, 4)
        return item

    def _infer(self, items: Sequence["_Item"], notify: Progress) -> None:
        """Encode and classify each study alone (its findings never depend on the other studies
        of a batch: padding a shorter dictation would change what the audio encoder sees), then
        generate the batch's reports together; fills each item's outputs."""
        model, tok, n = self.model, self.tokenizer, len(items)
        t0 = time.perf_counter()
        notify("encoding", _STAGE_SPAN["encoding"][0])
        ctxs, masks, ctxs_u, masks_u = [], [], [], []
        with torch.inference_mode():
            for it in items:
                x1 = collate([it.inputs])
                enc = model.encode(x1)
                heads = model.heads(enc.fused_BFD, enc.mask_BF, enc.image_tokens, x1.evidence)
                it.probs = heads.presence_probs[0].float().cpu().numpy()  # [K]
                it.side = torch.softmax(heads.side_logits_BK4[0].float(), -1).cpu().numpy()  # [K,4]
                it.loc = heads.location_logits_BKL[0].argmax(-1).cpu().numpy()  # [K]
                it.gates = {m: float(g) for m, g in zip(MODALITIES, enc.gates_BM[0].float().cpu())}
                calls = model.calls(heads, [it.inputs.record_locations], [it.inputs.nodule_mm])[0]
                it.called = [c[0] for c in calls]
                it.sizes = {c[0]: c[3] for c in calls if len(c) > 3}  # measured sizes the prompt carries
                it.prompt = model.prompt_ids(calls, it.inputs.acquisition) if uses_prompt(model.cfg) else []
                c, m = model.decoder_context(enc.fused_BFD, enc.mask_BF, heads)  # [1,F_i,D], [1,F_i]
                ctxs.append(c[0])
                masks.append(m[0])
                if self.config.calls_guidance > 0:  # the twin: the same study with no finding called
                    it.prompt_u = model.prompt_ids([], it.inputs.acquisition) if uses_prompt(model.cfg) else []
                    cu, mu = model.decoder_context(enc.fused_BFD, enc.mask_BF, model.no_calls(heads))
                    ctxs_u.append(cu[0])
                    masks_u.append(mu[0])
        t_enc = round((time.perf_counter() - t0) / n, 4)
        notify("encoding", _STAGE_SPAN["encoding"][1])
        t0 = time.perf_counter()
        notify("generating", _STAGE_SPAN["generating"][0])
        x = collate([it.inputs for it in items])  # history ids and digest spans, padded
        if uses_prompt(model.cfg):  # acquisition line / the heads' calls as text between the history and [REPORT]
            x.prompt_len = torch.as_tensor([len(it.prompt) for it in items], dtype=torch.long)
        prefixes = [[tok.bos_id] + list(it.inputs.history_ids or ()) + it.prompt + [tok.report_id] for it in items]
        with torch.inference_mode():
            ctx = torch.nn.utils.rnn.pad_sequence(ctxs, batch_first=True)  # [B,F,D] zero-padded
            cmask = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)  # [B,F] False on padding
            spans = digest_spans(x) if model.cfg.decoder.copy else None
            per_item = [[CallsVeto(tok, it.called) if self.config.consistent_with_calls else None,
                         acquisition_veto(tok, it.inputs.acquisition, require=self.config.technique_states_contrast)
                         if self.config.consistent_with_acquisition else None,
                         MeasurementVeto(tok, it.inputs.prior_nodule_mm, it.sizes.get("nodule"))
                         if self.config.consistent_measurements else None,
                         OutlineVeto(tok) if self.config.report_outline else None,
                         CoverageVeto(tok, it.called) if self.config.calls_covered else None,
                         RecordVeto(tok, it.record_facts) if self.config.record_covered and it.record_facts else None]
                        for it in items]
            vetoes = [any_veto(v) for v in per_item]
            vetoes = vetoes if any(v is not None for v in vetoes) else None
            guide = None
            if self.config.calls_guidance > 0:
                xu = dataclasses.replace(x, prompt_len=torch.as_tensor([len(it.prompt_u) for it in items], dtype=torch.long)
                                         if uses_prompt(model.cfg) else None)
                guide = Guidance([[tok.bos_id] + list(it.inputs.history_ids or ()) + it.prompt_u + [tok.report_id]
                                  for it in items],
                                 torch.nn.utils.rnn.pad_sequence(ctxs_u, batch_first=True),  # [B,F,D]
                                 torch.nn.utils.rnn.pad_sequence(masks_u, batch_first=True),  # [B,F]
                                 digest_spans(xu) if model.cfg.decoder.copy else None, self.config.calls_guidance,
                                 start_ids=(tok.section_ids[SECTION_KEYS.index("findings")],))
            rerank = None  # MBR: the sample that says what the findings table says and carries the record's facts
            if self.config.strategy == "mbr":
                rerank = [mbr_rerank(tok, it.called, it.record_facts, self.config.calls_agreement,
                                     self.config.record_agreement, contrast_of_line(it.inputs.acquisition),
                                     self.config.acquisition_agreement) for it in items]
                rerank = rerank if any(r is not None for r in rerank) else None
            token_ids = generate(model.decoder, prefixes, ctx, cmask, self.config.generation(tok), copy_spans=spans,
                                 vetoes=vetoes, guidance=guide, rerank=rerank)
        t_gen = round((time.perf_counter() - t0) / n, 4)
        notify("generating", _STAGE_SPAN["generating"][1])
        for b, it in enumerate(items):
            it.token_ids = token_ids[b]
            used = [v for v in per_item[b] if v is not None]
            it.refused = sum(v.refused for v in used) if used else None
            it.timings.update(encoding=t_enc, generating=t_gen)
            it.batch_size = n

    def _finish(self, item: "_Item", notify: Progress) -> Report:
        """Sections, findings, Grad-CAM key slices (this study alone) and the ``Report``."""
        cfg, model, tok = self.config, self.model, self.tokenizer
        study, inputs, probs = item.study, item.inputs, item.probs
        sections = tok.decode_report(item.token_ids)
        t0 = time.perf_counter()
        notify("evidence", _STAGE_SPAN["evidence"][0])
        fused = {r[0] for r in model.cfg.heads.evidence_fusion} & set(inputs.evidence or {})
        findings = self._findings(probs, item.side, item.loc, inputs.record_locations, item.sizes, fused,
                                  inputs.detector_located)
        evidence = {}
        if cfg.evidence and cfg.max_evidence_findings > 0:
            thr = model.cfg.heads.thresholds()  # findings called present first, then the most probable
            order = sorted(range(len(probs)), key=lambda k: (probs[k] < thr[k], -probs[k]))
            wanted = [model.finding_names[k] for k in order
                      if probs[k] >= min(cfg.evidence_threshold, float(thr[k]))][: cfg.max_evidence_findings]
            if wanted:
                evidence = {n: ev[0] for n, ev in model.finding_evidence(collate([inputs]), wanted).items()}
        sop_uids = study.sop_uids if study.source_format.startswith("dicom") else None
        for row in findings:
            ev = evidence.get(row.name)
            if ev is None:
                continue
            for slab, z in list(zip(ev.key_slabs, ev.key_slices))[: cfg.n_key_slices]:
                z = int(min(max(z, 0), study.shape[0] - 1))
                uid = sop_uids[z] if sop_uids is not None and z < len(sop_uids) else None
                row.key_slices.append(KeySlice(z=z, slab=int(slab), score=float(ev.slab_scores[slab]), sop_instance_uid=uid))
        item.timings["evidence"] = round(time.perf_counter() - t0, 4)
        notify("evidence", _STAGE_SPAN["evidence"][1])

        from data.report_format import format_report

        provenance = self._provenance(study, inputs, dict(item.timings), len(item.token_ids))
        if item.refused is not None:
            provenance["generation"]["consistency_refusals"] = item.refused
        provenance["batch_size"] = item.batch_size
        report = Report(
            sections=sections,
            findings=findings,
            gates=item.gates,
            history=item.hist_info,
            audio=item.audio_info,
            consistency=consistency(format_report(sections), findings),
            provenance=provenance,
            source=_source(study),
            warnings=list(study.warnings) + item.warnings,
            heatmaps={n: ev.heatmap_SHW for n, ev in evidence.items()},
            slab_z_ranges=np.asarray(inputs.z_index_range),
        )
        log.info("report generated in %.2f s (%s)", sum(item.timings.values()),
                 ", ".join(f"{k} {v:.2f}s" for k, v in item.timings.items()))
        return report

    # ------------------------------------------------------------------------------ pieces
    def _findings(self, probs: np.ndarray, side: np.ndarray, loc: np.ndarray,
                  record: dict[str, str] | None = None, sizes: dict[str, float] | None = None,
                  fused: set[str] = frozenset(), detector_located: tuple[str, ...] = ()) -> list[FindingRow]:
        from data.vocab import BY_NAME
        from multimodal.heads import SIDES

        hc = self.model.cfg.heads
        thr = hc.thresholds()  # [K] operating points (0.5 unless fitted on val)
        rows = []
        for k, name in enumerate(self.model.finding_names):
            p = float(probs[k])
            fd = BY_NAME.get(name)
            s = int(np.argmax(side[k]))
            allowed = fd.sides if fd is not None else SIDES[1:]
            side_name = SIDES[s] if SIDES[s] != "none" and SIDES[s] in allowed else None
            location = hc.locations[int(loc[k])]
            if fd is not None and not fd.locations:  # the finding has no location in the vocabulary
                location = "unspecified"
            placed = bool(record and record.get(name))
            from_record = placed and name not in detector_located
            if placed:  # the record (data.finding_prompt.record_locations) or a detector states it; the side follows
                location = record[name]
                rec_side = location.split()[0]
                if rec_side in allowed and rec_side != side_name:
                    side_name, s = rec_side, SIDES.index(rec_side)
            rows.append(FindingRow(
                name=name, display=fd.display if fd is not None else name.replace("_", " ").capitalize(),
                probability=p, present=p >= float(thr[k]), threshold=float(thr[k]),
                uncertain=UNCERTAIN_BAND[0] <= p <= UNCERTAIN_BAND[1],
                side=side_name, side_probability=float(side[k, s]) if side_name else None,
                location=None if location == "unspecified" else location, location_from_record=from_record,
                location_from_detector=placed and not from_record,
                size_mm=(sizes or {}).get(name), detector=DETECTOR_LABELS.get(name) if name in fused else None,
            ))
        return rows

    def _provenance(self, study: Study, inputs: StudyInputs, timings: dict, n_tokens: int) -> dict:
        cfg = self.config
        return {
            "model": {"name": self.model_name, "preset": self.model.cfg.name, "checkpoint_sha256": self.checkpoint_sha256,
                      "quantized_int8_decoder": cfg.quantize, "device": "cpu", "dtype": "float32"},
            "medreport_version": __version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "generation": {"strategy": cfg.strategy, "max_new_tokens": cfg.max_new_tokens, "tokens_generated": n_tokens,
                           "num_beams": cfg.num_beams if cfg.strategy == "beam" else None,
                           "length_penalty": cfg.length_penalty if cfg.strategy == "beam" else None,
                           **({"num_samples": cfg.num_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
                               "calls_agreement": cfg.calls_agreement, "record_agreement": cfg.record_agreement,
                               # the weight in effect: none where the header's contrast is not read
                               "acquisition_agreement": (cfg.acquisition_agreement
                                                         if contrast_of_line(inputs.acquisition) is not None else 0.0),
                               "mbr_from": cfg.mbr_from,
                               "seed": cfg.seed} if cfg.strategy == "mbr" else {}),
                           "complete_report": cfg.complete_sections,
                           "consistent_with_calls": cfg.consistent_with_calls,
                           "consistent_with_acquisition": cfg.consistent_with_acquisition and bool(inputs.acquisition),
                           "technique_states_contrast": (cfg.consistent_with_acquisition and cfg.technique_states_contrast
                                                         and bool(inputs.acquisition)),
                           "consistent_measurements": cfg.consistent_measurements,
                           "report_outline": cfg.report_outline,
                           "calls_covered": cfg.calls_covered, "record_covered": cfg.record_covered,
                           "calls_guidance": cfg.calls_guidance,
                           "locations_from_record": sorted(set(inputs.record_locations or {}) - set(inputs.detector_located)),
                           "locations_from_detector": sorted(inputs.detector_located),
                           "no_repeat_ngram_size": cfg.no_repeat_ngram_size},
            "timings_s": dict(timings),
            "input": {  # no paths, UIDs or patient facts
                "source_format": study.source_format, "kind": study.kind, "modality": study.modality,
                "shape_zyx": list(study.shape), "spacing_mm": [round(float(s), 3) for s in study.spacing_mm],
                "slabs": int(inputs.pixels.shape[0]), "slab_size": list(inputs.pixels.shape[-2:]),
                "dictation": inputs.mel is not None, "history_tokens": len(inputs.history_ids or ()),
            },
        }


@dataclass
class _Item:
    """One study on its way through the pipeline: loaded inputs, then the batch's outputs."""
    study: Study
    inputs: StudyInputs
    hist_info: dict
    audio_info: dict
    warnings: list[str]
    timings: dict = dataclasses.field(default_factory=dict)
    probs: np.ndarray | None = None  # [K] presence probabilities
    side: np.ndarray | None = None  # [K,4]
    loc: np.ndarray | None = None  # [K] location index
    gates: dict | None = None
    token_ids: list[int] | None = None
    batch_size: int = 1
    prompt: list[int] = dataclasses.field(default_factory=list)  # finding-prompt ids (model.cfg.finding_prompt)
    prompt_u: list[int] = dataclasses.field(default_factory=list)  # the guidance twin's prompt (calls_guidance)
    called: list[str] = dataclasses.field(default_factory=list)  # findings the heads call present
    sizes: dict[str, float] = dataclasses.field(default_factory=dict)  # measured sizes in the calls (nodule_size_prompt)
    refused: int | None = None  # continuations the consistency vetoes refused (calls, acquisition)
    record_facts: tuple[str, ...] = ()  # what the report should carry from the record (RecordAgreement, RecordVeto)


def _audio_config(cfg):
    """The log-mel front end matching the model's audio encoder (mel bins, hop)."""
    from data.audio import AudioConfig

    try:
        ac = AudioConfig.preset(cfg.name)
    except KeyError:
        ac = AudioConfig()
    hop = int(round(cfg.audio.hop_s * ac.sample_rate))
    return dataclasses.replace(ac, n_mels=cfg.audio.n_mels, hop_length=hop or ac.hop_length)


def _source(study: Study) -> dict:
    """What exports need to reference the source (UIDs: written to outputs, never logged)."""
    sop_class = SOP_CLASS_BY_MODALITY.get(study.modality)
    if study.source_format == "dicom-multiframe" and study.modality == "CT":
        sop_class = ENHANCED_CT
    return {
        "study_instance_uid": study.study_uid,
        "series_instance_uid": study.series_uid,
        "sop_class_uid": sop_class if study.source_format.startswith("dicom") else None,
        "modality": study.modality,
        "kind": study.kind,
        "source_format": study.source_format,
        "n_slices": study.shape[0],
        "series_description": study.series_description,
        "study_description": study.metadata.get("study_description"),
    }
