"""``medreport train``: the training loop, single process or torchrun DDP.

    cfg = load_config(preset="tiny", config_file=None, overrides=["optim.lr=1e-3"])
    final_dir = train("datasets/demo/manifest.jsonl", "runs/demo", cfg)      # -> RUN_DIR/final
    final_dir = train(manifest, "runs/demo", resume=True)                   # continues exactly

Run directory::

    RUN_DIR/config.json            resolved TrainConfig (+ the model config it produced)
    RUN_DIR/tokenizer/             trained on the train split's reports + histories (unless given)
    RUN_DIR/metrics.jsonl          one JSON object per logged step / validation
    RUN_DIR/learning_curve.png     train and val loss (and val finding F1, BLEU-4)
    RUN_DIR/checkpoints/step_N/    save_pretrained files + trainer_state.pt (optimizer, scheduler,
                                   RNG states, data position; plain tensors/dicts, loaded with
                                   torch.load(weights_only=True))
    RUN_DIR/final/                 the calibrated model, ReportModel.from_pretrained-loadable
    RUN_DIR/final_metrics.json     validation metrics of the final model

Recipe pieces: AdamW (no decay on norms, biases, embeddings' norms), linear warm-up then cosine to
``min_lr_ratio``; gradient accumulation (DDP ``no_sync`` on all but the last micro-batch);
gradient clipping; optional decoder gradient checkpointing; bf16 autocast on CUDA only (fp32 on
CPU); loss = the model's weighted sum of report LM loss, finding-head loss and MoE balance loss.
*Stages* train parameter subsets in turn (e.g. encoders + fusion + heads on the finding loss,
then fusion + decoder + heads on cached encoder tokens); a single ``joint`` stage is the default.
A *length curriculum* raises the history cap during each stage (see ``DataConfig``).

DDP: ``torchrun --nproc_per_node=N -m app.cli train ...``; gloo on CPU, nccl on CUDA; a
``DistributedSampler`` per rank (``set_epoch`` every epoch); rank 0 trains the tokenizer, logs,
validates and saves while the others wait at barriers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from app.train_data import (
    PreprocessConfig, ReportDataset, StudyCache, TrainDataError, collate_examples, crop_slab_batch, dense_grid,
    fill_call_feature_masks, history_text, load_manifest_for_training,
)
from data.errors import MedreportError
from multimodal.model import ModelInputs, ReportModel, decoder_losses, lm_start
from multimodal.presets import PRESETS, ModelConfig

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class ConfigError(MedreportError):
    """A training config or ``key=value`` override that cannot be applied."""


# ============================================================================ configuration


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10  # per stage
    min_lr_ratio: float = 0.1  # cosine floor, as a share of the stage's peak lr
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    accum_steps: int = 1  # micro-batches per optimizer step


@dataclass
class DataConfig:
    batch_size: int = 2  # micro-batch per process
    cache_dir: str | None = None  # preprocessed study arrays; None = RUN_DIR/cache (share one across runs)
    tokenizer: str | None = None  # a saved ReportTokenizer folder; None = train one on the train split
    vocab_size: int = 4000
    tokenizer_history_chars: int = 20_000  # per record, when training the tokenizer
    # Length curriculum: (share of the stage's steps done, max history tokens from then on).
    history_curriculum: tuple[tuple[float, int], ...] = ((0.0, 512), (0.3, 2048), (0.7, 16384))
    history_crop: str = "facts"  # "facts" | "tail": see app.train_data
    max_report_tokens: int = 512
    audio: bool = True


@dataclass
class StageConfig:
    name: str = "joint"
    steps: int = 100  # optimizer steps
    train: tuple[str, ...] = ("all",)  # parameter-name prefixes to train ("all" = every parameter)
    # Prefixes kept frozen although ``train`` matches them (e.g. ["heads.where_"]: a later stage
    # trains those alone, and the stages before it stay what they were without them).
    freeze: tuple[str, ...] = ()
    lm: bool = True  # decoder LM loss on (False: finding-head loss only, decoder not run)
    cache_encoders: bool = False  # frozen image/audio encoders: compute their tokens once per study
    lr: float | None = None  # None = optim.lr
    # Per-module lr multipliers: [[parameter-name prefix, factor], ...], the first matching
    # prefix wins (e.g. [["image_encoder", 3.0]]: the CNN trained from scratch takes 3x the lr of
    # the fusion and heads). Empty = one lr for every trained parameter.
    lr_scale: tuple = ()
    # Image-crop stage (0 = off): the backbone trains on the dense localisation loss alone, over
    # windows of this many pixels cut from ``crop_slabs`` slabs per study, a share
    # ``crop_lesion_share`` of them centred on a lesion (app.train_data.crop_slab_batch). Train
    # "image_encoder" and "heads.dense_logits" in it; a whole-slab stage after it trains the
    # tokens, the fusion and the heads. A multiple of the dense grid's cell (8 px on the demo slab).
    image_crop: int = 0
    crop_slabs: int = 4
    crop_lesion_share: float = 0.5


@dataclass
class EvalConfig:
    every: int = 50  # steps between validations (and at the end of each stage); 0 = stage ends only
    max_studies: int = 64  # val studies for loss and finding F1
    bleu_studies: int = 8  # val studies given a greedy report for BLEU-4 (0 = skip)
    max_new_tokens: int = 256
    calibration_studies: int = 512  # val studies for the final temperature fit


@dataclass
class TrainConfig:
    preset: str = "tiny"
    seed: int = 0
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: dict = field(default_factory=dict)  # overrides of ModelConfig.preset(preset).to_dict()
    save_every: int = 100  # steps between checkpoints (and at the end of each stage)
    keep_checkpoints: int = 2  # newest step_N folders kept (0 = all)
    log_every: int = 1
    grad_checkpoint: bool = False  # decoder activation checkpointing
    amp: bool = True  # bf16 autocast on CUDA (never on CPU)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int = 0  # torch intra-op threads per process; 0 = torch default

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")


def _build(kind, d: Any, path: str):
    """Dataclass ``kind`` from a dict, checking keys and value types (path names the field)."""
    if dataclasses.is_dataclass(d):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{path or 'config'}: expected an object, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join((path + k) for k in unknown)}; "
                          f"known under {path or 'the top level'}: {', '.join(sorted(fields))}")
    defaults = kind()
    kw = {}
    for name, value in d.items():
        kw[name] = _coerce(getattr(defaults, name), value, path + name)
    try:
        return kind(**kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def _coerce(default: Any, value: Any, path: str) -> Any:
    if path == "stages":
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError("stages: expected a non-empty list of stage objects")
        return tuple(_build(StageConfig, s, f"stages.{i}.") for i, s in enumerate(value))
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, path + ".")
    if path == "model":
        if not isinstance(value, dict):
            raise ConfigError("model: expected an object of ModelConfig overrides")
        return value
    if path.endswith("lr_scale"):
        try:
            pairs = tuple((str(p), float(f)) for p, f in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected [[parameter-name prefix, factor], ...]") from None
        if any(f <= 0 or not p for p, f in pairs):
            raise ConfigError(f"{path}: prefixes must be non-empty and factors > 0")
        return pairs
    if path == "data.history_curriculum":
        try:
            cur = tuple((float(a), int(b)) for a, b in value)
        except (TypeError, ValueError):
            raise ConfigError("data.history_curriculum: expected [[share_of_steps, max_tokens], ...]") from None
        if not cur or cur[0][0] != 0.0 or any(b < 1 for _, b in cur) or list(cur) != sorted(cur):
            raise ConfigError("data.history_curriculum must start at share 0.0, ascend, and have caps >= 1")
        return cur
    if value is None:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float) or (default is None and isinstance(value, (int, float)) and path.endswith("lr")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001). Values are JSON, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys in the config dict ``d`` (lists indexed by number, e.g. ``stages.0.steps``)."""
    d = json.loads(json.dumps(d))  # tuples -> lists, a private copy
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = d
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise ConfigError(f"override {text!r}: {'.'.join(keys[:i])} has {len(node)} entries")
                node = node[int(k)]
            else:
                if k not in node:
                    if keys[0] == "model":
                        node[k] = {}
                    else:
                        raise ConfigError(f"override {text!r}: unknown key {'.'.join(keys[: i + 1])}")
                node = node[k]
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {text!r}: index {last} out of range")
            node[int(last)] = value
        else:
            if keys[0] != "model" and last not in node:
                raise ConfigError(f"override {text!r}: unknown key {'.'.join(keys)}")
            node[last] = value
    return d


