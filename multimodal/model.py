"""``ReportModel``: image + audio encoders, history summary, fusion, decoder and finding heads.

Training: ``model(inputs)`` returns the losses (decoder LM loss on the report tokens, finding-head
loss, MoE balance loss) and their weighted sum ``loss``. Inference: ``generate_report`` returns
report token ids, calibrated finding probabilities, modality gates and Grad-CAM evidence.
Checkpoints: ``save_pretrained`` / ``from_pretrained`` (safetensors weights + JSON config +
tokenizer JSON; nothing pickled).

Shape legend: B batch, S slabs, H/W slab size, M mel bins, T frames or tokens, L history tokens,
F fused tokens, D width, K findings, V valid slabs.
"""
from __future__ import annotations

import dataclasses

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from core.decoder import Decoder, copy_loss, spans_to_mask
from core.generate import GenerationConfig, Guidance, any_veto, generate
from data.errors import MedreportError
from data.finding_prompt import (acquisition_phrase, finding_prompt, with_measurements, with_record_locations,
                                 without_thickness)
from data.report_format import SECTION_KEYS
from multimodal.audio_encoder import AudioEncoder
from multimodal.evidence import Evidence, evidence_from_maps, gradcam_maps
from multimodal.fusion import MODALITIES, Fusion, HistorySummary
from multimodal.heads import SIDES, FindingHeads, FindingLabels, HeadsOutput, heads_loss
from multimodal.image_encoder import ImageEncoder
from multimodal.presets import ModelConfig

log = logging.getLogger(__name__)

FORMAT = "medreport-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(MedreportError):
    """A model directory is missing, incomplete, or holds files that are not what they claim."""


# ----------------------------------------------------------------------------- inputs


@dataclass
class StudyInputs:
    """One study's model inputs as arrays (what ``data.preprocess`` produces)."""

    pixels: np.ndarray  # float32 (S, C, H, W) in [0, 1] (C = image.in_chans)
    z_mm: np.ndarray  # (S,) slab centres, mm
    z_index_range: np.ndarray | None = None  # int (S, 2) original slice ranges [start, stop)
    mel: np.ndarray | None = None  # float32 (1, M, T) or (M, T) log-mel; None = no dictation
    history_ids: Sequence[int] | None = None  # record token ids (no special tokens); None = no history
    digest_len: int = 0  # the last digest_len history ids are the history digest (copy sources)
    acquisition: str | None = None  # the acquisition line (data.finding_prompt.study_acquisition); None = unknown
    # where the patient's record locates a finding (data.finding_prompt.record_locations, e.g. the
    # lobe of a lobectomy), or else a detector on the CT (data.detectors: a lymph node's station);
    # a call of that finding takes this location at inference
    record_locations: dict[str, str] | None = None
    # which of record_locations' findings a detector placed (not the record): the findings table's
    # provenance only
    detector_located: tuple[str, ...] = ()
    # measured nodule sizes, mm ({"any"|"left"|"right": size}; data.detectors.read_study),
    # for a model whose nodule call carries its size (cfg.nodule_size_prompt); None = not measured
    nodule_mm: dict[str, float] | None = None
    # the lung nodule's size on a prior study as the record states it (data.finding_prompt.
    # record_prior_nodule_mm); read by the decoding veto only (data.report_consistency.MeasurementVeto)
    prior_nodule_mm: float | None = None
    # the classical detectors' evidence per finding ({"nodule": log score, "fracture": HU, ...};
    # data.detectors),
    # read by the heads where the model fuses it (heads.detector_evidence); None = not run
    evidence: dict[str, float] | None = None

    @classmethod
    def from_slabs(cls, slabs, mel: np.ndarray | None = None, history_ids: Sequence[int] | None = None) -> "StudyInputs":
        """From a ``data.preprocess.Slabs`` (pixels, z_mm, z_index_range)."""
        return cls(slabs.pixels, slabs.z_mm, slabs.z_index_range, mel, history_ids)


@dataclass
class ModelInputs:
    """A padded batch. Masks: True = valid."""

    slabs: torch.Tensor  # [B, S, C, H, W]
    slab_mask: torch.Tensor  # [B, S] bool
    z_mm: torch.Tensor  # [B, S]
    z_index_range: torch.Tensor | None = None  # [B, S, 2] long
    mel: torch.Tensor | None = None  # [B, 1, M, T]
    audio_present: torch.Tensor | None = None  # [B] bool
    audio_lengths: torch.Tensor | None = None  # [B] frames
    history_ids: torch.Tensor | None = None  # [B, L] long
    history_mask: torch.Tensor | None = None  # [B, L] bool
    ids: torch.Tensor | None = None  # [B, T] decoder sequence [BOS] history [REPORT] report [EOS]
    lm_labels: torch.Tensor | None = None  # [B, T] = ids where a token is to be predicted, else -100
    lm_weights: torch.Tensor | None = None  # [B, T] float: per-token LM loss weight (None = all 1)
    labels: FindingLabels | None = None
    token_targets: torch.Tensor | None = None  # [B, S*G*G, K] which image token shows which finding
    dense_targets: torch.Tensor | None = None  # [B, S, G, G, K] the same on the finest dense-loss grid
    history_digest_len: torch.Tensor | None = None  # [B] long: trailing history tokens that are the digest
    copy_mask: torch.Tensor | None = None  # [B, T] bool: decoder positions the copy head may copy from
    prompt_len: torch.Tensor | None = None  # [B] long: finding-prompt tokens between the history and [REPORT]
    acquisition: list[str | None] | None = None  # per study, its acquisition line (cfg.acquisition_prompt)
    record_locations: list[dict[str, str] | None] | None = None  # per study, StudyInputs.record_locations
    nodule_mm: list[dict[str, float] | None] | None = None  # per study, StudyInputs.nodule_mm
    evidence: list[dict[str, float] | None] | None = None  # per study, StudyInputs.evidence

    @property
    def batch_size(self) -> int:
        return self.slabs.shape[0]

    def to(self, device: torch.device | str) -> "ModelInputs":
        def mv(x):
            if x is None:
                return None
            if isinstance(x, list):  # per-study text (acquisition lines)
                return x
            if isinstance(x, FindingLabels):
                return FindingLabels(*(None if t is None else t.to(device) for t in (x.present_BK, x.side_BK, x.location_BK)))
            return x.to(device)

        return ModelInputs(**{k: mv(v) for k, v in self.__dict__.items()})


