"""Report decoder: pre-norm blocks of block-sparse self-attention, cross-attention to the fused
multimodal tokens, and a Mixture-of-Experts feed-forward.

The history is the decoder's prefix (``[BOS] history [REPORT] report [EOS]``); the fused image and
audio tokens (context, width == d_model) enter every layer through cross-attention. With
``copy=True`` a pointer-generator head (:class:`CopyHead`) mixes the vocabulary distribution with
a copy distribution over marked prefix positions (the history digest), and the decoder's
``logits`` are then log-probabilities (still right for ``cross_entropy``, ``argmax`` and sampling).

Legend: B batch, T tokens, F context tokens, D width, H heads, d head dim, L layers, E experts, V vocab,
S copy sources, C copy width.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.attention import AttentionCache, AttentionConfig, BlockSparseAttention
from core.moe import MoE, MoEConfig


@dataclass
class DecoderConfig:
    vocab_size: int = 8000
    d_model: int = 256
    n_layers: int = 4
    cross_heads: int = 4
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    grad_checkpoint: bool = False
    copy: bool = False  # pointer-generator copy head over marked prefix positions (CopyHead)
    copy_dim: int = 64
    # Case-aware copying: a source offers its token or the token's line-start variant (" word" ->
    # "Word"), chosen by a learned case gate, and phrases are matched on canonical tokens. The
    # maps come from the tokenizer (Decoder.set_copy_vocab); identity until set.
    copy_case: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig.from_dict(self.attention)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.attention.d_model != self.d_model or self.moe.d_model != self.d_model:
            raise ValueError("attention.d_model and moe.d_model must equal d_model")
        if self.d_model % self.cross_heads:
            raise ValueError("d_model must be divisible by cross_heads")

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "DecoderConfig":
        """``tiny`` (tests), ``demo`` (CPU-trained demo, the pinned benchmark config), ``full``."""
        if name == "tiny":
            att = AttentionConfig(d_model=64, n_heads=2, head_dim=32, block_size=16, window_blocks=1, global_blocks=1,
                                  compress_block=32, select_topk=1, chunk_blocks=8)
            moe = MoEConfig(d_model=64, n_experts=4, top_k=2, d_expert=64)
            cfg = dict(d_model=64, n_layers=2, cross_heads=2, attention=att, moe=moe)
        elif name == "demo":
            att = AttentionConfig(d_model=256, n_heads=4, head_dim=64, block_size=64, window_blocks=1, global_blocks=1,
                                  compress_block=256, select_topk=1, chunk_blocks=32, rope_fraction=0.5)
            moe = MoEConfig(d_model=256, n_experts=16, top_k=2, d_expert=128)
            cfg = dict(d_model=256, n_layers=4, cross_heads=4, attention=att, moe=moe)
        elif name == "full":
            att = AttentionConfig(d_model=1024, n_heads=16, head_dim=64, block_size=64, window_blocks=2, global_blocks=1,
                                  compress_block=256, select_topk=2, chunk_blocks=16, rope_fraction=0.5)
            moe = MoEConfig(d_model=1024, n_experts=16, top_k=2, d_expert=1024, n_shared=1)
            cfg = dict(d_model=1024, n_layers=16, cross_heads=16, attention=att, moe=moe)
        else:
            raise ValueError(f"unknown decoder preset {name!r}: use 'tiny', 'demo' or 'full'")
        cfg.update(overrides)
        return cls(vocab_size=vocab_size, **cfg)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B,T-logits_from,V]: logits[:, i] is position logits_from + i
    hidden: torch.Tensor  # [B,T,D] final-norm hidden states
    aux_loss: torch.Tensor  # scalar, MoE balance (summed over layers)
    expert_load: torch.Tensor  # [L,E] fraction of routed assignments per expert
    copy: "CopyTrace | None" = None  # what the copy head did (training supervision), None without copying
    logits_from: int = 0  # the first position with logits (Decoder.forward's logits_from)


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the fused context; rows without any valid
    context token get a zero update."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.h = n_heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wkv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def context_kv(self, ctx_BFD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, Fn, D = ctx_BFD.shape
        k, v = self.wkv(ctx_BFD).view(B, Fn, 2, self.h, D // self.h).permute(2, 0, 3, 1, 4)  # each [B,H,F,d]
        return k, v

    def forward(self, x_BTD: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_BF: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.h, D // self.h).transpose(1, 2)  # [B,H,T,d]
        bias = torch.zeros(mask_BF.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask_BF, torch.finfo(q.dtype).min)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])  # [B,H,T,d]
        o = o * mask_BF.any(-1).to(o.dtype)[:, None, None, None]
        return self.wo(o.transpose(1, 2).reshape(B, T, D))


class CopyHead(nn.Module):
    """Pointer-generator copy (See et al., 2017) from marked prefix positions ("sources").

    A source at position j offers its token x_j. Its key is read from the state *before* it
    (token x_{j-1} and final hidden state h_{j-1}); the query at position t reads x_t and h_t, the
    state that predicts x_{t+1}. The score has a token-identity term, ``scale * cos(P e_t,
    P e_{j-1})`` with one shared projection P, so from initialisation the head continues a phrase
    it is in the middle of copying (it points just past the last copied token), and a learned
    context term ``(Wq h_t . Wk h_{j-1}) / sqrt(C)`` that learns where a phrase starts. A gate
    ``g_t = sigmoid(w . h_t + b)`` mixes: ``p = (1 - g) softmax(logits) + g * copy``.
    Rows without sources use the vocabulary distribution alone.
    """

    def __init__(self, d_model: int, d_copy: int, vocab_size: int = 0, case: bool = False):
        super().__init__()
        self.tok_proj = nn.Linear(d_model, d_copy, bias=False)
        self.wq = nn.Linear(d_model, d_copy, bias=False)
        self.wk = nn.Linear(d_model, d_copy, bias=False)
        self.gate = nn.Linear(d_model, 1)
        self.scale = nn.Parameter(torch.tensor(8.0))
        self.d_copy = d_copy
        # case-aware copying (DecoderConfig.copy_case): c_t = sigmoid(case(h_t)) moves a source's
        # mass from its token x_j to variant[x_j]; canon maps every token to the form the
        # token-identity term compares. Not saved: they follow from the tokenizer.
        self.case = nn.Linear(d_model, 1) if case else None
        self.register_buffer("variant_V", torch.arange(vocab_size), persistent=False)
        self.register_buffer("canon_V", torch.arange(vocab_size), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_proj.weight, std=1.0 / math.sqrt(self.tok_proj.in_features))
        nn.init.constant_(self.gate.bias, -2.0)
        if self.case is not None:
            nn.init.constant_(self.case.bias, -2.0)

    def sources(self, emb_BTD: torch.Tensor, h_BTD: torch.Tensor, ids_BT: torch.Tensor,
                copy_mask_BT: torch.Tensor) -> "CopySources":
        """Keys of the marked positions (position 0 cannot be a source: it has no state before it)."""
        B, T, _ = emb_BTD.shape
        mask = copy_mask_BT.bool().clone()
        mask[:, 0] = False
        S = max(1, int(mask.sum(1).max()))
        pos_BS = torch.zeros(B, S, dtype=torch.long, device=ids_BT.device)
        valid_BS = torch.zeros(B, S, dtype=torch.bool, device=ids_BT.device)
        for b in range(B):
            p = mask[b].nonzero()[:, 0]
            pos_BS[b, : len(p)] = p
            valid_BS[b, : len(p)] = True
        prev = (pos_BS - 1).clamp(min=0)  # [B,S] the state before each source
        e_prev = emb_BTD.gather(1, prev[..., None].expand(B, S, emb_BTD.shape[-1]))  # [B,S,D]
        h_prev = h_BTD.gather(1, prev[..., None].expand(B, S, h_BTD.shape[-1]))  # [B,S,D]
        tok_BS = ids_BT.gather(1, pos_BS)  # [B,S] the token each source offers
        return CopySources(F.normalize(self.tok_proj(e_prev), dim=-1), self.wk(h_prev), tok_BS, valid_BS, pos_BS)

    def forward(self, logits_BTV: torch.Tensor, emb_BTD: torch.Tensor, h_BTD: torch.Tensor, src: "CopySources",
                t_BT: torch.Tensor | None = None, trace: bool = False):
        """Log-probabilities [B,T,V] of the mixture. ``t_BT``: each query's position (causality:
        a source j is visible from position t >= j); None = every source is visible. ``trace``:
        also return the copy attention [B,T,S] and the gate logits [B,T]."""
        q_tok = F.normalize(self.tok_proj(emb_BTD), dim=-1)  # [B,T,C]
        q_ctx = self.wq(h_BTD)  # [B,T,C]
        scores = self.scale * torch.einsum("btc,bsc->bts", q_tok, src.k_tok_BSC) + \
            torch.einsum("btc,bsc->bts", q_ctx, src.k_ctx_BSC) / math.sqrt(self.d_copy)  # [B,T,S]
        visible = src.valid_BS[:, None, :]  # [B,1,S]
        if t_BT is not None:
            visible = visible & (src.pos_BS[:, None, :] <= t_BT[..., None])  # [B,T,S]
        visible = visible.expand_as(scores)
        attn = _at_least_f32(scores).masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # [B,T,S]
        V = logits_BTV.shape[-1]
        p_copy = torch.zeros(*attn.shape[:2], V, dtype=attn.dtype, device=attn.device)  # [B,T,V]
        c = None
        if self.case is None:
            p_copy.scatter_add_(-1, src.tok_BS[:, None, :].expand_as(attn), attn)
        else:  # each source splits its mass between its token and the token's variant
            c = _at_least_f32(self.case(h_BTD))  # [B,T,1] case logit
            pc = torch.sigmoid(c)
            p_copy.scatter_add_(-1, src.tok_BS[:, None, :].expand_as(attn), attn * (1 - pc))
            p_copy.scatter_add_(-1, self.variant_V[src.tok_BS][:, None, :].expand_as(attn), attn * pc)
        z = _at_least_f32(self.gate(h_BTD))  # [B,T,1]
        mixed = torch.logaddexp(F.logsigmoid(-z) + _at_least_f32(logits_BTV).log_softmax(-1),
                                F.logsigmoid(z) + p_copy.clamp_min(1e-30).log())  # [B,T,V]
        has = visible.any(-1, keepdim=True)  # [B,T,1]
        out = torch.where(has, mixed, _at_least_f32(logits_BTV))
        return (out, attn, z[..., 0], None if c is None else c[..., 0]) if trace else out


def spans_to_mask(spans, T: int, device=None) -> torch.Tensor | None:
    """Copy-source mask [B,T] from per-row ``[start, end)`` spans (None = no sources in that row),
    clipped to ``[0, T)``; None when no row has a span."""
    if spans is None or all(sp is None for sp in spans):
        return None
    mask = torch.zeros(len(spans), T, dtype=torch.bool, device=device)  # [B,T]
    for n, sp in enumerate(spans):
        if sp is not None:
            mask[n, max(0, int(sp[0])): min(T, int(sp[1]))] = True
    return mask


@dataclass
class CopyTrace:
    """The copy head over one forward pass, for queries at positions t0 .. T-1."""
    attn_BTS: torch.Tensor  # [B,T-t0,S] copy attention of each query over the sources
    gate_BT: torch.Tensor  # [B,T-t0] gate logit (sigmoid = weight of the copy path)
    pos_BS: torch.Tensor  # [B,S] source positions in the sequence
    valid_BS: torch.Tensor  # [B,S] bool
    t0: int
    case_BT: torch.Tensor | None = None  # [B,T-t0] case logit (copy_case), else None


@dataclass
class CopyTargets:
    """Copy supervision for queries t0 .. T-1 (see :func:`copy_targets`)."""
    src_BTS: torch.Tensor  # [B,T-t0,S] bool: the sources that offer the next token in an aligned n-gram
    gate_BT: torch.Tensor  # [B,T-t0] float: 1 where the next token is copied
    query_BT: torch.Tensor  # [B,T-t0] bool: queries whose next token is a target
    case_BT: torch.Tensor  # [B,T-t0] float: 1 where a copied token is its source's variant, not the token itself


def copy_targets(ids_BT: torch.Tensor, labels_BT: torch.Tensor, trace: CopyTrace, n: int = 3,
                 canon_V: torch.Tensor | None = None) -> CopyTargets:
    """Copy supervision read off the data: a target token is *copied* when an n-gram of targets
    containing it also occurs among the sources (n contiguous source positions, compared through
    ``canon_V`` when given, so " persistent cough and" aligns with "Persistent cough and"); the
    sources that offer it there are its pointer targets. Position u is a target where
    ``labels_BT[:, u] != -100``; the query at u - 1 predicts it."""
    B, T = ids_BT.shape
    t0, S = trace.t0, trace.pos_BS.shape[1]
    src_BTS = torch.zeros(B, T - t0, S, dtype=torch.bool)
    gate_BT = torch.zeros(B, T - t0)
    case_BT = torch.zeros(B, T - t0)
    query_BT = torch.zeros(B, T - t0, dtype=torch.bool)
    raw = ids_BT.tolist()
    ids = (canon_V[ids_BT] if canon_V is not None else ids_BT).tolist()  # compared forms
    labels = labels_BT.tolist()
    for b, (pos, valid) in enumerate(zip(trace.pos_BS.tolist(), trace.valid_BS.tolist())):
        index = {p: s for s, (p, v) in enumerate(zip(pos, valid)) if v}  # position -> source index
        grams: dict[tuple, list[int]] = {}  # n-gram -> first positions of its runs among the sources
        for p in index:
            if all(p + i in index for i in range(n)):
                grams.setdefault(tuple(ids[b][p: p + n]), []).append(p)
        is_target = [lab != -100 for lab in labels[b]]
        for u in range(t0 + 1, T):
            if not is_target[u]:
                continue
            q = u - 1 - t0
            query_BT[b, q] = True
            for o in range(n):  # the n-grams of targets that contain u
                st = u - o
                if st < 0 or st + n > T or not all(is_target[st: st + n]):
                    continue
                for p in grams.get(tuple(ids[b][st: st + n]), ()):
                    src_BTS[b, q, index[p + o]] = True
                    gate_BT[b, q] = 1.0
                    case_BT[b, q] = float(raw[b][p + o] != raw[b][u])
    dev = trace.attn_BTS.device
    return CopyTargets(src_BTS.to(dev), gate_BT.to(dev), query_BT.to(dev), case_BT.to(dev))


def copy_loss(trace: CopyTrace, ids_BT: torch.Tensor, labels_BT: torch.Tensor, n: int = 3,
              canon_V: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised copy loss: binary cross-entropy of the gate against "the next token is copied"
    (:func:`copy_targets`) on every query with a target, plus the negative log of the attention the
    copy head puts on the aligned sources where it should copy, plus (case-aware copying) the case
    gate's cross-entropy where it copies. It speeds up what the mixture's own likelihood teaches
    slowly: where a copied phrase starts."""
    tg = copy_targets(ids_BT, labels_BT, trace, n, canon_V)
    z = _at_least_f32(trace.gate_BT)
    if not bool(tg.query_BT.any()):
        return z.sum() * 0.0
    loss = F.binary_cross_entropy_with_logits(z[tg.query_BT], tg.gate_BT[tg.query_BT])
    copied = tg.gate_BT > 0  # [B,T-t0]
    if bool(copied.any()):
        p_BT = (_at_least_f32(trace.attn_BTS) * tg.src_BTS).sum(-1)  # [B,T-t0] attention on the aligned sources
        loss = loss - p_BT[copied].clamp_min(1e-9).log().mean()
        if trace.case_BT is not None:
            loss = loss + F.binary_cross_entropy_with_logits(_at_least_f32(trace.case_BT)[copied], tg.case_BT[copied])
    return loss


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class CopySources:
    k_tok_BSC: torch.Tensor  # [B,S,C] token-identity keys (unit norm)
    k_ctx_BSC: torch.Tensor  # [B,S,C] context keys
    tok_BS: torch.Tensor  # [B,S] token offered by each source
    valid_BS: torch.Tensor  # [B,S] bool
    pos_BS: torch.Tensor  # [B,S] source positions in the sequence

    def reorder(self, idx_B: torch.Tensor) -> "CopySources":
        return CopySources(*(t.index_select(0, idx_B) for t in
                             (self.k_tok_BSC, self.k_ctx_BSC, self.tok_BS, self.valid_BS, self.pos_BS)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = BlockSparseAttention(cfg.attention)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.xattn = CrossAttention(cfg.d_model, cfg.cross_heads)
        self.norm3 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = MoE(cfg.moe)

    def forward(self, x, ctx_k=None, ctx_v=None, ctx_mask=None):
        x = x + self.attn(self.norm1(x))
        if ctx_k is not None:
            x = x + self.xattn(self.norm2(x), ctx_k, ctx_v, ctx_mask)
        y, aux = self.moe(self.norm3(x))
        return x + y, aux["aux_loss"], aux["expert_load"]


@dataclass
class DecoderCache:
    attn: list[AttentionCache]
    ctx: list[tuple[torch.Tensor, torch.Tensor] | None]
    ctx_mask: torch.Tensor | None
    copy: CopySources | None = None

    def reorder(self, idx_B: torch.Tensor, shared_prefix: int = 0) -> None:
        for c in self.attn:
            c.reorder(idx_B, shared_prefix)
        self.ctx = [None if kv is None else (kv[0].index_select(0, idx_B), kv[1].index_select(0, idx_B)) for kv in self.ctx]
        if self.ctx_mask is not None:
            self.ctx_mask = self.ctx_mask.index_select(0, idx_B)
        if self.copy is not None:
            self.copy = self.copy.reorder(idx_B)

    @property
    def length(self) -> torch.Tensor:
        return self.attn[0].length


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.copy_head = CopyHead(cfg.d_model, cfg.copy_dim, cfg.vocab_size, cfg.copy_case) if cfg.copy else None
        self.apply(self._init)
        if self.copy_head is not None:
            self.copy_head.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        for blk in self.layers:  # scaled residual projections (GPT-2)
            nn.init.normal_(blk.attn.wo.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(blk.xattn.wo.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad:
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None and not isinstance(m, nn.Embedding):
                nn.init.zeros_(m.bias)

    def _context(self, blk: DecoderBlock, ctx_BFD, mask_BF):
        if ctx_BFD is None:
            return None, None
        if ctx_BFD.shape[-1] != self.cfg.d_model:
            raise ValueError(f"context width {ctx_BFD.shape[-1]} != decoder d_model {self.cfg.d_model}")
        return blk.xattn.context_kv(ctx_BFD)

    @staticmethod
    def _mask(ctx_BFD, mask_BF):
        if ctx_BFD is None:
            return None
        if mask_BF is None:
            return torch.ones(ctx_BFD.shape[:2], dtype=torch.bool, device=ctx_BFD.device)
        return mask_BF.bool()

    def forward(self, ids_BT: torch.Tensor, context_BFD: torch.Tensor | None = None,
                context_mask_BF: torch.Tensor | None = None, copy_mask_BT: torch.Tensor | None = None,
                logits_from: int = 0) -> DecoderOutput:
        """``copy_mask_BT`` marks the copy head's source positions (ignored without a copy head).
        ``logits_from``: compute the vocabulary logits (and the copy mixture) only for positions
        from there on. Training passes the position before the first target: the history before
        it still runs through every layer (attention needs its keys), but the [T, V] projection,
        the softmax and the copy mixture of the history positions, which no loss reads, are skipped
        (a third of a demo decoder step at a 1,024-token history)."""
        T = ids_BT.shape[1]
        if not 0 <= logits_from < max(T, 1):
            raise ValueError(f"logits_from must be in [0, {T}), got {logits_from}")
        emb = x = self.tok_embeddings(ids_BT)  # [B,T,D]
        mask = self._mask(context_BFD, context_mask_BF)
        aux_total, loads = x.new_zeros(()), []
        for blk in self.layers:
            k, v = self._context(blk, context_BFD, mask)
            if self.cfg.grad_checkpoint and torch.is_grad_enabled():
                x, aux, load = checkpoint(blk, x, k, v, mask, use_reentrant=False)
            else:
                x, aux, load = blk(x, k, v, mask)
            aux_total = aux_total + aux
            loads.append(load)
        h = self.norm(x)
        L0 = logits_from
        logits = self.lm_head(h[:, L0:])  # [B,T-L0,V]
        if self.copy_head is not None and copy_mask_BT is not None and bool(copy_mask_BT.any()):
            emb = self._copy_emb(ids_BT, emb)
            src = self.copy_head.sources(emb, h, ids_BT, copy_mask_BT)
            # positions before the first source see nothing to copy: mix only from there on
            t0 = max(int(src.pos_BS.masked_fill(~src.valid_BS, T).min()), L0)
            t_BT = torch.arange(t0, T, device=ids_BT.device).expand(ids_BT.shape[0], -1)  # [B,T-t0]
            mixed, attn, z, c = self.copy_head(logits[:, t0 - L0:], emb[:, t0:], h[:, t0:], src, t_BT, trace=True)
            logits = torch.cat([_at_least_f32(logits[:, :t0 - L0]), mixed], 1)  # [B,T-L0,V] log-probabilities
            trace = CopyTrace(attn, z, src.pos_BS, src.valid_BS, t0, c)
            return DecoderOutput(logits, h, aux_total, torch.stack(loads), trace, L0)
        return DecoderOutput(logits, h, aux_total, torch.stack(loads), logits_from=L0)

    def set_copy_vocab(self, variant: Sequence[int], canon: Sequence[int]) -> None:
        """The case-aware copy maps (``DecoderConfig.copy_case``), from the tokenizer: ``variant[t]``
        the line-start form of token t (itself if none), ``canon[t]`` its canonical form."""
        if self.copy_head is None or self.copy_head.case is None:
            return
        V = self.cfg.vocab_size
        if len(variant) != V or len(canon) != V:
            raise ValueError(f"copy vocab maps need {V} entries, got {len(variant)} and {len(canon)}")
        dev = self.copy_head.variant_V.device
        self.copy_head.variant_V = torch.as_tensor(variant, dtype=torch.long, device=dev)
        self.copy_head.canon_V = torch.as_tensor(canon, dtype=torch.long, device=dev)

    def copy_canon(self) -> torch.Tensor | None:
        """The canonical-token map of case-aware copying, None without it."""
        return None if self.copy_head is None or self.copy_head.case is None else self.copy_head.canon_V

    def _copy_emb(self, ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings the copy head's token-identity term compares: of the canonical tokens when
        copying is case-aware, else the tokens' own ``emb``."""
        if self.copy_head is None or self.copy_head.case is None:
            return emb
        return self.tok_embeddings(self.copy_head.canon_V[ids])

    def update_router_biases(self, expert_load_LE: torch.Tensor) -> None:
        """After an optimiser step, for MoE balance="bias" (DeepSeek-V3); a no-op for "aux"."""
        if self.cfg.moe.balance == "bias":
            for blk, load in zip(self.layers, expert_load_LE):
                blk.moe.update_bias(load)

    # -- generation (used by core.generate)
    @torch.no_grad()
    def prefill(self, ids_BT: torch.Tensor, lengths_B: torch.Tensor, context_BFD=None, context_mask_BF=None,
                capacity: int | None = None, copy_mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, DecoderCache]:
        """Run right-padded prefixes; -> (logits at each row's last real token [B,V], cache)."""
        B, T = ids_BT.shape
        cap = capacity or T
        emb = x = self.tok_embeddings(ids_BT)
        mask = self._mask(context_BFD, context_mask_BF)
        caches, ctxs = [], []
        for blk in self.layers:
            k, v = self._context(blk, context_BFD, mask)
            a, cache = blk.attn.prefill(blk.norm1(x), lengths_B, cap)
            x = x + a
            if k is not None:
                x = x + blk.xattn(blk.norm2(x), k, v, mask)
            x = x + blk.moe(blk.norm3(x))[0]
            caches.append(cache)
            ctxs.append(None if k is None else (k, v))
        rows = torch.arange(B, device=x.device)
        last_B = (lengths_B - 1).clamp(min=0)
        h_last = self.norm(x[rows, last_B])  # [B,D]
        logits = self.lm_head(h_last)  # [B,V]
        src = None
        if self.copy_head is not None and copy_mask_BT is not None and bool(copy_mask_BT.any()):
            emb = self._copy_emb(ids_BT, emb)
            src = self.copy_head.sources(emb, self.norm(x), ids_BT, copy_mask_BT)
            logits = self.copy_head(logits[:, None], emb[rows, last_B][:, None], h_last[:, None], src)[:, 0]
        return logits, DecoderCache(caches, ctxs, mask, src)

    @torch.no_grad()
    def step(self, ids_B: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Feed one token per row; -> next-token logits [B,V]."""
        emb = x = self.tok_embeddings(ids_B)[:, None]  # [B,1,D]
        for blk, ac, kv in zip(self.layers, cache.attn, cache.ctx):
            x = x + blk.attn.step(blk.norm1(x), ac)
            if kv is not None:
                x = x + blk.xattn(blk.norm2(x), kv[0], kv[1], cache.ctx_mask)
            x = x + blk.moe(blk.norm3(x))[0]
        h = self.norm(x)  # [B,1,D]
        logits = self.lm_head(h)  # [B,1,V]
        if cache.copy is not None and self.copy_head is not None:
            logits = self.copy_head(logits, self._copy_emb(ids_B[:, None], emb), h, cache.copy)
        return logits[:, 0]