def _read_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as exc:  # json / yaml parse errors
        raise ConfigError(f"{p} could not be parsed ({exc})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p} must hold one object of training settings")
    d.pop("_comment", None)
    return d


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults < config file < ``preset`` < ``key=value`` overrides."""
    d = TrainConfig().to_dict()
    if config_file:
        d = _deep_update(d, _read_config_file(config_file))
    if preset:
        d["preset"] = preset
    d = apply_overrides(d, overrides)
    cfg = TrainConfig.from_dict(d)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if any(s.steps < 0 for s in cfg.stages) or cfg.total_steps < 1:
        raise ConfigError("the stages need at least one step in total")
    if cfg.data.history_crop not in ("facts", "tail"):
        raise ConfigError("data.history_crop must be 'facts' or 'tail'")
    if cfg.optim.accum_steps < 1 or cfg.data.batch_size < 1:
        raise ConfigError("optim.accum_steps and data.batch_size must be at least 1")
    model_config(cfg, vocab_size=64)  # validates the model overrides early
    return cfg


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model" else v
    return out


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset's ModelConfig with ``cfg.model`` overrides (unknown keys are an error)."""
    base = ModelConfig.preset(cfg.preset, vocab_size=vocab_size).to_dict()

    def merge(dst: dict, src: dict, path: str) -> None:
        for k, v in src.items():
            if k not in dst:
                raise ConfigError(f"model override {path}{k}: no such model setting; known: {', '.join(sorted(dst))}")
            if isinstance(dst[k], dict):
                if not isinstance(v, dict):
                    raise ConfigError(f"model override {path}{k}: expected an object")
                merge(dst[k], v, f"{path}{k}.")
            else:
                dst[k] = v

    merge(base, cfg.model, "model.")
    base["decoder"]["vocab_size"] = vocab_size
    if cfg.grad_checkpoint:
        base["decoder"]["grad_checkpoint"] = True
    try:
        mcfg = ModelConfig.from_dict(base)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"model overrides give an invalid model: {exc}") from None
    check_detector_evidence(mcfg)
    return mcfg


def check_detector_evidence(mcfg: ModelConfig) -> None:
    """``heads.detector_evidence`` may name only findings that a detector of data.detectors reads."""
    from data.detectors import DETECTOR_FINDINGS

    unknown = [f for f in mcfg.heads.detector_evidence if f not in DETECTOR_FINDINGS or f not in mcfg.heads.finding_names]
    if unknown:
        raise ConfigError(f"heads.detector_evidence names {unknown}; the detectors (data.detectors) read "
                          f"{', '.join(DETECTOR_FINDINGS)}: name some of those, or none")


# ============================================================================ schedule, RNG, dist


def check_crop_stages(cfg: TrainConfig, mcfg: ModelConfig) -> None:
    """An image-crop stage needs the dense loss and whole dense cells; it runs the backbone only."""
    for i, st in enumerate(cfg.stages):
        if not st.image_crop:
            continue
        where = f"stages.{i} ({st.name}): image_crop={st.image_crop}"
        if mcfg.heads.dense_loss_weight <= 0:
            raise ConfigError(f"{where} trains on the dense localisation loss: set model.heads.dense_loss_weight > 0")
        if st.lm or st.cache_encoders:
            raise ConfigError(f"{where} trains the image backbone alone: set lm=false and cache_encoders=false")
        cell = mcfg.image.image_size // dense_grid(mcfg)
        if st.image_crop % cell or not cell <= st.image_crop <= mcfg.image.image_size:
            raise ConfigError(f"{where} must be a multiple of the dense cell ({cell} px) between {cell} and the slab "
                              f"size {mcfg.image.image_size}")
        if st.crop_slabs < 1 or not 0.0 <= st.crop_lesion_share <= 1.0:
            raise ConfigError(f"{where}: crop_slabs must be >= 1 and crop_lesion_share in [0, 1]")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def history_cap(curriculum: Sequence[tuple[float, int]], done_share: float) -> int:
    cap = curriculum[0][1]
    for share, tokens in curriculum:
        if done_share >= share:
            cap = tokens
    return cap


def rng_state() -> dict:
    st = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but no CUDA GPU is available; use device=cpu")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, dev)


# ============================================================================ model pieces


class TrainStep(nn.Module):
    """The loss computation as one module, so that DDP wraps (and syncs) exactly what is trained.

    ``encoded`` carries precomputed (frozen) image and audio encoder tokens; then only history
    summary, fusion, heads and decoder run. That path mirrors ``ReportModel.encode``/``forward``
    after the encoders (see the report of issue 6 for the proposed ``ReportModel`` hook).
    """

    def __init__(self, model: ReportModel):
        super().__init__()
        self.model = model

    def forward(self, x: ModelInputs, lm: bool = True, encoded: tuple | None = None,
                crops: bool = False) -> dict[str, torch.Tensor]:
        m = self.model
        if crops:  # image-crop stage: the backbone and its dense heads only
            from multimodal.model import dense_loss

            _, maps = m.image_encoder.backbone_maps(x.slabs, x.slab_mask, m.cfg.heads.dense_stages)
            dense = dense_loss(maps, m.heads.dense_logits, x.dense_targets[x.slab_mask], m.cfg.heads.localisation_loss)
            return {"dense": dense, "loss": dense}
        if not lm:
            x = dataclasses.replace(x, ids=None, lm_labels=None)
        if encoded is None:
            return m(x).losses
        from multimodal.heads import heads_loss

        img, aud = encoded
        fused, mask, _ = m.fusion(img, aud, m.history_tokens(x))  # [B, F, D]
        heads = m.heads(fused, mask, img)
        losses = heads_loss(heads, x.labels, m.cfg.heads)
        total = m.cfg.heads_weight * losses["heads"]
        if lm and x.ids is not None:
            out = m.decoder(x.ids, *m.decoder_context(fused, mask, heads, x.labels), copy_mask_BT=x.copy_mask,
                            logits_from=lm_start(x))
            dl = decoder_losses(m.cfg, out, x, m.decoder.copy_canon())
            total = total + dl.pop("weighted")
            losses.update(dl)
        losses["loss"] = total
        return losses