def collate(studies: Sequence[StudyInputs]) -> ModelInputs:
    """Pad a list of studies into a batch (slabs, audio frames and history tokens padded at the end)."""
    B = len(studies)
    S = max(s.pixels.shape[0] for s in studies)
    C, H, W = studies[0].pixels.shape[1:]
    slabs = torch.zeros(B, S, C, H, W)
    slab_mask = torch.zeros(B, S, dtype=torch.bool)
    z_mm = torch.zeros(B, S)
    zr = torch.zeros(B, S, 2, dtype=torch.long)
    for b, s in enumerate(studies):
        n = s.pixels.shape[0]
        if s.pixels.shape[1:] != (C, H, W):
            raise ValueError("all studies of a batch need the same slab size (C, H, W)")
        slabs[b, :n] = torch.as_tensor(s.pixels, dtype=torch.float32)
        slab_mask[b, :n] = True
        z_mm[b, :n] = torch.as_tensor(np.asarray(s.z_mm, dtype=np.float32))
        zr[b, :n] = torch.as_tensor(
            np.asarray(s.z_index_range) if s.z_index_range is not None else np.stack([np.arange(n), np.arange(n) + 1], 1)
        )
    mels = [None if s.mel is None else np.asarray(s.mel, dtype=np.float32).reshape(-1, np.shape(s.mel)[-1]) for s in studies]
    mel = present = lengths = None
    if any(m is not None for m in mels):
        M = next(m.shape[0] for m in mels if m is not None)
        T = max(m.shape[1] for m in mels if m is not None)
        mel = torch.zeros(B, 1, M, T)
        present = torch.zeros(B, dtype=torch.bool)
        lengths = torch.zeros(B, dtype=torch.long)
        for b, m in enumerate(mels):
            if m is not None:
                mel[b, 0, :, : m.shape[1]] = torch.as_tensor(m)
                present[b] = True
                lengths[b] = m.shape[1]
    hist = hmask = None
    if any(s.history_ids is not None and len(s.history_ids) for s in studies):
        L = max(len(s.history_ids or ()) for s in studies)
        hist = torch.zeros(B, L, dtype=torch.long)
        hmask = torch.zeros(B, L, dtype=torch.bool)
        for b, s in enumerate(studies):
            n = len(s.history_ids or ())
            if n:
                hist[b, :n] = torch.as_tensor(list(s.history_ids), dtype=torch.long)
                hmask[b, :n] = True
    dlen = None
    if any(s.digest_len for s in studies):
        dlen = torch.tensor([min(s.digest_len, len(s.history_ids or ())) for s in studies], dtype=torch.long)
    acq = [s.acquisition for s in studies] if any(s.acquisition for s in studies) else None
    rec = [s.record_locations for s in studies] if any(s.record_locations for s in studies) else None
    nod = [s.nodule_mm for s in studies] if any(s.nodule_mm for s in studies) else None
    ev = [s.evidence for s in studies] if any(s.evidence for s in studies) else None
    return ModelInputs(slabs, slab_mask, z_mm, zr, mel, present, lengths, hist, hmask, history_digest_len=dlen,
                       acquisition=acq, record_locations=rec, nodule_mm=nod, evidence=ev)


def decoder_losses(cfg: ModelConfig, out, x: ModelInputs, canon_V: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The decoder's losses from its output ``out``: ``aux`` (MoE balance), ``lm`` (next token on
    the report, when ``x.lm_labels``), ``copy`` (supervised copy, when ``cfg.copy_weight`` and the
    copy head ran; ``canon_V``: the decoder's canonical-token map for case-aware copying) and
    ``weighted``, their sum with the config's weights."""
    losses = {"aux": out.aux_loss}
    total = cfg.aux_weight * out.aux_loss
    if x.lm_labels is not None:
        L1 = getattr(out, "logits_from", 0) + 1  # out.logits[:, i] (position L1 - 1 + i) predicts token L1 + i
        if x.lm_weights is None:
            lm = F.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), x.lm_labels[:, L1:].flatten(), ignore_index=-100
            )
        else:  # weighted mean over the predicted tokens (weights of the targets t+1)
            labels_N = x.lm_labels[:, L1:].flatten()  # [B*(T-L1)]
            ce_N = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels_N, ignore_index=-100,
                                   reduction="none")
            w_N = x.lm_weights[:, L1:].flatten().float() * (labels_N != -100)  # [B*(T-L1)]
            lm = (ce_N * w_N).sum() / w_N.sum().clamp_min(1e-6)
        losses["lm"] = lm
        total = total + cfg.lm_weight * lm
        if cfg.copy_weight > 0 and out.copy is not None:
            losses["copy"] = copy_loss(out.copy, x.ids, x.lm_labels, n=cfg.copy_ngram, canon_V=canon_V)
            total = total + cfg.copy_weight * losses["copy"]
    losses["weighted"] = total
    return losses


