"""Block-sparse causal self-attention for 100K-token records, with a KV cache for generation.

Three branches (NSA-style, Yuan et al. 2025, adapted to block granularity for CPU matmuls), each a
separately normalised softmax attention, mixed per token and head by learned sigmoid gates:

* ``local``: a query in block i attends causally within its block, to the ``window_blocks``
  preceding blocks, and to the first ``global_blocks`` blocks (sink / global tokens).
* ``compressed``: every query attends to summaries (learned weighted means of K and V) of all
  ``compress_block``-token blocks that end at or before the start of its own block.
* ``selected``: query block i attends to the raw tokens of the ``select_topk`` compressed blocks
  with the highest importance for the block's *first* query (causal for every token of the block,
  and the KV-cache decode can decide it when that token arrives).  Importance is a Quest-style
  (Tang et al. 2024) upper bound of q.k over each block's keys, from channel-wise key min/max,
  softmaxed over candidates and summed over heads, so selection follows the same q/k the other
  branches learn.  Candidates are the compressed blocks that end at or before block i starts (they
  may overlap the local window; each branch has its own softmax), so no past token is out of reach.

Cost per layer O(T * (L + T/c + K*c)) with L = (global + window + 1) * b local keys; no T x T
tensor exists: queries are processed ``chunk_blocks`` blocks at a time, and under autograd each
chunk is recomputed in backward by a custom autograd Function that adds the chunk's (chunk-sized)
gradients into slices of dq, dk, dv, so memory and backward work stay linear in T.

Legend: B batch, H heads, T tokens, N key blocks, Q query blocks in a chunk, b block size,
d head dim, C compressed blocks, K top-k, L local keys per query block, R ring-buffer slots.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from core.rope import apply_rope, rope_angles

BRANCHES = ("local", "compressed", "selected")


@dataclass
class AttentionConfig:
    d_model: int = 256
    n_heads: int = 4
    head_dim: int = 64
    block_size: int = 64
    window_blocks: int = 1
    global_blocks: int = 1
    compress_block: int = 256
    select_topk: int = 1
    branches: tuple[str, ...] = BRANCHES
    chunk_blocks: int = 32
    rope_base: float = 500_000.0

    def __post_init__(self) -> None:
        self.branches = tuple(self.branches)
        bad = set(self.branches) - set(BRANCHES)
        if bad or not self.branches:
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {self.branches}")
        if self.compress_block % self.block_size:
            raise ValueError("compress_block must be a multiple of block_size")
        if "selected" in self.branches and self.select_topk < 1:
            raise ValueError("the selected branch needs select_topk >= 1")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE)")

    @property
    def uses_compressed(self) -> bool:
        return "compressed" in self.branches or "selected" in self.branches

    @classmethod
    def from_dict(cls, d: dict) -> "AttentionConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- kernel helpers


def compress_kv(k_BHTd: torch.Tensor, weight_c: torch.Tensor, c: int) -> torch.Tensor:
    """Summaries of the complete c-token blocks: softmax(weight)-weighted mean -> [B, H, T//c, d]."""
    B, H, T, d = k_BHTd.shape
    n = T // c
    blocks = k_BHTd[:, :, : n * c].reshape(B, H, n, c, d)  # [B,H,C,c,d]
    return torch.einsum("bhncd,c->bhnd", blocks, weight_c.softmax(0).to(k_BHTd.dtype))


def key_bounds(k_BHTd: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of the keys of each complete c-token block -> 2 x [B, H, T//c, d]."""
    B, H, T, d = k_BHTd.shape
    blocks = k_BHTd[:, :, : (T // c) * c].reshape(B, H, T // c, c, d)  # [B,H,C,c,d]
    return blocks.amin(3), blocks.amax(3)


def selection_scores(qs_BHQd: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cand_BQC: torch.Tensor) -> torch.Tensor:
    """Block importance for (pre-scaled) selecting queries: upper bound of q.k over each block,
    softmax over candidate blocks, summed over heads -> [B,Q,C]; non-candidates -inf."""
    bound = torch.matmul(qs_BHQd.clamp(min=0), kmax.transpose(-1, -2)) + \
        torch.matmul(qs_BHQd.clamp(max=0), kmin.transpose(-1, -2))  # [B,H,Q,C]
    p, _ = _masked_softmax_rows(bound, cand_BQC[:, None].expand_as(bound))
    return p.sum(1).masked_fill(~cand_BQC, float("-inf"))


def _masked_softmax_rows(s: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over valid entries; rows without any valid entry come back as zeros.

    Masked entries get the dtype's most negative finite value (not -inf) so fully masked rows stay
    finite; they are then zeroed, which also zeroes their gradient."""
    s = s.masked_fill(~valid, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    any_valid = valid.any(-1, keepdim=True)
    return p * any_valid.to(p.dtype), any_valid


def _local_valid(s: int, e: int, cfg: AttentionConfig, device) -> torch.Tensor:
    """Validity of (query, local key) pairs for query blocks s..e-1 -> [Q, b, L] bool
    (key order: the global blocks, then the window blocks oldest first, then the own block)."""
    b, w, g = cfg.block_size, cfg.window_blocks, cfg.global_blocks
    i = torch.arange(s, e, device=device)[:, None]  # [Q,1]
    ar = torch.arange(b, device=device)
    kpos = [(i - w + m) * b + ar for m in range(w + 1)]  # each [Q,b]
    win = torch.cat(kpos, dim=1)  # [Q,(w+1)b]
    glob = torch.arange(g * b, device=device).expand(e - s, g * b)  # [Q,gb]
    kpos_all = torch.cat([glob, win], dim=1)  # [Q,L]
    qpos = i * b + ar  # [Q,b]
    ok = (kpos_all[:, None, :] <= qpos[:, :, None]) & (kpos_all >= 0)[:, None, :]  # [Q,b,L]
    not_dup = torch.cat([glob < (i - w) * b, torch.ones_like(win, dtype=torch.bool)], dim=1)  # [Q,L]
    return ok & not_dup[:, None, :]


class _Chunk:
    """The inputs one query chunk (blocks s..e-1) reads, cut out of the full tensors.

    Every tensor here is O(chunk) in size; in backward they become autograd leaves, so the gradient
    of a chunk is chunk-sized and is added into slices of the full gradients (no full-size
    zero-filled gradient per chunk, which made the old checkpointed backward O(T^2/chunk))."""

    def __init__(self, qb, kb, vb, cmp_k, cmp_v, kmin, kmax, gb, s: int, e: int, cfg: AttentionConfig,
                 sel_idx: torch.Tensor | None = None):
        B, H, N, b, d = qb.shape
        self.s, self.e, self.lo = s, e, max(s - cfg.window_blocks, 0)
        self.pad = self.lo - (s - cfg.window_blocks)  # window blocks before block 0 (zero keys, masked)
        self.q = qb[:, :, s:e]  # [B,H,Q,b,d]
        self.g = None if gb is None else gb[:, :, s:e]  # [B,H,Q,b,G]
        self.k_win = self.v_win = self.k_glob = self.v_glob = None
        self.cmp_k = self.cmp_v = self.ks = self.vs = self.sel_idx = self.sel_ok = None
        if "local" in cfg.branches:
            self.k_win, self.v_win = kb[:, :, self.lo:e], vb[:, :, self.lo:e]  # [B,H,<=Q+w,b,d]
            gg = min(cfg.global_blocks, N)
            self.k_glob, self.v_glob = kb[:, :, :gg], vb[:, :, :gg]  # [B,H,g,b,d]
        if cfg.uses_compressed:
            c = cfg.compress_block
            C = N * b // c
            self.ncv = min(C, ((e - 1) * b) // c)  # summaries visible to the chunk's last block
            if "compressed" in cfg.branches:
                self.cmp_k, self.cmp_v = cmp_k[:, :, :self.ncv], cmp_v[:, :, :self.ncv]  # [B,H,ncv,d]
            if "selected" in cfg.branches and min(cfg.select_topk, C) > 0:
                kk = min(cfg.select_topk, C)
                Q = e - s
                i_blk = torch.arange(s, e, device=qb.device)
                cand = (torch.arange(C, device=qb.device)[None, :] + 1) * c <= i_blk[:, None] * b  # [Q,C]
                imp = selection_scores(self.q[:, :, :, 0], kmin, kmax, cand[None].expand(B, Q, C))
                top = imp.topk(kk, dim=-1)
                self.sel_idx = top.indices  # [B,Q,K]
                self.sel_ok = torch.isfinite(top.values)  # [B,Q,K]
                kc = kb.reshape(B, H, C, c, d)  # [B,H,C,c,d] (views)
                vc = vb.reshape(B, H, C, c, d)
                # contiguous index_select per batch row (a memcpy per block; advanced indexing of a
                # permuted view was ~10x slower): [H,Q*K,c,d] each -> [B,H,Q,K*c,d]
                self.ks = torch.stack([kc[n].index_select(1, self.sel_idx[n].reshape(-1)) for n in range(B)]).view(B, H, Q, kk * c, d)
                self.vs = torch.stack([vc[n].index_select(1, self.sel_idx[n].reshape(-1)) for n in range(B)]).view(B, H, Q, kk * c, d)

    LEAVES = ("q", "g", "k_win", "v_win", "k_glob", "v_glob", "cmp_k", "cmp_v", "ks", "vs")

    def leaves(self) -> list[tuple[str, torch.Tensor]]:
        """Detach the chunk's inputs into fresh leaves that require grad (for the chunk's backward)."""
        out = []
        for name in self.LEAVES:
            t = getattr(self, name)
            if t is not None:
                t = t.detach().requires_grad_()
                setattr(self, name, t)
                out.append((name, t))
        return out


def _chunk_out(ch: _Chunk, cfg: AttentionConfig) -> torch.Tensor:
    """Attention output of the chunk's query blocks -> [B,H,Q,b,d] (q pre-scaled)."""
    q = ch.q
    B, H, Q, b, d = q.shape
    s, e = ch.s, ch.e
    outs = {}
    if "local" in cfg.branches:
        w, g = cfg.window_blocks, cfg.global_blocks
        kw, vw = ch.k_win, ch.v_win
        if ch.pad:
            kw = torch.cat([kw.new_zeros(B, H, ch.pad, b, d), kw], dim=2)  # [B,H,Q+w,b,d]
            vw = torch.cat([vw.new_zeros(B, H, ch.pad, b, d), vw], dim=2)
        G = ch.k_glob.shape[2]
        kparts = [ch.k_glob[:, :, j: j + 1].expand(B, H, Q, b, d) for j in range(G)] + [kw[:, :, m: m + Q] for m in range(w + 1)]
        vparts = [ch.v_glob[:, :, j: j + 1].expand(B, H, Q, b, d) for j in range(G)] + [vw[:, :, m: m + Q] for m in range(w + 1)]
        valid = _local_valid(s, e, cfg, q.device)  # [Q,b,L]
        if G < g:  # fewer blocks than global_blocks: the missing global keys do not exist
            valid = torch.cat([valid[:, :, :G * b], valid[:, :, g * b:]], dim=2)
        kl = torch.cat(kparts, dim=3)  # [B,H,Q,L,d]
        vl = torch.cat(vparts, dim=3)
        sc = torch.matmul(q, kl.transpose(-1, -2))  # [B,H,Q,b,L]
        sc.masked_fill_(~valid, torch.finfo(sc.dtype).min)  # in place: the fresh matmul output
        outs["local"] = torch.matmul(sc.softmax(-1), vl)  # [B,H,Q,b,d]
    if cfg.uses_compressed:
        c = cfg.compress_block
        if "compressed" in cfg.branches:
            ncv = ch.ncv
            q_flat = q.reshape(B, H, Q * b, d)  # [B,H,Q*b,d]
            i_q = torch.arange(s, e, device=q.device).repeat_interleave(b)  # [Q*b] block of each query
            valid = (torch.arange(ncv, device=q.device)[None, :] + 1) * c <= i_q[:, None] * b  # [Q*b,ncv]
            sc = torch.matmul(q_flat, ch.cmp_k.transpose(-1, -2))  # [B,H,Q*b,ncv]
            p = sc.masked_fill_(~valid, torch.finfo(sc.dtype).min).softmax(-1)
            row_ok = (i_q * b >= c).to(p.dtype)[:, None]  # [Q*b,1] any summary visible
            outs["compressed"] = (torch.matmul(p, ch.cmp_v) * row_ok).reshape(B, H, Q, b, d)
        if "selected" in cfg.branches:
            if ch.ks is None:
                outs["selected"] = q.new_zeros(B, H, Q, b, d)
            else:
                ok = ch.sel_ok  # [B,Q,K]
                sc2 = torch.matmul(q, ch.ks.transpose(-1, -2))  # [B,H,Q,b,K*c]
                if not bool(ok.all()):
                    valid2 = ok.repeat_interleave(c, dim=-1)[:, None, :, None, :]  # [B,1,Q,1,K*c]
                    sc2.masked_fill_(~valid2, torch.finfo(sc2.dtype).min)
                row_ok = ok.any(-1).to(sc2.dtype)[:, None, :, None, None]  # [B,1,Q,1,1]
                outs["selected"] = torch.matmul(sc2.softmax(-1), ch.vs) * row_ok  # [B,H,Q,b,d]
    if len(cfg.branches) == 1:
        return outs[cfg.branches[0]]
    gt = ch.g
    return sum(gt[..., n: n + 1] * outs[name] for n, name in enumerate(cfg.branches))


class _BlockSparseFn(torch.autograd.Function):
    """All query chunks in one autograd node.  Each chunk's inputs are cut out as chunk-sized leaves;
    backward runs the chunk's graph and adds the leaves' gradients into slices of dq, dk, dv,
    d(summaries), dgates.  ``recompute``: forward keeps no graph and backward recomputes one chunk at
    a time (memory linear in T); otherwise the chunk graphs are kept (faster at short T)."""

    @staticmethod
    def forward(ctx, qb, kb, vb, cmp_k, cmp_v, gb, kmin, kmax, cfg, recompute):
        B, H, N, b, d = qb.shape
        o = qb.new_empty(B, H, N, b, d)
        ctx.cfg, ctx.recompute, ctx.sel, ctx.graphs = cfg, recompute, [], []
        track = not recompute and any(ctx.needs_input_grad[:6])
        for s in range(0, N, cfg.chunk_blocks):
            e = min(N, s + cfg.chunk_blocks)
            ch = _Chunk(qb, kb, vb, cmp_k, cmp_v, kmin, kmax, gb, s, e, cfg)
            if track:
                leaves = ch.leaves()
                with torch.enable_grad():
                    oc = _chunk_out(ch, cfg)
                ctx.graphs.append((ch, leaves, oc))
                o[:, :, s:e] = oc.detach()
            else:
                o[:, :, s:e] = _chunk_out(ch, cfg)
            ctx.sel.append(ch.sel_idx)
        ctx.has = (cmp_k is not None, gb is not None, kmin is not None)
        ctx.save_for_backward(*(t for t in (qb, kb, vb, cmp_k, cmp_v, gb, kmin, kmax) if t is not None))
        return o

    @staticmethod
    def backward(ctx, go):
        cfg = ctx.cfg
        saved = list(ctx.saved_tensors)
        qb, kb, vb = saved[:3]
        rest = saved[3:]
        has_cmp, has_g, has_bounds = ctx.has
        cmp_k, cmp_v = (rest.pop(0), rest.pop(0)) if has_cmp else (None, None)
        gb = rest.pop(0) if has_g else None
        kmin, kmax = (rest.pop(0), rest.pop(0)) if has_bounds else (None, None)
        B, H, N, b, d = qb.shape
        dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
        dck = None if cmp_k is None else torch.zeros_like(cmp_k)
        dcv = None if cmp_v is None else torch.zeros_like(cmp_v)
        dg = None if gb is None else torch.zeros_like(gb)
        c = cfg.compress_block
        for n_chunk, s in enumerate(range(0, N, cfg.chunk_blocks)):
            e = min(N, s + cfg.chunk_blocks)
            if ctx.graphs:
                ch, leaves, o = ctx.graphs[n_chunk]
            else:
                ch = _Chunk(qb, kb, vb, cmp_k, cmp_v, kmin, kmax, gb, s, e, cfg)
                leaves = ch.leaves()
                with torch.enable_grad():
                    o = _chunk_out(ch, cfg)
            grads = torch.autograd.grad(o, [t for _, t in leaves], go[:, :, s:e], allow_unused=True)
            for (name, _), gr in zip(leaves, grads):
                if gr is None:
                    continue
                if name == "q":
                    dq[:, :, s:e] += gr
                elif name == "g":
                    dg[:, :, s:e] += gr
                elif name in ("k_win", "v_win"):
                    (dk if name == "k_win" else dv)[:, :, ch.lo:e] += gr
                elif name in ("k_glob", "v_glob"):
                    (dk if name == "k_glob" else dv)[:, :, :gr.shape[2]] += gr
                elif name in ("cmp_k", "cmp_v"):
                    (dck if name == "cmp_k" else dcv)[:, :, :gr.shape[2]] += gr
                else:  # selected raw blocks: scatter back to their compressed-block slots
                    C = N * b // c
                    Q, kk = e - s, ch.sel_idx.shape[-1]
                    full = (dk if name == "ks" else dv).view(B, H, C, c, d)  # [B,H,C,c,d]
                    gr = gr.reshape(B, H, Q * kk, c, d)  # [B,H,Q*K,c,d]
                    for n in range(B):
                        full[n].index_add_(1, ch.sel_idx[n].reshape(-1), gr[n])
        ctx.graphs = []
        return dq, dk, dv, dck, dcv, dg, None, None, None, None


# Under autograd, chunk graphs are kept (no recompute) while B*T is at most this many tokens:
# ~0.5 MB per token per layer at the demo sizes, i.e. <= ~100 MB per layer here.
KEEP_GRAPH_MAX_TOKENS = 4096


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig,
                           gates: torch.Tensor | None = None, cmp_weight_k: torch.Tensor | None = None,
                           cmp_weight_v: torch.Tensor | None = None, checkpoint_chunks: bool | None = None) -> torch.Tensor:
    """Block-sparse attention of post-RoPE q, k, v [B, H, T, d] -> [B, H, T, d].

    gates: [B, H, T, len(cfg.branches)] (ignored with one branch).  cmp_weight_*: [compress_block]
    logits of the pooling weights (None: plain mean).  Under autograd each query chunk is recomputed
    in backward when ``checkpoint_chunks`` (default: when B*T > KEEP_GRAPH_MAX_TOKENS); otherwise
    the chunks' graphs are kept from forward.
    """
    B, H, T, d = q.shape
    b = cfg.block_size
    unit = cfg.compress_block if cfg.uses_compressed else b
    Tp = -(-T // unit) * unit
    if Tp != T:  # right-pad to whole blocks; causality keeps the padding invisible to real queries
        pad = (0, 0, 0, Tp - T)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        if gates is not None:
            gates = F.pad(gates, pad)
    N = Tp // b
    qb = (q * (1.0 / math.sqrt(d))).reshape(B, H, N, b, d)  # [B,H,N,b,d], softmax scale folded in
    kb = k.reshape(B, H, N, b, d)
    vb = v.reshape(B, H, N, b, d)
    gb = gates.reshape(B, H, N, b, -1) if gates is not None and len(cfg.branches) > 1 else None  # [B,H,N,b,G]
    cmp_k = cmp_v = kmin = kmax = None
    if cfg.uses_compressed:
        c = cfg.compress_block
        zero = q.new_zeros(c)
        if "compressed" in cfg.branches:
            cmp_k = compress_kv(k, zero if cmp_weight_k is None else cmp_weight_k, c)  # [B,H,C,d]
            cmp_v = compress_kv(v, zero if cmp_weight_v is None else cmp_weight_v, c)
        if "selected" in cfg.branches:
            with torch.no_grad():
                kmin, kmax = key_bounds(k.detach(), c)  # [B,H,C,d] each
    recompute = B * T > KEEP_GRAPH_MAX_TOKENS if checkpoint_chunks is None else checkpoint_chunks
    o = _BlockSparseFn.apply(qb, kb, vb, cmp_k, cmp_v, gb, kmin, kmax, cfg, recompute)  # [B,H,N,b,d]
    return o.reshape(B, H, Tp, d)[:, :, :T]


# ----------------------------------------------------------------------------- dense reference


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig,
                    gates: torch.Tensor | None = None, cmp_weight_k: torch.Tensor | None = None,
                    cmp_weight_v: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention computed with dense T x T masks (for tests at small T)."""
    B, H, T, d = q.shape
    b, w, g, c = cfg.block_size, cfg.window_blocks, cfg.global_blocks, cfg.compress_block
    scale = 1.0 / math.sqrt(d)
    t = torch.arange(T, device=q.device)
    bi = t // b
    outs = {}

    def attend(scores, valid, vals):
        p, _ = _masked_softmax_rows(scores, valid)
        return p @ vals

    if "local" in cfg.branches:
        valid = (t[None, :] <= t[:, None]) & ((bi[None, :] >= bi[:, None] - w) | (bi[None, :] < g))
        outs["local"] = attend(q @ k.transpose(-1, -2) * scale, valid, v)
    if cfg.uses_compressed:
        zero = q.new_zeros(c)
        ck = compress_kv(k, zero if cmp_weight_k is None else cmp_weight_k, c)
        cv = compress_kv(v, zero if cmp_weight_v is None else cmp_weight_v, c)
        C = ck.shape[2]
        j = torch.arange(C, device=q.device)
        valid_c = (j[None, :] + 1) * c <= bi[:, None] * b  # [T,C]
        p, _ = _masked_softmax_rows(q @ ck.transpose(-1, -2) * scale, valid_c)
        if "compressed" in cfg.branches:
            outs["compressed"] = p @ cv
        if "selected" in cfg.branches:
            nb = -(-T // b)
            sel_valid = torch.zeros(B, T, T, dtype=torch.bool, device=q.device)
            kmin, kmax = key_bounds(k.detach(), c)
            for blk in range(nb):
                cand = (j + 1) * c <= blk * b
                if blk == 0 or not cand.any():
                    continue
                kk = min(cfg.select_topk, C)
                qf = q[:, :, blk * b: blk * b + 1].detach() * scale  # [B,H,1,d] the block's first query
                top = selection_scores(qf, kmin, kmax, cand[None, None].expand(B, 1, C))[:, 0].topk(kk, -1)
                rows = bi == blk
                for bb in range(B):
                    for jj, val in zip(top.indices[bb].tolist(), top.values[bb].tolist()):
                        if math.isfinite(val):
                            cols = (t // c) == jj
                            sel_valid[bb][rows[:, None] & cols[None, :]] = True
            outs["selected"] = attend(q @ k.transpose(-1, -2) * scale, sel_valid[:, None], v)
    if len(cfg.branches) == 1:
        return outs[cfg.branches[0]]
    return sum(gates[..., n: n + 1] * outs[name] for n, name in enumerate(cfg.branches))


# ----------------------------------------------------------------------------- module + KV cache


@dataclass
class AttentionCache:
    """Per-layer decode state; every tensor has the batch first so beams can be reordered.

    Local window: a ring buffer of the last (window+1)*b tokens plus the global (first) blocks.
    Compressed / selected paths: compressed summaries and key bounds, the raw K/V (selected blocks
    are gathered from it; only kept when those branches are on) and the current block's selection."""
    length: torch.Tensor  # [B] tokens seen
    ring_k: torch.Tensor  # [B,H,R,d]
    ring_v: torch.Tensor
    ring_pos: torch.Tensor  # [B,R] absolute position per slot, -1 empty
    glob_k: torch.Tensor  # [B,H,G,d]
    glob_v: torch.Tensor
    full_k: torch.Tensor | None = None  # [B,H,cap,d]
    full_v: torch.Tensor | None = None
    cmp_k: torch.Tensor | None = None  # [B,H,capC,d]
    cmp_v: torch.Tensor | None = None
    cmp_kmin: torch.Tensor | None = None  # [B,H,capC,d] channel-wise key bounds per compressed block
    cmp_kmax: torch.Tensor | None = None
    sel_idx: torch.Tensor | None = None  # [B,K] compressed blocks selected for the current query block
    sel_ok: torch.Tensor | None = None  # [B,K] bool

    def reorder(self, idx_B: torch.Tensor, shared_prefix: int = 0) -> None:
        """Keep batch rows idx_B (beam search).  Raw K/V before ``shared_prefix`` are known to be
        equal between a row and its source (same prompt) and are not copied, unless the batch size changes."""
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                continue
            if f.name in ("full_k", "full_v") and shared_prefix and t.shape[0] == idx_B.shape[0]:
                end = int(self.length.max())
                t[:, :, shared_prefix:end] = t[idx_B, :, shared_prefix:end]
            else:
                setattr(self, f.name, t.index_select(0, idx_B))


class BlockSparseAttention(nn.Module):
    """Causal self-attention with the block-sparse pattern of ``block_sparse_attention`` and RoPE."""

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, cfg.d_model, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.n_heads * len(cfg.branches)) if len(cfg.branches) > 1 else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)  # every branch starts at weight 0.5
        if cfg.uses_compressed:
            self.cmp_weight_k = nn.Parameter(torch.zeros(cfg.compress_block))  # softmax -> uniform mean at init
            self.cmp_weight_v = nn.Parameter(torch.zeros(cfg.compress_block))

    # -- projections
    def _qkvg(self, x_BTD: torch.Tensor, pos: torch.Tensor):
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, d = cfg.n_heads, cfg.head_dim
        q, k, v = self.wqkv(x_BTD).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)  # each [B,H,T,d]
        cos, sin = rope_angles(pos, d, cfg.rope_base, x_BTD.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gates = None
        if self.gate is not None:
            gates = torch.sigmoid(self.gate(x_BTD)).view(B, T, H, -1).transpose(1, 2)  # [B,H,T,G]
        return q, k, v, gates

    def _out(self, o_BHTd: torch.Tensor) -> torch.Tensor:
        B, H, T, d = o_BHTd.shape
        return self.wo(o_BHTd.transpose(1, 2).reshape(B, T, H * d))  # [B,T,D]

    def _cmp_w(self):
        if not self.cfg.uses_compressed:
            return None, None
        return self.cmp_weight_k, self.cmp_weight_v

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        T = x_BTD.shape[1]
        q, k, v, gates = self._qkvg(x_BTD, torch.arange(T, device=x_BTD.device))
        wk, wv = self._cmp_w()
        return self._out(block_sparse_attention(q, k, v, self.cfg, gates, wk, wv))

    # -- generation
    @torch.no_grad()
    def prefill(self, x_BTD: torch.Tensor, lengths_B: torch.Tensor, capacity: int) -> tuple[torch.Tensor, AttentionCache]:
        """Full forward over right-padded prefixes (lengths_B real tokens each) and the cache for
        decoding up to ``capacity`` total tokens."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, d, b, c = cfg.n_heads, cfg.head_dim, cfg.block_size, cfg.compress_block
        q, k, v, gates = self._qkvg(x_BTD, torch.arange(T, device=x_BTD.device))
        wk, wv = self._cmp_w()
        y = self._out(block_sparse_attention(q, k, v, cfg, gates, wk, wv))
        R, G = (cfg.window_blocks + 1) * b, cfg.global_blocks * b
        cache = AttentionCache(
            length=lengths_B.clone(), ring_k=k.new_zeros(B, H, R, d), ring_v=k.new_zeros(B, H, R, d),
            ring_pos=torch.full((B, R), -1, dtype=torch.long, device=k.device),
            glob_k=k.new_zeros(B, H, G, d), glob_v=k.new_zeros(B, H, G, d))
        if cfg.uses_compressed:
            cap = max(capacity, T)
            capc = cap // c + 1
            cache.full_k, cache.full_v = k.new_zeros(B, H, cap, d), k.new_zeros(B, H, cap, d)
            cache.cmp_k, cache.cmp_v = k.new_zeros(B, H, capc, d), k.new_zeros(B, H, capc, d)
            cache.cmp_kmin, cache.cmp_kmax = k.new_zeros(B, H, capc, d), k.new_zeros(B, H, capc, d)
            kk = max(1, cfg.select_topk)
            cache.sel_idx = torch.zeros(B, kk, dtype=torch.long, device=k.device)
            cache.sel_ok = torch.zeros(B, kk, dtype=torch.bool, device=k.device)
        qs = q * (1.0 / math.sqrt(d))
        for n in range(B):
            L = int(lengths_B[n])
            g_n = min(G, L)
            cache.glob_k[n, :, :g_n], cache.glob_v[n, :, :g_n] = k[n, :, :g_n], v[n, :, :g_n]
            pos = torch.arange(max(0, L - R), L, device=k.device)
            cache.ring_k[n, :, pos % R], cache.ring_v[n, :, pos % R] = k[n, :, pos], v[n, :, pos]
            cache.ring_pos[n, pos % R] = pos
            if cfg.uses_compressed:
                cache.full_k[n, :, :L], cache.full_v[n, :, :L] = k[n, :, :L], v[n, :, :L]
                nc = L // c
                cache.cmp_k[n, :, :nc] = compress_kv(k[n:n + 1, :, :L], wk, c)[0]
                cache.cmp_v[n, :, :nc] = compress_kv(v[n:n + 1, :, :L], wv, c)[0]
                kmin, kmax = key_bounds(k[n:n + 1, :, :L], c)
                cache.cmp_kmin[n, :, :nc], cache.cmp_kmax[n, :, :nc] = kmin[0], kmax[0]
                if L % b:  # the prefix ends inside a block: its selection came from the block's first query
                    first = (L // b) * b
                    self._select(cache, qs[n:n + 1, :, first:first + 1], torch.tensor([first], device=k.device),
                                 rows=torch.tensor([n], device=k.device))
        return y, cache

    def _select(self, cache: AttentionCache, qs_BH1d: torch.Tensor, pos_B: torch.Tensor, rows: torch.Tensor) -> None:
        """Selection for the query block starting at pos (per row), from that token's query."""
        cfg = self.cfg
        capc = cache.cmp_k.shape[2]
        cand = (torch.arange(capc, device=pos_B.device)[None] + 1) * cfg.compress_block <= pos_B[:, None]
        kk = min(cfg.select_topk, capc)
        top = selection_scores(qs_BH1d, cache.cmp_kmin[rows], cache.cmp_kmax[rows], cand[:, None])[:, 0].topk(kk, dim=-1)
        cache.sel_idx[rows], cache.sel_ok[rows] = top.indices, torch.isfinite(top.values)

    def _cmp_probs(self, qs_BHtd: torch.Tensor, pos_t: torch.Tensor, cmp_k: torch.Tensor) -> torch.Tensor:
        """Compressed-attention probabilities of pre-scaled queries at positions pos -> [B,H,t,C]."""
        cfg = self.cfg
        j = torch.arange(cmp_k.shape[2], device=qs_BHtd.device)
        if pos_t.dim() == 1:
            pos_t = pos_t[None]  # [1 or B, t]
        valid = (j + 1) * cfg.compress_block <= (pos_t // cfg.block_size * cfg.block_size)[..., None]  # [B,t,C]
        sc = torch.matmul(qs_BHtd, cmp_k.transpose(-1, -2))  # [B,H,t,C]
        p, _ = _masked_softmax_rows(sc, valid[:, None].expand_as(sc))
        return p

    @torch.no_grad()
    def step(self, x_B1D: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """Decode one token per row (row n at position cache.length[n]); updates the cache."""
        cfg = self.cfg
        B = x_B1D.shape[0]
        d, b, w, c = cfg.head_dim, cfg.block_size, cfg.window_blocks, cfg.compress_block
        t = cache.length  # [B] position of the new token
        q, k, v, gates = self._qkvg(x_B1D, t[:, None])  # q,k,v [B,H,1,d]; RoPE at per-row positions
        qs = q * (1.0 / math.sqrt(d))
        rows = torch.arange(B, device=t.device)
        R, G = cache.ring_k.shape[2], cache.glob_k.shape[2]
        slot = t % R
        cache.ring_k[rows, :, slot], cache.ring_v[rows, :, slot] = k[:, :, 0], v[:, :, 0]
        cache.ring_pos[rows, slot] = t
        in_g = t < G
        if in_g.any():
            r = rows[in_g]
            cache.glob_k[r, :, t[in_g]], cache.glob_v[r, :, t[in_g]] = k[in_g, :, 0], v[in_g, :, 0]
        blk_start = (t // b) * b  # [B]
        win_start = blk_start - w * b
        outs = {}
        if "local" in cfg.branches:
            keys = torch.cat([cache.glob_k, cache.ring_k], dim=2)  # [B,H,G+R,d]
            vals = torch.cat([cache.glob_v, cache.ring_v], dim=2)
            gpos = torch.arange(G, device=t.device)[None].expand(B, G)  # [B,G]
            valid = torch.cat([(gpos < win_start[:, None]) & (gpos <= t[:, None]),
                               (cache.ring_pos >= win_start[:, None]) & (cache.ring_pos >= 0)], dim=1)  # [B,G+R]
            sc = torch.matmul(qs, keys.transpose(-1, -2))  # [B,H,1,G+R]
            p, _ = _masked_softmax_rows(sc, valid[:, None, None].expand_as(sc))
            outs["local"] = torch.matmul(p, vals)  # [B,H,1,d]
        if cfg.uses_compressed:
            cap = cache.full_k.shape[2]
            if int(t.max()) >= cap:
                raise ValueError(f"KV cache capacity {cap} exceeded: pass a larger capacity to prefill")
            cache.full_k[rows, :, t], cache.full_v[rows, :, t] = k[:, :, 0], v[:, :, 0]
            if "compressed" in cfg.branches:
                ncv = max(1, int(blk_start.max()) // c)
                p = self._cmp_probs(qs, t[:, None], cache.cmp_k[:, :, :ncv])  # [B,H,1,ncv]
                outs["compressed"] = torch.matmul(p, cache.cmp_v[:, :, :ncv])
            if "selected" in cfg.branches:
                new_blk = t % b == 0  # [B] this token opens a query block: it picks the block's selection
                if new_blk.any():
                    r = rows[new_blk]
                    self._select(cache, qs[new_blk], t[new_blk], r)
                kk = cache.sel_idx.shape[1]
                ok = cache.sel_ok  # [B,K]
                tok = (cache.sel_idx[..., None] * c + torch.arange(c, device=t.device)).reshape(B, kk * c)  # [B,K*c]
                tok = tok.clamp(max=cap - 1)
                ks = cache.full_k[rows[:, None], :, tok].permute(0, 2, 1, 3)  # [B,H,K*c,d]
                vs = cache.full_v[rows[:, None], :, tok].permute(0, 2, 1, 3)
                sc = torch.matmul(qs, ks.transpose(-1, -2))  # [B,H,1,K*c]
                valid = ok.repeat_interleave(c, dim=-1)[:, None, None].expand_as(sc)
                p2, _ = _masked_softmax_rows(sc, valid)
                outs["selected"] = torch.matmul(p2, vs)
            # summaries of compressed blocks completed by this token (rare: once per c tokens)
            done = ((t + 1) % c == 0).nonzero().flatten().tolist()
            for n in done:
                j = (int(t[n]) + 1) // c - 1
                wk, wv = self._cmp_w()
                cache.cmp_k[n, :, j] = compress_kv(cache.full_k[n:n + 1, :, j * c:(j + 1) * c], wk, c)[0, :, 0]
                cache.cmp_v[n, :, j] = compress_kv(cache.full_v[n:n + 1, :, j * c:(j + 1) * c], wv, c)[0, :, 0]
                kmin, kmax = key_bounds(cache.full_k[n:n + 1, :, j * c:(j + 1) * c], c)
                cache.cmp_kmin[n, :, j], cache.cmp_kmax[n, :, j] = kmin[0, :, 0], kmax[0, :, 0]
        cache.length = t + 1
        if len(cfg.branches) == 1:
            o = outs[cfg.branches[0]]
        else:
            o = sum(gates[..., n: n + 1] * outs[name] for n, name in enumerate(cfg.branches))
        return self._out(o)