def set_trainable(model: ReportModel, prefixes: Sequence[str], freeze: Sequence[str] = ()) -> list[nn.Parameter]:
    """requires_grad on parameters whose name starts with one of ``prefixes`` ("all" = every one)
    and with none of ``freeze``."""
    train_all = "all" in prefixes
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if p != "all" and not any(n.startswith(p) for n in names)]
    if unknown:
        tops = sorted({n.split(".")[0] for n in names})
        raise ConfigError(f"stage trains {unknown}, which match no parameter; top-level modules: {', '.join(tops)}")
    out = []
    for n, p in model.named_parameters():
        p.requires_grad_((train_all or any(n.startswith(q) for q in prefixes))
                         and not any(n.startswith(q) for q in freeze))
        if p.requires_grad:
            out.append(p)
    return out


def set_modes(model: ReportModel) -> None:
    """Train mode, except encoders with no trainable parameter (BatchNorm statistics frozen)."""
    model.train()
    for enc in (model.image_encoder, model.audio_encoder):
        if not any(p.requires_grad for p in enc.parameters()):
            enc.eval()


def make_optimizer(params: Sequence[nn.Parameter], model: nn.Module, o: OptimConfig, lr: float,
                   lr_scale: Sequence[tuple[str, float]] = ()) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, gains or 1-D tables);
    ``lr_scale`` multiplies the lr of parameters whose name starts with a prefix (first match)."""
    wanted = {id(p) for p in params}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if id(p) not in wanted:
            continue
        scale = next((f for pre, f in lr_scale if name.startswith(pre)), 1.0)
        groups.setdefault((scale, p.ndim >= 2), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, not k[1], k[0]))  # the plain lr's matrices first (logged lr)
    return torch.optim.AdamW(
        [{"params": groups[k], "weight_decay": o.weight_decay if k[1] else 0.0, "lr": lr * k[0]} for k in order],
        lr=lr, betas=tuple(o.betas), eps=o.eps)


# ============================================================================ tokenizer


def build_tokenizer(cfg: TrainConfig, entries, run_dir: Path, d: Dist):
    """The tokenizer of the run: given, already in the run dir (resume), or trained on rank 0."""
    from data.report_format import format_report
    from data.tokenizer import ReportTokenizer

    tok_dir = run_dir / "tokenizer"
    if cfg.data.tokenizer:
        return ReportTokenizer.load(cfg.data.tokenizer)
    if d.main and not (tok_dir / "tokenizer.json").is_file():
        def texts():
            for e in entries:
                if e.split != "train":
                    continue
                yield e.report or format_report(e.sections)
                h = history_text(e)
                if h:
                    yield h[: cfg.data.tokenizer_history_chars]

        t0 = time.perf_counter()
        ReportTokenizer.train(texts(), vocab_size=cfg.data.vocab_size).save(tok_dir)
        log.info("trained tokenizer on the train split in %.1f s", time.perf_counter() - t0)
    d.barrier()
    return ReportTokenizer.load(tok_dir)


# ============================================================================ validation


@torch.no_grad()
def validate(model: ReportModel, ds: ReportDataset, cfg: TrainConfig, lm: bool, device: torch.device,
             bleu: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """Val loss, finding micro-F1 from the heads, and BLEU-4 of greedy reports on a subset.

    Returns (metrics, presence logits [N, K], presence labels [N, K])."""
    was = model.training
    model.eval()
    bs = cfg.data.batch_size
    n = min(len(ds), cfg.eval.max_studies)
    losses: dict[str, float] = {}
    logits, labels = [], []
    try:
        for a in range(0, n, bs):
            x = collate_examples([ds[i] for i in range(a, min(n, a + bs))], ds.tok.pad_id).to(device)
            if not lm:
                x = dataclasses.replace(x, ids=None, lm_labels=None)
            out = model(x)
            for k, v in out.losses.items():
                losses[k] = losses.get(k, 0.0) + float(v) * x.batch_size
            logits.append(out.heads.presence_logits_BK.float().cpu())
            labels.append(x.labels.present_BK.cpu())
        lg = torch.cat(logits).numpy() if logits else np.zeros((0, len(model.finding_names)))
        lb = torch.cat(labels).numpy() if labels else np.zeros((0, len(model.finding_names)))
        metrics = {f"val_{k}": v / max(n, 1) for k, v in losses.items()}
        probs = 1 / (1 + np.exp(-lg / float(model.heads.temperature)))
        metrics["val_finding_micro_f1"] = micro_f1(probs >= 0.5, lb)
        if bleu and lm and cfg.eval.bleu_studies > 0:
            metrics.update(bleu_on_subset(model, ds, cfg, device))
    finally:
        model.train(was)
    return metrics, lg, lb


def fit_operating_points(model: ReportModel, probs: np.ndarray, labels: np.ndarray) -> dict:
    """Choose each finding's decision threshold on held-out (validation) probabilities and labels
    (``multimodal.heads.fit_decision_thresholds``, for the micro F-beta of the model's
    ``heads.operating_beta``) and store them in the model's config, which ``save_pretrained``
    writes; returns what to log (thresholds, val micro-F1 at 0.5 and at them)."""
    from multimodal.heads import fit_decision_thresholds

    beta = model.cfg.heads.operating_beta
    thr = fit_decision_thresholds(probs, labels, beta=beta)
    model.cfg.heads.decision_thresholds = thr
    names = model.finding_names
    moved = {n: t for n, t in zip(names, thr) if t != 0.5}
    log.info("finding operating points (micro F-beta, beta %g) chosen on %d val studies: %s", beta, probs.shape[0],
             ", ".join(f"{n} {t:.2f}" for n, t in moved.items()) or "all 0.5")
    return {"decision_thresholds": dict(zip(names, thr)), "operating_beta": beta,
            "val_finding_micro_f1_at_0.5": micro_f1(probs >= 0.5, labels),
            "val_finding_micro_f1_at_thresholds": micro_f1(probs >= np.asarray(thr), labels)}


def micro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    known = labels >= 0
    p, y = pred[known].astype(bool), labels[known].astype(bool)
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties averaged); None without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return None
    r = rankdata(np.asarray(scores, dtype=np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def per_finding_metrics(probs: np.ndarray, labels: np.ndarray, names: Sequence[str],
                        threshold: float | Sequence[float] = 0.5) -> dict[str, dict]:
    """Per finding: support (known positives), precision, recall and F1 at ``threshold`` (one for
    all, or one per finding), and AUC. probs, labels: [N, K]; labels 1/0, negative = unknown (ignored)."""
    out = {}
    thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(names),))
    for k, name in enumerate(names):
        known = labels[:, k] >= 0
        y, p = labels[known, k].astype(bool), probs[known, k]
        pred = p >= thr[k]
        tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
        out[name] = {"support": int(y.sum()), "predicted": int(pred.sum()), "threshold": float(thr[k]),
                     "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
                     "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None, "auc": roc_auc(p, y)}
    return out


def generate_reports(model: ReportModel, ds: ReportDataset, indices: Sequence[int], device: torch.device,
                     max_new_tokens: int = 256, batch_size: int = 4) -> dict[str, str]:
    """Greedy reports (formatted text) for dataset items, history cropped as the dataset says."""
    from core.generate import GenerationConfig
    from data.report_format import format_report
    from multimodal.model import collate

    tok = ds.tok
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, section_ids=list(tok.section_ids),
                           pad_id=tok.pad_id)
    out = {}
    for a in range(0, len(indices), batch_size):
        idx = list(indices[a: a + batch_size])
        studies = [ds.study_inputs(ds.entries[i]) for i in idx]
        prefixes = [[tok.bos_id, *(s.history_ids or []), tok.report_id] for s in studies]
        preds = model.generate_report(collate(studies).to(device), prefixes, gen, evidence=False)
        for i, p in zip(idx, preds):
            out[ds.entries[i].id] = format_report(tok.decode_report(p.token_ids))
    return out


def bleu_on_subset(model: ReportModel, ds: ReportDataset, cfg: TrainConfig, device: torch.device) -> dict:
    from app.evaluate import evaluate_reports

    idx = list(range(min(len(ds), cfg.eval.bleu_studies)))
    hyp = generate_reports(model, ds, idx, device, cfg.eval.max_new_tokens, cfg.data.batch_size)
    ref = {ds.entries[i].id: ds.entries[i].report for i in idx}
    ev = evaluate_reports(hyp, ref, bootstrap=0, meteor=False)
    return {"val_bleu4": ev.scores["bleu4"], "val_text_finding_micro_f1": ev.scores.get("finding_micro_f1")}


# ============================================================================ metrics + plots


def write_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_learning_curve(run_dir: Path) -> Path | None:
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val_loss" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("loss", "-"), ("lm", ":"), ("heads", "--")):
        pts = [(r["step"], r[key]) for r in tr if r.get(key) is not None]
        if pts:
            a1.plot(*zip(*pts), style, label=f"train {key}", lw=1)
    if va:
        a1.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="val loss")
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    for key in ("val_finding_micro_f1", "val_bleu4"):
        pts = [(r["step"], r[key]) for r in va if r.get(key) is not None]
        if pts:
            a2.plot(*zip(*pts), "o-", label=key.removeprefix("val_"))
    a2.set_xlabel("step")
    a2.set_ylim(0, 1)
    a2.legend(fontsize=8)
    a2.set_title("validation")
    fig.tight_layout()
    out = run_dir / "learning_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ============================================================================ checkpoints


def latest_checkpoint(run_dir: Path) -> Path | None:
    ck = run_dir / "checkpoints"
    steps = sorted((int(p.name[5:]), p) for p in ck.glob("step_*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()) \
        if ck.is_dir() else []
    return steps[-1][1] if steps else None


def save_checkpoint(run_dir: Path, model: ReportModel, tok, state: dict, keep: int) -> Path:
    """``checkpoints/step_N`` written under a temporary name, then renamed (a killed run never
    leaves a half checkpoint that resume would pick)."""
    ck = run_dir / "checkpoints"
    final = ck / f"step_{state['step']}"
    tmp = ck / f".tmp_step_{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tok)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep > 0:
        old = sorted((int(p.name[5:]), p) for p in ck.glob("step_*") if p.name[5:].isdigit())
        for _, p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def keep_stage_end(run_dir: Path, checkpoint: Path, name: str) -> Path:
    """Copy a stage's last checkpoint to ``stages/<name>`` (atomically; not rotated)."""
    dst = run_dir / "stages" / name
    tmp = dst.with_name(f".tmp_{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def load_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


# ============================================================================ the loop


def _stage_at(cfg: TrainConfig, step: int) -> tuple[int, int]:
    """(stage index, first global step of that stage) for global optimizer step ``step``."""
    start = 0
    for i, s in enumerate(cfg.stages):
        if step < start + s.steps:
            return i, start
        start += s.steps
    return len(cfg.stages) - 1, start - cfg.stages[-1].steps


class _Batches:
    """Micro-batches of this rank in a fixed order: DistributedSampler(seed, epoch) then chunks.
    The position (epoch, index in epoch) is part of the checkpoint."""

    def __init__(self, ds: ReportDataset, batch_size: int, d: Dist, seed: int, epoch: int = 0, pos: int = 0):
        from torch.utils.data import DistributedSampler

        self.ds, self.bs = ds, batch_size
        self.sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.pos = epoch, pos
        if len(self.sampler) < batch_size:
            raise TrainDataError(f"the train split has {len(ds)} studies: fewer than batch_size x processes "
                                 f"({batch_size} x {d.world}); lower data.batch_size")
        self._order: list[list[int]] | None = None

    def _batches(self) -> list[list[int]]:
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            idx = list(self.sampler)
            self._order = [idx[i: i + self.bs] for i in range(0, len(idx) - self.bs + 1, self.bs)]
        return self._order

    def next(self) -> list[int]:
        if self.pos >= len(self._batches()):
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        b = self._batches()[self.pos]
        self.pos += 1
        self.ds.epoch = self.epoch
        return b



def use_amp_on(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast for the training forward: on CUDA when ``cfg.amp`` (the default); never on
    the CPU, where fp32 is both faster and exact on machines without bf16 units."""
    return bool(cfg.amp) and device.type == "cuda"

def train(manifest: str | Path, run_dir: str | Path, cfg: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, stop_at: int | None = None, start_from: str | Path | None = None) -> Path | None:
    """Train on ``manifest`` into ``run_dir``; returns ``run_dir/final``. See the module docstring.

    ``stop_at``: stop after that global step with a checkpoint (and return None); continue later
    with ``resume=True``. The result is identical to an uninterrupted run.
    ``start_from``: a checkpoint of another run (``checkpoints/step_N`` or its kept stage end
    ``stages/<name>``) whose recipe equals this one up to step N: this run starts there, with its
    weights, tokenizer, data position, RNG and seconds of training, and runs only the rest (e.g. a
    changed decoder stage without redoing the encoder stage). The weights load into this recipe's
    model: tensors the checkpoint lacks stay at their initialisation and are logged."""
    run_dir = Path(run_dir)
    if start_from is not None and resume:
        raise ConfigError("give --resume or --start-from, not both")
    if resume:
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"--resume: {run_dir} has no {CONFIG_FILE}; start a new run without --resume")
        cfg_saved = TrainConfig.from_dict(json.loads(saved.read_text())["train"])
        if cfg is not None and cfg.to_dict() != cfg_saved.to_dict():
            log.warning("--resume uses the run's saved config; the settings given now are ignored")
        cfg = cfg_saved
    cfg = cfg or TrainConfig()
    d = setup_distributed(cfg.device)
    try:
        return _train(Path(manifest), run_dir, cfg, resume, d, progress, stop_at,
                      None if start_from is None else Path(start_from))
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(manifest: Path, run_dir: Path, cfg: TrainConfig, resume: bool, d: Dist, progress: bool,
           stop_at: int | None = None, start_from: Path | None = None) -> Path | None:
    from tqdm.auto import tqdm

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    entries = load_manifest_for_training(manifest)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose a new --out")
    d.barrier()
    if start_from is not None:
        if not (start_from / STATE_FILE).is_file():
            raise ConfigError(f"--start-from {start_from}: not a training checkpoint (no {STATE_FILE}); give a run's "
                              "checkpoints/step_N or stages/<name> folder")
        if (start_from / "tokenizer").is_dir():  # the checkpoint's ids must mean the same tokens
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(start_from / "tokenizer")))
    tok = build_tokenizer(cfg, entries, run_dir, d)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    mcfg = model_config(cfg, tok.vocab_size)
    check_crop_stages(cfg, mcfg)
    filled = fill_call_feature_masks(mcfg.heads, [e for e in entries if e.split == "train"])
    if filled:
        log.info("finding-context features from the training labels: %s", filled)
    if ckpt is not None:
        model = ReportModel.from_pretrained(ckpt)
        model.cfg.decoder.grad_checkpoint = mcfg.decoder.grad_checkpoint
    else:
        model = ReportModel(mcfg)
        if start_from is not None:
            model.load_weights(start_from)
    model.set_tokenizer(tok)
    model.to(d.device)
    if d.main:
        saved_cfg = {"train": cfg.to_dict(), "model": model.cfg.to_dict(), "manifest": str(manifest), "world_size": d.world}
        if start_from is not None:
            saved_cfg["start_from"] = str(start_from)
        elif resume and (run_dir / CONFIG_FILE).is_file():  # keep where a resumed run first started
            prev = json.loads((run_dir / CONFIG_FILE).read_text()).get("start_from")
            if prev:
                saved_cfg["start_from"] = prev
        (run_dir / CONFIG_FILE).write_text(json.dumps(saved_cfg, indent=2))

    pre = PreprocessConfig.from_model(model.cfg, audio=cfg.data.audio)
    cache = StudyCache(cfg.data.cache_dir or run_dir / "cache", pre)
    mk = lambda split: ReportDataset(  # noqa: E731
        [e for e in entries if e.split == split], tok, model.cfg, cache, seed=cfg.seed,
        max_report_tokens=cfg.data.max_report_tokens, crop=cfg.data.history_crop,
        max_history_tokens=cfg.data.history_curriculum[0][1])
    train_ds, val_ds = mk("train"), mk("val")
    val_ds.crop = "tail"  # validation never sees the planted-fact positions
    if not len(val_ds):
        log.warning("the manifest has no 'val' split: no validation and no temperature calibration")

    state = load_state(ckpt) if ckpt is not None else None
    if start_from is not None:
        state = load_state(start_from)
        if state["step"] >= cfg.total_steps:
            raise ConfigError(f"--start-from {start_from} is at step {state['step']}, and this recipe has "
                              f"{cfg.total_steps} steps: nothing left to train")
        log.info("starting at step %d from %s (stages before it are taken as trained)", state["step"], start_from)
        if d.main:  # its learning curve up to there
            rows = [r for r in read_metrics(start_from.parent.parent) if r.get("step", 0) <= state["step"]]
            (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if state is not None and state.get("world_size", 1) != d.world:
        raise ConfigError(f"{ckpt.name} was written by {state.get('world_size', 1)} processes and this run has {d.world}: "
                          "resume with the same --nproc_per_node (the data order depends on it)")
    step = state["step"] if state else 0
    batches = _Batches(train_ds, cfg.data.batch_size, d, cfg.seed, *(state["data"] if state else (0, 0)))
    if state is None and d.main and (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()
    if state is not None and d.main:  # drop rows logged after the checkpoint (they will be redone)
        rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    use_amp = use_amp_on(cfg, d.device)
    total = cfg.total_steps
    bar = tqdm(total=total, initial=step, disable=not (progress and d.main), desc="train", dynamic_ncols=True)
    enc_cache: dict[str, tuple] = {}
    stage_idx = -1
    opt = sched = wrapped = None
    t_last = time.perf_counter()
    train_s = state.get("train_seconds", 0.0) if state else 0.0  # step time only (no validation / saving)
    while step < total:
        i, start = _stage_at(cfg, step)
        stage = cfg.stages[i]
        if i != stage_idx:  # enter a stage: trainable set, optimizer, scheduler, DDP wrapper
            stage_idx = i
            params = set_trainable(model, stage.train, stage.freeze)
            lr = stage.lr if stage.lr is not None else cfg.optim.lr
            opt = make_optimizer(params, model, cfg.optim, lr, stage.lr_scale)
            warm, n = cfg.optim.warmup_steps, stage.steps
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s, w=warm, n=n: lr_factor(s, w, n, cfg.optim.min_lr_ratio))
            if state is not None:  # first stage entered after --resume
                if state["stage"] == i:  # else the checkpoint closed the previous stage: fresh optimizer
                    opt.load_state_dict(state["optimizer"])
                    sched.load_state_dict(state["scheduler"])
                set_rng_state(state["rng"])
                state = None
            step_mod = TrainStep(model)
            wrapped = step_mod
            if d.enabled:
                wrapped = nn.parallel.DistributedDataParallel(
                    step_mod, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                    find_unused_parameters=True)  # MoE experts without tokens, stage-frozen parts
            enc_cache.clear()
            log.info("stage %d (%s): %d steps, training %s", i, stage.name, stage.steps, ", ".join(stage.train))
        set_modes(model)
        cap = history_cap(cfg.data.history_curriculum, (step - start) / max(1, stage.steps))
        train_ds.max_history_tokens = val_ds.max_history_tokens = cap

        t_step = time.perf_counter()
        sums: dict[str, float] = {}
        for micro in range(cfg.optim.accum_steps):
            idx = batches.next()
            x = collate_examples([train_ds[j] for j in idx], tok.pad_id)
            if stage.image_crop:  # windows drawn per step: the same after a resume
                x = crop_slab_batch(x, stage.image_crop, stage.crop_slabs,
                                    np.random.default_rng([cfg.seed, step, micro, d.rank]), stage.crop_lesion_share)
            x = x.to(d.device)
            encoded = _cached_encoder_tokens(model, x, [train_ds.entries[j].id for j in idx], enc_cache) \
                if stage.cache_encoders else None
            sync = contextlib.nullcontext() if (not d.enabled or micro == cfg.optim.accum_steps - 1) else wrapped.no_sync()
            with sync:
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    losses = wrapped(x, stage.lm, encoded, bool(stage.image_crop))
                (losses["loss"] / cfg.optim.accum_steps).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.optim.accum_steps
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        train_s += time.perf_counter() - t_step

        if d.enabled:  # mean of the ranks' losses, for the log
            t = torch.tensor([sums[k] for k in sorted(sums)], device=d.device)
            dist.all_reduce(t)
            sums = dict(zip(sorted(sums), (t / d.world).tolist()))
        if d.main:
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", stage=stage.name, hist=cap)
            if cfg.log_every and (step % cfg.log_every == 0 or step == total):
                now = time.perf_counter()
                write_metrics(run_dir, {"step": step, "stage": stage.name, "epoch": batches.epoch,
                                        "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm), "history_cap": cap,
                                        "sec_per_step": (now - t_last) / (cfg.log_every or 1), "train_s": round(train_s, 2), **sums})
                t_last = now
        stage_end = step == start + stage.steps
        if (cfg.eval.every and step % cfg.eval.every == 0) or stage_end:
            if d.main and len(val_ds):
                m, _, _ = validate(model, val_ds, cfg, stage.lm, d.device)
                write_metrics(run_dir, {"step": step, "stage": stage.name, "history_cap": cap, **m})
                plot_learning_curve(run_dir)
                log.info("step %d validation: %s", step, {k: round(v, 4) for k, v in m.items() if v is not None})
            d.barrier()
            set_modes(model)
        stop = stop_at is not None and step >= stop_at and step < total
        if (cfg.save_every and step % cfg.save_every == 0) or stage_end or stop:
            if d.main:
                saved = save_checkpoint(run_dir, model, tok, {
                    "step": step, "stage": i,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                    "data": [batches.epoch, batches.pos], "world_size": d.world, "train_seconds": train_s,
                }, cfg.keep_checkpoints)
                if stage_end:  # kept out of the rotation: a later recipe may --start-from it
                    keep_stage_end(run_dir, saved, stage.name)
            d.barrier()
        if stop:
            bar.close()
            log.info("stopped at step %d as asked; continue with --resume", step)
            return None
    bar.close()
    return _finish(model, tok, val_ds, cfg, run_dir, d)


@torch.no_grad()
def _cached_encoder_tokens(model: ReportModel, x: ModelInputs, ids: list[str], cache: dict) -> tuple:
    """Frozen image/audio encoder tokens, computed once per study (eval mode), re-padded per batch."""
    x = model.visible_inputs(x)
    missing = [b for b, i in enumerate(ids) if i not in cache]
    if missing:
        sub = ModelInputs(**{k: (v[missing] if torch.is_tensor(v) else v) for k, v in x.__dict__.items()
                             if k in ("slabs", "slab_mask", "z_mm", "z_index_range", "mel", "audio_present", "audio_lengths")})
        img_t, img_m = model.image_encoder(sub.slabs, sub.slab_mask, sub.z_mm)  # [b, Ni, D]
        if sub.mel is not None and bool(sub.audio_present.any()):
            aud_t, aud_m = model.audio_encoder(sub.mel, sub.audio_present, sub.audio_lengths)  # [b, Na, D]
        else:
            aud_t = torch.zeros(len(missing), 1, model.cfg.audio.dim, device=x.slabs.device)
            aud_m = torch.zeros(len(missing), 1, dtype=torch.bool, device=x.slabs.device)
        for r, b in enumerate(missing):
            ni, na = int(img_m[r].sum()), int(aud_m[r].sum())
            # keep the valid prefix only; tokens are laid out slab by slab, valid slabs first
            cache[ids[b]] = (img_t[r, : max(ni, 1)].clone(), img_m[r, : max(ni, 1)].clone(),
                             aud_t[r, : max(na, 1)].clone(), aud_m[r, : max(na, 1)].clone())

    def pad(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(t.shape[0] for t, _ in parts)
        tok = torch.zeros(len(parts), n, parts[0][0].shape[-1], device=x.slabs.device)  # [B, N, D]
        msk = torch.zeros(len(parts), n, dtype=torch.bool, device=x.slabs.device)
        for b, (t, m) in enumerate(parts):
            tok[b, : t.shape[0]], msk[b, : m.shape[0]] = t, m
        return tok, msk

    rows = [cache[i] for i in ids]
    return pad([(r[0], r[1]) for r in rows]), pad([(r[2], r[3]) for r in rows])


@torch.no_grad()
def ranks_identical(model: nn.Module, d: Dist) -> bool:
    """Whether every rank holds the same parameters (float64 checksums, all-gathered).

    Buffers are left out: BatchNorm running statistics are updated by each rank's own last
    forward (DDP broadcasts rank 0's at the start of every forward, and rank 0 saves)."""
    parts = []
    for t in model.parameters():
        v = t.detach().double().flatten()
        w = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
        parts.append(torch.stack([v.sum(), (v * v).sum(), (v * w).sum()]))
    local = torch.stack(parts)  # [P, 3]
    gathered = [torch.zeros_like(local) for _ in range(d.world)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def calibrate_heads(model: ReportModel, val_ds: ReportDataset, cfg: TrainConfig, device) -> dict:
    """Fit the finding heads' temperature, then the fusion with the detector's evidence
    (``heads.detector_evidence``; ``fit_detector_fusion``), then each finding's operating point on
    held-out studies (at most ``cfg.eval.calibration_studies``; heads only, the decoder does not
    change the fit), in the model; returns the metrics to log."""
    from multimodal.heads import expected_calibration_error, fit_temperature

    cfg_cal = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_studies=cfg.eval.calibration_studies))
    model.heads.temperature.fill_(1.0)
    m, lg, lb = validate(model, val_ds, cfg_cal, lm=False, device=device, bleu=False)
    temp = fit_temperature(lg, lb)
    model.heads.temperature.fill_(temp)
    p_before = 1 / (1 + np.exp(-lg))
    z_after = lg / temp
    out = dict(m)
    if model.cfg.heads.detector_evidence:
        z_after, fusion_log = fit_detector_fusion(model, val_ds, z_after, lb)
        out.update(fusion_log)
    p_after = 1 / (1 + np.exp(-z_after))
    out.update(temperature=temp, val_ece_before=expected_calibration_error(p_before, lb),
               val_ece=expected_calibration_error(p_after, lb), calibration_studies=int(lg.shape[0]))
    out.update(fit_operating_points(model, p_after, lb))
    log.info("finding-head temperature %.3f (val ECE %.4f -> %.4f, %d studies)", temp, out["val_ece_before"],
             out["val_ece"], lg.shape[0])
    return out


def fit_detector_fusion(model: ReportModel, val_ds: ReportDataset, z_NK: np.ndarray,
                        labels_NK: np.ndarray) -> tuple[np.ndarray, dict]:
    """Fit, for each finding in ``heads.detector_evidence``, the logistic fusion of its calibrated
    logit (``z_NK``: logits / T of the first N studies of ``val_ds``) with its detector's evidence
    on the same studies (data.detectors, read through a detecting study cache beside
    ``val_ds``'s), store it in ``heads.evidence_fusion`` and return (the fused logits [N, K], what
    to log)."""
    from app.train_data import study_evidence
    from multimodal.heads import fit_evidence_fusion

    check_detector_evidence(model.cfg)
    names = list(model.finding_names)
    n = z_NK.shape[0]
    root = val_ds.cache.dir.parent if val_ds.cache.dir is not None else None
    cache = StudyCache(root, dataclasses.replace(val_ds.cache.pre, run_detectors=True))
    evidence = [study_evidence(cache.arrays(e)) or {} for e in val_ds.entries[:n]]
    rows, z_out, log_out = [], z_NK.copy(), {}
    for name in model.cfg.heads.detector_evidence:
        k = names.index(name)
        ev_N = np.asarray([ev.get(name, np.nan) for ev in evidence])
        w_z, w_e, b = fit_evidence_fusion(z_NK[:, k], ev_N, labels_NK[:, k])
        rows.append((name, round(w_z, 6), round(w_e, 6), round(b, 6)))
        has = ~np.isnan(ev_N)
        z_out[has, k] = w_z * z_NK[has, k] + w_e * ev_N[has] + b
        auc_heads, auc_fused = roc_auc(z_NK[:, k], labels_NK[:, k] > 0), roc_auc(z_out[:, k], labels_NK[:, k] > 0)
        log_out[f"val_{name}_auc_heads"], log_out[f"val_{name}_auc_fused"] = auc_heads, auc_fused
        log.info("%s: fused with the detector's evidence on %d val studies (w_logit %.3f, w_evidence %.3f, bias %.3f): "
                 "val AUC %.3f -> %.3f", name, int(has.sum()), w_z, w_e, b, auc_heads or float("nan"),
                 auc_fused or float("nan"))
    model.cfg.heads.evidence_fusion = tuple(rows)
    log_out["evidence_fusion"] = [list(r) for r in rows]
    return z_out, log_out


def _finish(model: ReportModel, tok, val_ds: ReportDataset, cfg: TrainConfig, run_dir: Path, d: Dist) -> Path:
    """Calibrate the finding heads on the val split (calibrate_heads) and save RUN_DIR/final (rank 0)."""
    final = run_dir / "final"
    identical = ranks_identical(model, d) if d.enabled else None
    if d.main:
        out: dict[str, Any] = {"step": cfg.total_steps, "world_size": d.world}
        if identical is not None:
            out["ddp_ranks_identical"] = identical
            if not identical:
                log.error("DDP ranks ended with different weights: training was not synchronised")
        if len(val_ds):
            out.update(calibrate_heads(model, val_ds, cfg, d.device))
        tmp = run_dir / ".tmp_final"
        shutil.rmtree(tmp, ignore_errors=True)
        model.eval().save_pretrained(tmp, tok)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (run_dir / "final_metrics.json").write_text(json.dumps(out, indent=2))
        plot_learning_curve(run_dir)
    d.barrier()
    return final


# ============================================================================ held-out evaluation


def evaluate_split(model: ReportModel, manifest: str | Path, split: str = "test", max_studies: int = 0,
                   max_history_tokens: int = 100_000, batch_size: int = 4, max_new_tokens: int = 400,
                   predictions: str | Path | None = None, progress: bool = True,
                   no_repeat_ngram_size: int = 0, strategy: str = "greedy", num_beams: int = 4,
                   length_penalty: float = 1.0, nonempty_items: bool = False, complete_sections: bool = True,
                   consistent_with_calls: bool = False, consistent_with_acquisition: bool = True,
                   consistent_measurements: bool = True, report_outline: bool = True,
                   technique_states_contrast: bool = False, calls_covered: bool = False,
                   calls_guidance: float = 0.0, num_samples: int = 8, temperature: float = 1.0, top_p: float = 0.9,
                   calls_agreement: float = 0.0, record_agreement: float = 0.0, mbr_from: str = "report",
                   record_covered: bool = False, cache_dir: str | Path | None = None,
                   acquisition_agreement: float = 0.0) -> dict:
    """Generate reports (greedy unless ``strategy``) for a split and score them (no manifest facts
    are used to crop).

    Returns BLEU-1..4 / ROUGE-L / CIDEr of Findings + Impression (``app.evaluate``), the heads'
    finding micro-/macro-F1 at p >= 0.5 with ``below_resolution`` findings reported apart, the
    expected calibration error of the (calibrated) finding probabilities, text-finding
    consistency (labeller reading of the generated text vs the heads' decisions), and the share
    of planted history facts whose expected phrase appears in the report. ``cache_dir``: a
    decoded-study cache to read and fill (default none: every study decoded and measured anew).
    ``strategy="mbr"``: ``num_samples`` reports sampled at ``temperature`` / ``top_p`` per study, the
    consensus kept, with ``calls_agreement`` weighing the labeller's agreement with the calls
    (``data.report_consistency.CallsAgreement``) and ``record_agreement`` the record's facts carried
    (``RecordAgreement``; 0 = off) and ``acquisition_agreement`` the Technique stating the scan's contrast
    (``AcquisitionAgreement``; 0 = off), the samples compared on the whole report or from the Findings on
    (``mbr_from`` "report" / "findings"), as the product runs. ``record_covered``: the record's known
    malignancies and lung resections kept in the report (``data.report_coverage.RecordVeto``)."""
    from tqdm.auto import tqdm

    from app.evaluate import evaluate_reports
    from app.train_data import below_resolution, finding_targets
    from data.datasets import read_manifest
    from data.labeler import label_report, presence
    from multimodal.heads import expected_calibration_error

    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer; load it with ReportModel.from_pretrained from a saved folder")
    if mbr_from not in ("report", "findings"):
        raise ConfigError(f"mbr_from must be 'report' or 'findings', not {mbr_from!r}")
    entries = [e for e in read_manifest(manifest) if e.split == split]
    if max_studies:
        entries = entries[:max_studies]
    if not entries:
        raise TrainDataError(f"{manifest} has no '{split}' studies to evaluate")
    pre = PreprocessConfig.from_model(model.cfg)
    if model.cfg.runs_detectors:  # the measured size in the call, the detectors' evidence: as the product does
        pre = dataclasses.replace(pre, run_detectors=True)
    ds = ReportDataset(entries, model.tokenizer, model.cfg, StudyCache(cache_dir, pre), max_history_tokens=max_history_tokens,
                       crop="tail")
    names = list(model.finding_names)
    device = next(model.parameters()).device
    hyp: dict[str, str] = {}
    found: dict[str, dict] = {}  # predicted findings per study (the template baseline reads them)
    probs, labels, below = [], [], []
    bar = tqdm(total=len(entries), desc=f"evaluate {split}", disable=not progress)
    from core.generate import GenerationConfig
    from data.report_format import SECTION_KEYS, format_report
    from multimodal.model import collate

    tok = model.tokenizer
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, section_ids=list(tok.section_ids),
                           pad_id=tok.pad_id, no_repeat_ngram_size=no_repeat_ngram_size, strategy=strategy,
                           num_beams=num_beams, length_penalty=length_penalty, num_samples=num_samples,
                           temperature=temperature, top_p=top_p, seed=0,
                           mbr_from_id=tok.section_ids[SECTION_KEYS.index("findings")] if mbr_from == "findings" else None,
                           **tok.report_constraints(nonempty_items, complete_sections))

    def _hist_size(e) -> int:  # batch studies of similar record length: less padding in the prefill
        if e.history:
            p = e.path(e.history)
            return p.stat().st_size if p.is_file() else 0
        return len(e.history_text or "")

    entries = sorted(entries, key=_hist_size)
    vetoes_for = None  # one findings-table veto per study, from its calls (consistent_with_calls)
    from data.finding_prompt import contrast_of_line, measured_size
    from core.generate import any_veto
    from data.history_digest import record_facts
    from app.decoding import mbr_rerank
    from data.report_consistency import CallsVeto, MeasurementVeto, acquisition_veto
    from data.report_coverage import CoverageVeto, RecordVeto
    from data.report_outline import OutlineVeto

    if consistent_with_calls or calls_covered:  # from the calls, as the product runs
        vetoes_for = lambda names: any_veto([CallsVeto(tok, names) if consistent_with_calls else None,  # noqa: E731
                                             CoverageVeto(tok, names) if calls_covered else None])

    def _record_text(e) -> str | None:  # the patient record RecordAgreement reads its facts from
        if e.history:
            p = e.path(e.history)
            return p.read_text(encoding="utf-8", errors="replace") if p.is_file() else None
        return e.history_text
    thr_k = dict(zip(names, model.cfg.heads.thresholds()))
    t0 = time.perf_counter()
    for a in range(0, len(entries), batch_size):
        chunk = entries[a: a + batch_size]
        studies = [ds.study_inputs(e) for e in chunk]
        prefixes = [[tok.bos_id, *(s.history_ids or []), tok.report_id] for s in studies]
        # the Technique kept to the acquisition line the decoder reads (as the product runs)
        row_vetoes = ([acquisition_veto(tok, s.acquisition, require=technique_states_contrast) for s in studies]
                      if consistent_with_acquisition else None)
        # and a nodule's stated change to its own numbers, the record's prior size and the measured one
        by_calls = None
        if consistent_measurements:
            by_calls = lambda b, row, st=studies: MeasurementVeto(tok, st[b].prior_nodule_mm, measured_size(row))  # noqa: E731
        if report_outline:  # and the report to the product's outline (as the product runs)
            row_vetoes = [any_veto([v, OutlineVeto(tok)]) for v in (row_vetoes or [None] * len(studies))]
        if record_covered:  # and the record's known malignancies and resections in the report
            row_vetoes = [any_veto([v, RecordVeto(tok, record_facts(_record_text(e)))])
                          for v, e in zip(row_vetoes or [None] * len(studies), chunk)]
        rerank_for = None  # MBR: the sample that says what the table says and carries the record's facts (as the product runs)
        if strategy == "mbr" and (calls_agreement > 0 or record_agreement > 0 or acquisition_agreement > 0):
            facts = [record_facts(_record_text(e)) if record_agreement > 0 else () for e in chunk]
            contrast = [contrast_of_line(s.acquisition) for s in studies]
            rerank_for = lambda b, names, f=facts, c=contrast: mbr_rerank(  # noqa: E731
                tok, names, f[b], calls_agreement, record_agreement, c[b], acquisition_agreement)
        preds = model.generate_report(collate(studies).to(device), prefixes, gen, evidence=False, vetoes_for=vetoes_for,
                                      row_vetoes=row_vetoes, vetoes_for_calls=by_calls, calls_guidance=calls_guidance,
                                      rerank_for=rerank_for)
        for e, p in zip(chunk, preds):
            hyp[e.id] = format_report(tok.decode_report(p.token_ids))
            found[e.id] = {n: {"p": round(p.finding_probs[n], 5), "present": bool(p.finding_probs[n] >= thr_k[n]),
                               "side": max(p.side_probs[n], key=p.side_probs[n].get), "location": p.location[n]}
                           for n in names}
            probs.append([p.finding_probs[n] for n in names])
            present, _, _ = finding_targets(e.labels, names, model.cfg.heads.locations)
            labels.append(present)
            br = below_resolution(e.labels)
            below.append([n in br for n in names])
        bar.update(len(chunk))
    bar.close()
    P, Y, BR = np.asarray(probs), np.asarray(labels), np.asarray(below, dtype=bool)
    ref = {e.id: e.report for e in entries}
    ev = evaluate_reports(hyp, ref, bootstrap=0, meteor=False)
    out: dict[str, Any] = {"split": split, "n": len(entries), "max_history_tokens": max_history_tokens,
                           "seconds_per_study": round((time.perf_counter() - t0) / len(entries), 3),
                           "decoding": {"strategy": strategy, "num_beams": num_beams if strategy == "beam" else 1,
                                        "length_penalty": length_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
                                        "complete_report": complete_sections, "consistent_with_calls": consistent_with_calls,
                                        "consistent_with_acquisition": consistent_with_acquisition,
                                        "consistent_measurements": consistent_measurements,
                                        "report_outline": report_outline, "calls_covered": calls_covered,
                                        "record_covered": record_covered, "calls_guidance": calls_guidance,
                                        "technique_states_contrast": technique_states_contrast,
                                        **({"num_samples": num_samples, "temperature": temperature, "top_p": top_p,
                                            "calls_agreement": calls_agreement, "record_agreement": record_agreement,
                                            "acquisition_agreement": acquisition_agreement, "mbr_from": mbr_from}
                                           if strategy == "mbr" else {})}}
    out.update({k: ev.scores[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "length_ratio",
                                          "brevity_penalty") if k in ev.scores})
    from data.report_consistency import change_contradictions

    cc = [change_contradictions(h) for h in hyp.values()]
    out["change_phrases"] = sum(n for _, n in cc)  # "increased from 9 mm to 12 mm" and the like
    out["change_phrases_contradicting"] = sum(b for b, _ in cc)
    out["text_finding_micro_f1"] = ev.scores.get("finding_micro_f1")
    main_Y = np.where(BR, -1, Y)  # below-resolution findings scored apart
    thr = model.cfg.heads.thresholds()  # [K] operating points (0.5 unless fitted on val)
    called = P >= thr  # [N, K]
    out["finding_micro_f1"] = micro_f1(called, main_Y)
    out["finding_micro_f1_at_0.5"] = micro_f1(P >= 0.5, main_Y)
    per = [micro_f1(called[:, k], main_Y[:, k]) for k in range(len(names)) if (main_Y[:, k] == 1).any()]
    out["finding_macro_f1"] = float(np.mean(per)) if per else None
    out["decision_thresholds"] = {n: float(t) for n, t in zip(names, thr)}
    out["per_finding"] = per_finding_metrics(P, main_Y, names, thr)
    out["below_resolution_findings"] = int(BR.sum())
    out["below_resolution_recall"] = float(called[BR].mean()) if BR.any() else None
    out["ece"] = expected_calibration_error(P, Y)
    agree = []
    for i, e in enumerate(entries):
        said = presence(label_report(hyp[e.id]))
        agree += [bool(said.get(n)) == bool(called[i, k]) for k, n in enumerate(names)]
    out["text_finding_consistency"] = float(np.mean(agree))
    from app.evaluate import facts_carried

    out.update(facts_carried(hyp, entries))
    if predictions:
        Path(predictions).write_text("".join(json.dumps({"id": k, "report": v, "findings": found[k]}) + "\n"
                                             for k, v in hyp.items()))
    return out