def lm_start(x: ModelInputs) -> int:
    """The first position whose logits a loss reads: the one before the batch's first target
    (``Decoder.forward``'s ``logits_from``); 0 without targets."""
    if x.lm_labels is None:
        return 0
    cols = torch.nonzero((x.lm_labels != -100).any(0)).flatten()
    return max(0, int(cols[0]) - 1) if len(cols) else 0


def uses_prompt(cfg: ModelConfig) -> bool:
    """Whether the decoder reads a prompt between the history and [REPORT]."""
    return cfg.finding_prompt or cfg.acquisition_prompt


def config_prompt_ids(tokenizer, cfg: ModelConfig, calls: Sequence[tuple[str, str | None, str | None]],
                      acquisition: str | None, with_calls: bool = True) -> list[int]:
    """The prompt the config asks for, as token ids: the acquisition line (``cfg.acquisition_prompt``;
    "Acquisition: unknown." when the study's is None) then the calls (``cfg.finding_prompt``).
    Training (from labels and the cached header) and inference (from the heads and the loaded
    study) both build it here, so the two cannot drift apart."""
    parts = []
    if cfg.acquisition_prompt:
        line = acquisition or acquisition_phrase(None, None)
        parts.append(line if cfg.acquisition_thickness else without_thickness(line))
    if cfg.finding_prompt and with_calls:  # with_calls=False: training's finding_prompt_dropout
        parts.append(finding_prompt(calls, by_system=cfg.finding_prompt_by_system))
    if not parts:
        return []
    return list(tokenizer.tk.encode(" ".join(parts), add_special_tokens=False).ids)


def digest_spans(x: ModelInputs) -> list[tuple[int, int] | None] | None:
    """Per study, the ``[start, end)`` positions of the copy sources in the decoder sequence
    ``[BOS] history [prompt] [REPORT] ...``: the history digest (the history's last tokens) and
    the finding prompt right after it (None where a study has neither)."""
    if x.history_mask is None and x.prompt_len is None:
        return None
    B = x.batch_size
    n_hist = x.history_mask.sum(1).tolist() if x.history_mask is not None else [0] * B
    dig = x.history_digest_len.tolist() if x.history_digest_len is not None else [0] * B
    pl = x.prompt_len.tolist() if x.prompt_len is not None else [0] * B
    spans = [(1 + n - d, 1 + n + p) if d + p > 0 else None for n, d, p in zip(n_hist, dig, pl)]
    return None if all(sp is None for sp in spans) else spans


def token_loss(logits_BNK: torch.Tensor, targets_BNK: torch.Tensor, mask_BN: torch.Tensor,
               pos_weight: float = 4.0, mode: str = "weighted") -> torch.Tensor:
    """BCE of per-token (or per-cell) finding logits against where the lesions are, over valid
    tokens. ``mode`` "weighted": averaged over tokens with positives up-weighted (a lesion covers
    few tokens); "balanced": per finding, mean over its positive tokens + mean over its negative
    tokens, then averaged over findings (a finding without positives in the batch adds only its
    negative term), so rare small lesions pull as hard as large ones."""
    n = min(logits_BNK.shape[1], targets_BNK.shape[1])
    lg, tg = logits_BNK[:, :n].float(), targets_BNK[:, :n].to(logits_BNK.device).float()
    valid = mask_BN[:, :n, None].float()  # [B, N, 1]
    bce = F.binary_cross_entropy_with_logits(lg, tg, reduction="none")  # [B, N, K]
    if mode == "balanced":
        pos, neg = tg * valid, (1 - tg) * valid  # [B, N, K]
        pos_K = (bce * pos).sum((0, 1)) / pos.sum((0, 1)).clamp_min(1)  # [K]
        neg_K = (bce * neg).sum((0, 1)) / neg.sum((0, 1)).clamp_min(1)  # [K]
        return (pos_K + neg_K).mean() / 2
    w = valid * (1 + (pos_weight - 1) * tg)  # [B, N, K]
    return (bce * w).sum() / w.sum().clamp_min(1)


