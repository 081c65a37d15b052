"""LoRA adapters (Hu et al. 2021) on the decoder's self-attention projections and MoE experts.

Only adapters train; ``lora_state_dict`` / ``load_lora_state_dict`` move them as a plain dict
(saved apart from the base model by the caller, e.g. with safetensors); ``merge_lora`` folds them
into the base weights for inference.  Hand-written rather than via ``peft`` because the stacked
per-expert weights of ``core.moe.MoE`` are parameters, not ``nn.Linear`` modules.

Legend: E experts, D width, F expert hidden, r rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from core.attention import BlockSparseAttention
from core.moe import MoE


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wqkv", "wo", "w13")  # attention: wqkv, wo; experts: w13, w2

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """base(x) + scale * x A^T B^T, B initialised to zero (the adapted model starts equal)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_b @ self.lora_a)
        return self.base


class ExpertLoRA(nn.Module):
    """Per-expert adapters for the stacked MoE weights: delta_e(x) = scale * x A_e B_e."""

    def __init__(self, moe: MoE, targets: tuple[str, ...], rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for name in targets:
            w = getattr(moe, name)  # [E, in, out]
            E, n_in, n_out = w.shape
            a = torch.empty(E, n_in, rank, dtype=w.dtype, device=w.device)
            nn.init.normal_(a, std=n_in ** -0.5)
            self.a[name] = nn.Parameter(a)
            self.b[name] = nn.Parameter(torch.zeros(E, rank, n_out, dtype=w.dtype, device=w.device))

    def forward(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor | float:
        if which not in self.a:
            return 0.0
        return (x @ self.a[which][e] @ self.b[which][e]) * self.scale

    def batched(self, which: str, x_EMi: torch.Tensor) -> torch.Tensor | float:
        """Deltas for all experts at once: x [E, M, in] -> [E, M, out]."""
        if which not in self.a:
            return 0.0
        return torch.bmm(torch.bmm(x_EMi, self.a[which]), self.b[which]) * self.scale

    def merge_into(self, moe: MoE) -> None:
        with torch.no_grad():
            for name in self.a:
                getattr(moe, name).add_(self.scale * torch.bmm(self.a[name], self.b[name]))


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None) -> nn.Module:
    """Freeze ``model`` and add adapters in place to every BlockSparseAttention and MoE in it."""
    cfg = cfg or LoRAConfig()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in list(model.modules()):
        if isinstance(m, BlockSparseAttention):
            for name in ("wqkv", "wo"):
                if name in cfg.targets and isinstance(getattr(m, name), nn.Linear):
                    setattr(m, name, LoRALinear(getattr(m, name), cfg.rank, cfg.scale))
        elif isinstance(m, MoE):
            ex = tuple(t for t in cfg.targets if t in ("w13", "w2"))
            if ex and m.lora is None:
                m.lora = ExpertLoRA(m, ex, cfg.rank, cfg.scale)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (keys as in model.state_dict())."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_a" in k or ".lora_b" in k
            or ".lora.a." in k or ".lora.b." in k}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by ``lora_state_dict`` into a model prepared with ``apply_lora``."""
    own = model.state_dict()
    missing = [k for k in state if k not in own]
    if missing:
        raise KeyError(f"adapter keys not in model (call apply_lora with the same LoRAConfig first): {missing[:3]}")
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold adapters into base weights and remove them (in place); the result has no LoRA modules."""
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, LoRALinear):
                setattr(m, name, child.merged())
        if isinstance(m, MoE) and m.lora is not None:
            m.lora.merge_into(m)
            m.lora = None
    return model


def trainable_fraction(model: nn.Module) -> float:
    """Trainable / all parameters (shared tensors counted once)."""
    seen, total, train = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return train / max(total, 1)