def dense_loss(maps: Sequence[torch.Tensor], convs: Sequence[nn.Module], targets_VGGK: torch.Tensor,
               mode: str = "weighted") -> torch.Tensor:
    """Dense localisation loss, averaged over backbone stages: each map [V, C, h, w] goes through
    its 1x1 convolution to finding logits [V, K, h, w], scored against the lesion targets of the
    same valid slabs [V, G, G, K] (G the finest grid) max-pooled to h x w: a cell at a coarser
    stage is the union of the finer cells it covers, so the pooled target is exactly its own."""
    tg_VKGG = targets_VGGK.permute(0, 3, 1, 2).float()  # [V, K, G, G]
    total = targets_VGGK.new_zeros((), dtype=torch.float32)
    for m_VChw, conv in zip(maps, convs):
        h, w = m_VChw.shape[-2:]
        if tg_VKGG.shape[-1] % w or tg_VKGG.shape[-2] % h:
            raise ValueError(f"dense targets of {tg_VKGG.shape[-1]} cells do not tile a {h} x {w} map; "
                             "build them at the finest dense stage's grid (data side: dense_grid)")
        t = F.max_pool2d(tg_VKGG, (tg_VKGG.shape[-2] // h, tg_VKGG.shape[-1] // w))  # [V, K, h, w]
        lg = conv(m_VChw).float()  # [V, K, h, w]
        lg_1NK = rearrange(lg, "v k h w -> 1 (v h w) k")  # every cell a token
        t_1NK = rearrange(t, "v k h w -> 1 (v h w) k")
        ones = torch.ones(lg_1NK.shape[:2], dtype=torch.bool, device=lg.device)
        total = total + token_loss(lg_1NK, t_1NK, ones, mode=mode)
    return total / max(1, len(maps))


# ----------------------------------------------------------------------------- outputs


@dataclass
class Encoded:
    fused_BFD: torch.Tensor
    mask_BF: torch.Tensor
    gates_BM: torch.Tensor  # [B, 3] in MODALITIES order
    feats_VChw: torch.Tensor | None = None  # image backbone maps (kept for evidence)
    study_of_row_V: torch.Tensor | None = None
    image_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # ([B, Ni, D_img], [B, Ni]) for the token loss
    dense_maps: list[torch.Tensor] | None = None  # backbone maps of heads.dense_stages [V, C_i, h_i, w_i] (training)


@dataclass
class ModelOutput:
    losses: dict[str, torch.Tensor]
    heads: HeadsOutput
    gates_BM: torch.Tensor
    logits_BTV: torch.Tensor | None = None  # from position logits_from on (the one before the first target)
    logits_from: int = 0

    @property
    def loss(self) -> torch.Tensor:
        return self.losses["loss"]


@dataclass
class ReportPrediction:
    """One study's inference result."""

    token_ids: list[int]
    finding_probs: dict[str, float]  # calibrated presence probability per finding
    side_probs: dict[str, dict[str, float]]
    location: dict[str, str]  # most likely coarse location per finding
    gates: dict[str, float]  # modality gate weights (image / audio / history)
    evidence: dict[str, Evidence] = field(default_factory=dict)  # per finding (those reported)


# ----------------------------------------------------------------------------- model


class ReportModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = None  # optional; saved with the checkpoint (not a module)
        self.image_encoder = ImageEncoder(cfg.image)
        self.audio_encoder = AudioEncoder(cfg.audio)
        self.decoder = Decoder(cfg.decoder)
        self.history_summary = HistorySummary(cfg.fusion.n_history_tokens)
        if cfg.fusion.n_digest_tokens > 0:
            self.digest_summary = HistorySummary(cfg.fusion.n_digest_tokens)
        d_dec = cfg.decoder.d_model
        self.fusion = Fusion(cfg.fusion, cfg.image.dim, cfg.audio.dim, d_dec, d_dec)
        dense_ch = tuple(self.image_encoder.stage_channels(i) for i in cfg.heads.dense_stages) \
            if cfg.heads.dense_loss_weight > 0 else ()
        self.heads = FindingHeads(cfg.heads, d_dec, cfg.image.dim, dense_ch, grid=cfg.image.grid)
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer) -> None:
        """Attach the tokenizer (saved with the model); case-aware copying reads its maps from it."""
        self.tokenizer = tokenizer
        if self.cfg.decoder.copy and self.cfg.decoder.copy_case:
            self.decoder.set_copy_vocab(*tokenizer.copy_vocab())

    @property
    def finding_names(self) -> tuple[str, ...]:
        return tuple(self.cfg.heads.finding_names)

    # -- encoding
    def visible_inputs(self, x: ModelInputs) -> ModelInputs:
        """``x`` with the modalities this model does not read (``cfg.use_image`` / ``use_audio``)
        masked out, as if the study had none."""
        if self.cfg.use_image and self.cfg.use_audio:
            return x
        x = dataclasses.replace(x)
        if not self.cfg.use_image:
            x.slab_mask = torch.zeros_like(x.slab_mask)
        if not self.cfg.use_audio and x.audio_present is not None:
            x.audio_present = torch.zeros_like(x.audio_present)
        return x

    def encode(self, x: ModelInputs, keep_features: bool = False) -> Encoded:
        x = self.visible_inputs(x)
        B = x.batch_size
        dev = x.slabs.device
        feats = rows = maps = None
        dense = self.cfg.heads.dense_loss_weight > 0 and x.dense_targets is not None and self.training
        if bool(x.slab_mask.any()):
            if dense:  # one backbone pass that also returns the dense-loss stages' maps
                feats, maps = self.image_encoder.backbone_maps(x.slabs, x.slab_mask, self.cfg.heads.dense_stages)
            else:
                feats = self.image_encoder.backbone_features(x.slabs, x.slab_mask)  # [V, C, h, w]
            img = self.image_encoder.tokens_from_features(feats, x.slab_mask, x.z_mm)
            rows = x.slab_mask.nonzero()[:, 0]  # [V] study of each valid slab
        else:
            img = self.image_encoder(x.slabs, x.slab_mask, x.z_mm)
        if x.mel is not None and x.audio_present is not None and bool(x.audio_present.any()):
            aud = self.audio_encoder(x.mel, x.audio_present, x.audio_lengths)
        else:
            aud = (torch.zeros(B, 1, self.cfg.audio.dim, device=dev), torch.zeros(B, 1, dtype=torch.bool, device=dev))
        fused, mask, gates = self.fusion(img, aud, self.history_tokens(x))
        if not keep_features:
            feats = rows = None
        return Encoded(fused, mask, gates, feats, rows, img, maps)

    def history_tokens(self, x: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The history as fusion reads it: the record block-pooled into ``fusion.n_history_tokens``
        tokens and, with ``fusion.n_digest_tokens``, the history digest (the record's last
        ``history_digest_len`` tokens) pooled apart into that many more. -> ([B, n, D_dec], [B, n])

        Why the digest apart: a 16K-token record pooled into 32 blocks averages its indication
        ("follow-up of pulmonary nodule") with ~500 other tokens, and the block size grows with the
        record, so training (history cap 1,024) and inference (the whole record) see different
        summaries. The digest is at most ~240 tokens whatever the record's length."""
        B, dev, d = x.batch_size, x.slabs.device, self.cfg.decoder.d_model
        if x.history_ids is None or x.history_ids.shape[1] == 0:
            n = 1 + self.cfg.fusion.n_digest_tokens  # (positions: record block 0, then digest blocks)
            return torch.zeros(B, n, d, device=dev), torch.zeros(B, n, dtype=torch.bool, device=dev)
        hmask_BL = x.history_mask if x.history_mask is not None else torch.ones_like(x.history_ids, dtype=torch.bool)
        emb_BLD = self.decoder.tok_embeddings(x.history_ids)  # [B, L, D_dec]
        nd = self.cfg.fusion.n_digest_tokens
        if nd <= 0:
            return self.history_summary(emb_BLD, hmask_BL)  # bounded: [B, n, D_dec]
        L = x.history_ids.shape[1]
        dlen_B = x.history_digest_len if x.history_digest_len is not None else torch.zeros(B, dtype=torch.long, device=dev)
        start_B = hmask_BL.sum(1) - dlen_B.to(dev)  # [B] first digest position (right-padded history)
        pos_1L = torch.arange(L, device=dev)[None]  # [1, L]
        dig_BL = hmask_BL & (pos_1L >= start_B[:, None])
        rec, rec_m = self.history_summary(emb_BLD, hmask_BL & ~dig_BL)  # [B, n_rec, D], [B, n_rec]
        dig, dig_m = self.digest_summary(emb_BLD, dig_BL)  # [B, nd, D], [B, nd]
        return torch.cat([rec, dig], 1), torch.cat([rec_m, dig_m], 1)  # [B, n_rec + nd, D]

    def decoder_context(self, fused_BFD: torch.Tensor, mask_BF: torch.Tensor,
                        heads: HeadsOutput, labels: FindingLabels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder cross-attends to: the fused tokens, plus one token per finding when
        ``heads.finding_context`` is on (``labels``: in training, for ``heads.context_teacher``).
        -> ([B, F(+K), D], [B, F(+K)])"""
        extra = self.heads.context_tokens(heads, labels)  # [B, K, D] or None
        if extra is None:
            return fused_BFD, mask_BF
        extra = extra.to(fused_BFD.dtype)
        ones = torch.ones(extra.shape[:2], dtype=mask_BF.dtype, device=mask_BF.device)  # [B, K]
        p = self.cfg.context_dropout
        if self.training and p > 0 and labels is not None:
            # Training only: these studies' decoder sees the finding tokens alone (and the prompt),
            # so the text must be written from the calls (ModelConfig.context_dropout).
            keep_B1 = torch.rand(mask_BF.shape[0], 1, device=mask_BF.device) >= p  # [B, 1]
            mask_BF = mask_BF & keep_B1
        return torch.cat([fused_BFD, extra], 1), torch.cat([mask_BF, ones], 1)

    # -- training
    def forward(self, x: ModelInputs) -> ModelOutput:
        enc = self.encode(x)
        heads = self.heads(enc.fused_BFD, enc.mask_BF, enc.image_tokens, x.evidence)
        zero = enc.fused_BFD.new_zeros(())
        losses: dict[str, torch.Tensor] = {}
        logits = None
        total = zero
        if x.labels is not None:
            hl = heads_loss(heads, x.labels, self.cfg.heads)
            losses.update(hl)
            total = total + self.cfg.heads_weight * hl["heads"]
        if (x.token_targets is not None and self.cfg.heads.token_loss_weight > 0
                and enc.image_tokens is not None):
            losses["token"] = token_loss(self.heads.token_logits(enc.image_tokens[0]), x.token_targets,
                                         enc.image_tokens[1], mode=self.cfg.heads.localisation_loss)
            total = total + self.cfg.heads.token_loss_weight * losses["token"]
        if enc.dense_maps is not None:  # only built when the model reads the image, so x.slab_mask is the one used
            losses["dense"] = dense_loss(enc.dense_maps, self.heads.dense_logits,
                                         x.dense_targets[x.slab_mask], self.cfg.heads.localisation_loss)
            total = total + self.cfg.heads.dense_loss_weight * losses["dense"]
        if x.ids is not None:
            out = self.decoder(x.ids, *self.decoder_context(enc.fused_BFD, enc.mask_BF, heads, x.labels),
                               copy_mask_BT=x.copy_mask, logits_from=lm_start(x))
            logits = out.logits  # from position out.logits_from on
            dl = decoder_losses(self.cfg, out, x, self.decoder.copy_canon())
            total = total + dl.pop("weighted")
            losses.update(dl)
        losses["loss"] = total
        return ModelOutput(losses, heads, enc.gates_BM, logits, out.logits_from if logits is not None else 0)

    # -- finding prompt (cfg.finding_prompt)
    def calls(self, heads: HeadsOutput, record_locations: Sequence[dict[str, str] | None] | None = None,
              nodule_mm: Sequence[dict[str, float] | None] | None = None) -> list[list[tuple]]:
        """Per study, the findings called present (calibrated probability at each finding's
        operating point) as ``(name, side, location)`` with the heads' most likely side and
        coarse location, or the location the study's record states (``record_locations``, per
        study; ``data.finding_prompt.with_record_locations``: a lobectomy's lobe); with
        ``cfg.nodule_size_prompt``, a nodule call measured on its side gets its size as a fourth
        field (``nodule_mm``, per study; ``data.finding_prompt.with_measurements``)."""
        called, side, loc = (t.cpu().tolist() for t in self.heads.calls(heads))  # [B, K] each
        locs = self.cfg.heads.locations
        rec = record_locations or [None] * len(called)
        sizes = nodule_mm if (nodule_mm and self.cfg.nodule_size_prompt) else [None] * len(called)
        return [with_measurements(with_record_locations([(n, SIDES[side[b][k]], locs[loc[b][k]])
                                                         for k, n in enumerate(self.finding_names) if called[b][k]],
                                                        rec[b]), sizes[b])
                for b in range(len(called))]

    @staticmethod
    def no_calls(heads: HeadsOutput) -> HeadsOutput:
        """The same heads output with no finding called (presence far below every operating
        point, no detector evidence): the counterfactual twin of contrastive calls guidance
        (``core.generate.Guidance``), whose prompt reads "Calls: none." and whose finding-context
        tokens say absent, beside the same images, audio and history."""
        return dataclasses.replace(heads, presence_logits_BK=torch.full_like(heads.presence_logits_BK, -1e4),
                                   evidence_BK=None)

    def prompt_ids(self, calls: Sequence[tuple[str, str | None, str | None]], acquisition: str | None = None) -> list[int]:
        """Token ids of one study's prompt (its acquisition line and/or its calls, as the config
        says; needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("the finding prompt needs the model's tokenizer (model.set_tokenizer)")
        return config_prompt_ids(self.tokenizer, self.cfg, calls, acquisition)

    def with_prompts(self, x: ModelInputs, prefixes: list[list[int]], heads: HeadsOutput) -> tuple[ModelInputs, list[list[int]]]:
        """Insert each study's prompt (its acquisition line from ``x.acquisition`` and/or the
        heads' calls) before the last prefix token ([REPORT]); -> (inputs with ``prompt_len``, new
        prefixes). A no-op without ``cfg.finding_prompt`` and ``cfg.acquisition_prompt``."""
        if not uses_prompt(self.cfg):
            return x, prefixes
        acq = x.acquisition or [None] * x.batch_size
        prompts = [self.prompt_ids(c, a) for c, a in zip(self.calls(heads, x.record_locations, x.nodule_mm), acq)]
        out = [list(p[:-1]) + q + list(p[-1:]) for p, q in zip(prefixes, prompts)]
        lens = torch.tensor([len(q) for q in prompts], dtype=torch.long, device=x.slabs.device)  # [B]
        return dataclasses.replace(x, prompt_len=lens), out

    # -- inference
    @torch.inference_mode()
    def predict_findings(self, x: ModelInputs) -> tuple[HeadsOutput, torch.Tensor]:
        """Heads output and gates [B, 3] (eval mode, no grad)."""
        was = self.training
        self.eval()
        try:
            enc = self.encode(x)
            return self.heads(enc.fused_BFD, enc.mask_BF, enc.image_tokens, x.evidence), enc.gates_BM
        finally:
            self.train(was)

    def generate_report(
        self,
        x: ModelInputs,
        prefixes: list[list[int]] | None = None,
        gen: GenerationConfig | None = None,
        evidence: bool = True,
        evidence_threshold: float = 0.5,
        evidence_findings: Sequence[str] | None = None,
        vetoes_for: Callable[[list[str]], Callable[[list[int]], bool] | None] | None = None,
        row_vetoes: Sequence[Callable[[list[int]], bool] | None] | None = None,
        vetoes_for_calls: Callable[[int, list[tuple]], Callable[[list[int]], bool] | None] | None = None,
        calls_guidance: float = 0.0,
        rerank_for: Callable[[int, list[str]], Callable[[list[int]], float] | None] | None = None,
    ) -> list[ReportPrediction]:
        """Report tokens, calibrated finding probabilities, gates and Grad-CAM evidence per study.

        prefixes: per study ``[BOS] history [REPORT]`` ids; if None they are built from
        ``x.history_ids`` with the model's tokenizer (whose EOS / section ids also fill ``gen``
        when it is None).
        Evidence is computed for ``evidence_findings`` if given, else for every finding whose
        probability reaches ``evidence_threshold``.
        ``vetoes_for``: given a study's called finding names (the heads at their operating points),
        a decoding veto for its report (``core.generate``; e.g. ``data.report_consistency.CallsVeto``).
        ``row_vetoes``: one more veto (or None) per study, known before the calls (e.g.
        ``data.report_consistency.AcquisitionVeto``); a continuation either refuses is refused.
        ``vetoes_for_calls``: given a study's index and its calls as the decoder reads them (with a
        nodule's measured size), one more veto (e.g. ``data.report_consistency.MeasurementVeto``).
        ``calls_guidance``: > 0 decodes with contrastive guidance against the same study with no
        finding called (:meth:`no_calls`) at that weight (greedy decoding or sampling).
        ``rerank_for``: with ``gen.strategy == "mbr"``, given a study's index and its called finding
        names, a score of a candidate report's tokens added to its MBR agreement, or None (e.g.
        ``data.report_consistency.CallsAgreement``).
        """
        if prefixes is None or gen is None:
            if self.tokenizer is None:
                raise ValueError("give prefixes and gen, or attach a tokenizer (model.tokenizer)")
            tok = self.tokenizer
            if prefixes is None:
                prefixes = []
                for b in range(x.batch_size):
                    hist = [] if x.history_ids is None else x.history_ids[b][x.history_mask[b]].tolist()
                    prefixes.append([tok.bos_id] + hist + [tok.report_id])
            if gen is None:
                gen = GenerationConfig(eos_id=tok.eos_id, section_ids=list(tok.section_ids), pad_id=tok.pad_id)
        was = self.training
        self.eval()
        try:
            if evidence and bool(x.slab_mask.any()):
                with torch.enable_grad():
                    enc = self.encode(x, keep_features=True)
                    heads = self.heads(enc.fused_BFD, enc.mask_BF, enc.image_tokens, x.evidence)
            else:
                with torch.inference_mode():
                    enc = self.encode(x)
                    heads = self.heads(enc.fused_BFD, enc.mask_BF, enc.image_tokens, x.evidence)
            x0, prefixes0 = x, prefixes
            x, prefixes = self.with_prompts(x, prefixes, heads)
            with torch.inference_mode():
                ctx, cmask = self.decoder_context(enc.fused_BFD.detach(), enc.mask_BF, heads)
                guide = None
                if calls_guidance > 0:
                    none = self.no_calls(heads)
                    xu, pu = self.with_prompts(x0, prefixes0, none)
                    cu, mu = self.decoder_context(enc.fused_BFD.detach(), enc.mask_BF, none)
                    g = gen or GenerationConfig()
                    start = (g.section_ids[SECTION_KEYS.index("findings")],) if g.section_ids else ()
                    guide = Guidance(pu, cu, mu, digest_spans(xu) if self.cfg.decoder.copy else None, calls_guidance,
                                     start_ids=start)
                vetoes = None
                if vetoes_for is not None:
                    vetoes = [vetoes_for([c[0] for c in row]) for row in self.calls(heads)]
                if row_vetoes is not None:
                    if len(row_vetoes) != len(prefixes):
                        raise ValueError("give one row veto (or None) per study")
                    vetoes = [any_veto([a, b]) for a, b in zip(vetoes or [None] * len(row_vetoes), row_vetoes)]
                if vetoes_for_calls is not None:
                    rows = self.calls(heads, x.record_locations, x.nodule_mm)
                    more = [vetoes_for_calls(b, row) for b, row in enumerate(rows)]
                    vetoes = [any_veto([a, c]) for a, c in zip(vetoes or [None] * len(more), more)]
                rerank = None if rerank_for is None else [rerank_for(b, [c[0] for c in row])
                                                          for b, row in enumerate(self.calls(heads))]
                token_ids = generate(self.decoder, prefixes, ctx, cmask, gen or GenerationConfig(),
                                     copy_spans=digest_spans(x) if self.cfg.decoder.copy else None, vetoes=vetoes,
                                     guidance=guide, rerank=rerank)
            probs = heads.presence_probs.detach().cpu()
            side = torch.softmax(heads.side_logits_BK4.detach(), -1).cpu()
            loc = heads.location_logits_BKL.detach().argmax(-1).cpu()
            names = self.finding_names
            preds = []
            for b in range(x.batch_size):
                preds.append(ReportPrediction(
                    token_ids=token_ids[b],
                    finding_probs={n: float(probs[b, k]) for k, n in enumerate(names)},
                    side_probs={n: {s: float(side[b, k, i]) for i, s in enumerate(SIDES)} for k, n in enumerate(names)},
                    location={**{n: self.cfg.heads.locations[int(loc[b, k])] for k, n in enumerate(names)},
                              **((x.record_locations or [None] * x.batch_size)[b] or {})},
                    gates={m: float(enc.gates_BM[b, i].detach()) for i, m in enumerate(MODALITIES)},
                ))
            if evidence and enc.feats_VChw is not None:
                wanted = list(evidence_findings) if evidence_findings is not None else [
                    n for k, n in enumerate(names) if bool((probs[:, k] >= evidence_threshold).any())
                ]
                for n in wanted:
                    k = names.index(n)
                    ev = self._finding_evidence(enc, heads, k, x)
                    for b in range(x.batch_size):
                        if evidence_findings is not None or probs[b, k] >= evidence_threshold:
                            preds[b].evidence[n] = ev[b]
            return preds
        finally:
            self.train(was)

    def _finding_evidence(self, enc: Encoded, heads: HeadsOutput, k: int, x: ModelInputs) -> list[Evidence]:
        score = heads.presence_logits_BK[:, k].sum()  # studies independent in eval mode
        cam = gradcam_maps(enc.feats_VChw, score, enc.study_of_row_V, x.batch_size)
        return evidence_from_maps(cam, x.slab_mask, tuple(x.slabs.shape[-2:]), x.z_index_range)

    def finding_evidence(self, x: ModelInputs, findings: Sequence[str]) -> dict[str, list[Evidence]]:
        """Grad-CAM evidence per finding name -> one Evidence per study of the batch."""
        was = self.training
        self.eval()
        try:
            with torch.enable_grad():
                enc = self.encode(x, keep_features=True)
                heads = self.heads(enc.fused_BFD, enc.mask_BF, enc.image_tokens, x.evidence)
                return {n: self._finding_evidence(enc, heads, self.finding_names.index(n), x) for n in findings}
        finally:
            self.train(was)

    def sentence_evidence(self, x: ModelInputs, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[Evidence]:
        """Grad-CAM evidence for generated sentences of ONE study (batch of 1).

        ids: the full decoder sequence (prefix + generated tokens); spans: [start, stop) token
        positions of each sentence in ``ids``. A sentence's score is the sum of its tokens'
        log-probabilities given the image (teacher-forced)."""
        if x.batch_size != 1:
            raise ValueError("sentence_evidence takes one study")
        was = self.training
        self.eval()
        try:
            with torch.enable_grad():
                enc = self.encode(x, keep_features=True)
                if enc.feats_VChw is None:
                    return []
                ids_1T = torch.as_tensor([list(ids)], dtype=torch.long, device=x.slabs.device)
                heads = self.heads(enc.fused_BFD, enc.mask_BF, enc.image_tokens, x.evidence)
                ctx = self.decoder_context(enc.fused_BFD, enc.mask_BF, heads)
                copy_mask = spans_to_mask(digest_spans(x), ids_1T.shape[1], ids_1T.device) if self.cfg.decoder.copy else None
                logp = torch.log_softmax(self.decoder(ids_1T, *ctx, copy_mask_BT=copy_mask).logits.float(), -1)
                tok_lp = logp[0, :-1].gather(-1, ids_1T[0, 1:, None])[:, 0]  # [T-1]: log p(ids[t+1])
                out = []
                for i, (a, c) in enumerate(spans):
                    score = tok_lp[max(a - 1, 0): max(c - 1, 0)].sum()
                    cam = gradcam_maps(enc.feats_VChw, score, enc.study_of_row_V, 1, retain_graph=True)
                    out.extend(evidence_from_maps(cam, x.slab_mask, tuple(x.slabs.shape[-2:]), x.z_index_range))
                return out
        finally:
            self.train(was)

    # -- checkpoints
    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.cfg.to_dict()}
        (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        # save_model handles the tied embedding / lm_head weights (save_file would refuse them).
        save_model(self, str(d / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is not None:
            tok.save(d / TOKENIZER_DIR)
        return d

    def load_weights(self, directory: str | Path, device: str | torch.device = "cpu") -> tuple[list[str], list[str]]:
        """Load a saved model folder's weights into this model (safetensors, not strict: tensors
        the file lacks stay as they are, extra ones are ignored; both are logged). Shapes must
        match. -> (missing, unexpected) names."""
        d = Path(directory)
        weights = d / WEIGHTS_FILE
        _check_safetensors(weights)
        try:
            missing, unexpected = load_model(self, str(weights), strict=False, device=str(device))
        except RuntimeError as exc:  # shape mismatch: config and weights disagree
            raise CheckpointError(
                f"{weights.name} does not match {CONFIG_FILE} in {d} ({str(exc).splitlines()[0][:200]}): "
                "the two files come from different models; re-export the checkpoint with save_pretrained"
            ) from None
        except Exception as exc:  # safetensors' own error: truncated / damaged data
            raise CheckpointError(f"{weights.name} in {d} could not be read ({exc}); the file is damaged") from None
        missing, unexpected = sorted(missing), sorted(unexpected)
        if missing:
            log.warning("checkpoint %s lacks %d tensors (left at init): %s", d.name, len(missing), ", ".join(missing[:10]))
        if unexpected:
            log.warning("checkpoint %s has %d unexpected tensors (ignored): %s", d.name, len(unexpected), ", ".join(unexpected[:10]))
        return missing, unexpected

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "ReportModel":
        d = Path(directory)
        cfg = read_config(d)
        cfg.image.weights_file = cfg.audio.weights_file = None  # the checkpoint carries all weights
        weights = d / WEIGHTS_FILE
        _check_safetensors(weights)
        model = cls(cfg)
        model.load_weights(d, device)
        h = cfg.heads
        if h.finding_context and h.context_mode == "calls" and not (h.call_sides or h.call_locations):
            log.warning("%s: its finding context gives every called finding a side and a location, which "
                        "training gave only some (heads.call_sides / call_locations are not set); run "
                        "`medreport calibrate --model %s --manifest <labelled studies>` to set them", d.name, d)
        if (d / TOKENIZER_DIR).is_dir():
            from data.tokenizer import ReportTokenizer  # data helper's JSON tokenizer

            model.set_tokenizer(ReportTokenizer.load(d / TOKENIZER_DIR))
        return model.to(device).eval()


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a saved model directory (checks that it is a medreport model)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} not found: give the folder written by save_pretrained / training")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{d} has no {CONFIG_FILE}: it is not a medreport model directory")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name} in {d} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path.name} in {d} is not a medreport model config (no '\"format\": \"{FORMAT}\"')")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"model format version {meta['format_version']} is newer than this medreport; upgrade it")
    try:
        return ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path.name} in {d} holds an invalid model config: {exc}") from None


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a medreport safetensors file, before parsing tensors."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: the checkpoint is incomplete")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header. That length can
    # begin with the byte 0x80 (a 90,496-byte header does), so a pickle's 0x80 opcode alone is no
    # proof: only a file that does not look like safetensors is called a pickle / torch.save zip.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path.name} is a pickled PyTorch file, not safetensors; medreport never loads pickles. "
            "Convert it with safetensors.torch.save_model on a trusted machine"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path.name} is not a valid safetensors file ({exc}); the file is damaged or truncated") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is a safetensors file but not a medreport model (metadata format={meta.get('format')!r})")
