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
tensor exists.  Queries are processed ``chunk_blocks`` blocks at a time; each branch of a chunk is
one or two calls of a fused (flash-style) attention kernel whose keys are *views*: a query block's
local window is a strided view of the keys that overlaps the next block's, the global blocks and
the summaries are slices; only the selected raw blocks are gathered.  The global keys share the
local softmax through the kernel's log-sum-exp (two calls merged exactly).  One custom autograd
Function covers all chunks; backward replays each call through the kernel's backward with the
kept or recomputed output and log-sum-exp, adding chunk-sized gradients into slices of dq, dk,
dv, so memory and backward work stay linear in T and nothing is padded.

Inference on the CPU (no gradient, fp32/fp64) takes a compiled forward instead
(``core/csrc/attention_cpu.cpp``, built by ``core.ext``; same maths, exact against the dense
reference): one task per (head, group of compress_block/block_size query blocks) runs every branch
with direct BLAS calls on the keys in place and folds the gates into the softmax probabilities.
Training keeps the path above.

Legend: B batch, H heads, T tokens, N key blocks, Q query blocks in a chunk, b block size,
d head dim, C compressed blocks, K top-k, L local keys per query block, R ring-buffer slots.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from core import ext
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
    rope_fraction: float = 1.0  # < 1: the slowest pairs stay unrotated (partial RoPE, core.rope)

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
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction must be in [0, 1] (the share of rotated pairs), got {self.rope_fraction}")

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


def _pool(k_BHTd: torch.Tensor, w_c: torch.Tensor, c: int) -> torch.Tensor:
    """Weighted sums of the complete c-token blocks with weights w [c] -> [B, H, T//c, d]: one
    [c] @ [n, c, d] per (batch, head) row over views (a 5-D matmul or einsum would first copy the
    whole of k into a permuted layout)."""
    B, H, T, d = k_BHTd.shape
    n = T // c
    kf = k_BHTd.reshape(B * H, T, d)  # [BH,T,d] (a view for contiguous k)
    return torch.stack([torch.matmul(w_c, kf[r, : n * c].reshape(n, c, d)) for r in range(B * H)]).view(B, H, n, d)


def _pool_backward(ds_BHnd: torch.Tensor, kf_BHTd: torch.Tensor, w_c: torch.Tensor, dk_BHTd: torch.Tensor, c: int) -> torch.Tensor:
    """Backward of ``_pool`` on flat [BH, ...] tensors: adds w_j * ds into the pooled rows of dk
    (in place) and returns the gradient of w [c]."""
    BH, n, d = ds_BHnd.shape
    dk_blocks = dk_BHTd[:, : n * c].view(BH, n, c, d)  # [BH,n,c,d] view
    dk_blocks.addcmul_(w_c.view(1, 1, c, 1), ds_BHnd[:, :, None, :])
    dw = w_c.new_zeros(c)
    for r in range(BH):  # [n,c,d] @ [n,d,1] -> [n,c,1], summed over blocks
        dw += torch.matmul(kf_BHTd[r, : n * c].view(n, c, d), ds_BHnd[r, :, :, None]).sum((0, 2))
    return dw


def compress_kv(k_BHTd: torch.Tensor, weight_c: torch.Tensor, c: int) -> torch.Tensor:
    """Summaries of the complete c-token blocks: softmax(weight)-weighted mean -> [B, H, T//c, d]."""
    return _pool(k_BHTd, weight_c.softmax(0).to(k_BHTd.dtype), c)


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


# Every attention call below goes through PyTorch's fused CPU attention kernel (flash-style: scores
# are formed tile by tile in cache and never stored; it returns the row log-sum-exp, which lets
# two key sets that share one softmax be computed apart and merged exactly, and its backward
# takes the merged output and log-sum-exp).  Off the CPU the same maths runs as plain matmuls.
try:  # private ops of torch (the pinned version has them); without them the plain path runs
    _FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    _FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    FUSED_CPU = True  # tests turn it off to check the plain-matmul path against the fused one
except (AttributeError, RuntimeError):  # pragma: no cover - other torch builds
    _FLASH_FWD = _FLASH_BWD = None
    FUSED_CPU = False


def _fused(x: torch.Tensor) -> bool:
    return FUSED_CPU and x.device.type == "cpu"


def _attn_fwd(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v and the row log-sum-exp: q [..., M, d], k/v [..., S, d],
    mask additive [M, S] (or broadcastable) or None -> ([..., M, d], [..., M]).  Every row must
    have at least one key (callers never build a fully masked row)."""
    if _fused(q):
        if q.dim() == 3:  # [BH,M,d]: the kernel wants [batch, heads, M, d]
            o, lse = _FLASH_FWD(q[None], k[None], v[None], 0.0, False, attn_mask=mask, scale=scale)
            return o[0], lse[0]
        return _FLASH_FWD(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    acc = torch.promote_types(q.dtype, torch.float32)  # scores and statistics at least fp32 (bf16 inputs)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc).mul_(scale)  # [...,M,S]
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse


def _attn_bwd(do, q, k, v, o, lse, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v for one key set of a softmax whose (merged) output is o and row
    log-sum-exp lse: the flash backward, which is exact per key set when given the merged o, lse."""
    if _fused(q):
        if q.dim() == 3:
            return tuple(g[0] for g in _FLASH_BWD(do[None], q[None], k[None], v[None], o[None], lse[None], 0.0, False,
                                                  attn_mask=mask, scale=scale))
        return _FLASH_BWD(do, q, k, v, o, lse, 0.0, False, attn_mask=mask, scale=scale)
    acc = torch.promote_types(q.dtype, torch.float32)  # as _attn_fwd: fp32 scores, bf16 matmul inputs
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc).mul_(scale)  # [...,M,S]
    if mask is not None:
        s = s + mask
    p = torch.exp(s - lse.to(acc)[..., None])  # [...,M,S]
    do = do.to(v.dtype)
    dv = torch.matmul(p.to(do.dtype).transpose(-1, -2), do)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)).to(acc) - (do.to(acc) * o.to(acc)).sum(-1, keepdim=True)) * scale
    return torch.matmul(ds.to(k.dtype), k), torch.matmul(ds.to(q.dtype).transpose(-1, -2), q), dv


class _Part:
    """One attention call: queries of token rows [r0, r1) against one key set.  ``sink(grads, dk,
    dv)`` adds the key/value gradients of the call into the full gradient tensors."""
    __slots__ = ("r0", "r1", "q", "k", "v", "mask", "sink", "sel")

    def __init__(self, r0, r1, q, k, v, mask, sink, sel=None):
        self.r0, self.r1, self.q, self.k, self.v, self.mask, self.sink = r0, r1, q, k, v, mask, sink
        self.sel = sel  # selected branch: (ix [B,Q*K], ok [B,Q,K]) for the grouped backward


def _prefix_sink(n: int, summaries: bool = False):
    """A sink adding a call's key/value gradients into the first n rows of dk, dv (or of the
    summaries' gradients): for keys that are a leading slice."""
    def sink(grads, dk, dv):
        gk, gv = (grads.dck, grads.dcv) if summaries else (grads.dk, grads.dv)
        gk[:, :n] += dk
        gv[:, :n] += dv
    return sink


def _tail_causal_mask(pre: int, lq: int, dtype, device, cache: dict) -> torch.Tensor:
    """Additive mask [lq, pre + lq]: the first ``pre`` keys are visible to every query, the last
    lq keys causally (query r sees key pre + j iff j <= r)."""
    key = (pre, lq)
    if key not in cache:
        m = torch.zeros(lq, pre + lq, dtype=dtype, device=device)
        m[:, pre:] = torch.full((lq, lq), float("-inf"), dtype=dtype, device=device).triu(1)
        cache[key] = m
    return cache[key]


def _by_choice(choice: torch.Tensor, good: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """The positions of one batch row's selections grouped by chosen compressed block: choice,
    good [M] -> [(j, ascending positions whose choice is j)], positions not ``good`` left out."""
    pos = good.nonzero().flatten()
    chosen = choice[pos]
    order = chosen.argsort(stable=True)
    js, counts = torch.unique_consecutive(chosen[order], return_counts=True)
    return list(zip(js.tolist(), pos[order].split(counts.tolist())))


class _Plan:
    """What one call of the kernel reads, as flat [B*H, T, d] tensors (q, k, v, the summaries),
    and how each query chunk splits into attention calls.  Built once per forward and again for
    backward; every call's key set is a view (the window of a query block is a strided view of
    the keys, overlapping the next block's) except the selected blocks, which are gathered."""

    def __init__(self, q, k, v, cmp_k, cmp_v, kmin, kmax, cfg: AttentionConfig, sel: list | None = None):
        B, H, T, d = q.shape
        self.B, self.H, self.T, self.d, self.cfg = B, H, T, d, cfg
        self.scale = 1.0 / math.sqrt(d)
        self.qf, self.kf, self.vf = (x.reshape(B * H, T, d) for x in (q, k, v))  # [BH,T,d] views
        b, c = cfg.block_size, cfg.compress_block
        self.N, self.Nf = -(-T // b), T // b  # blocks, complete blocks
        self.C = T // c if cfg.uses_compressed else 0
        self.cmp_kf = None if cmp_k is None else cmp_k.reshape(B * H, -1, d)  # [BH,C,d]
        self.cmp_vf = None if cmp_v is None else cmp_v.reshape(B * H, -1, d)
        self.kmin, self.kmax = kmin, kmax
        self.sel = [] if sel is None else sel  # per chunk: (idx [B,Q,K], ok [B,Q,K]) of its selecting blocks, or None
        self.masks: dict = {}
        self._bufs = None

    def chunks(self):
        cb = self.cfg.chunk_blocks
        return [(s, min(self.N, s + cb)) for s in range(0, self.N, cb)]

    def segments(self, s: int, e: int):
        """Block runs of uniform query length in blocks s..e-1: (i0, i1, lq)."""
        b = self.cfg.block_size
        out = []
        if min(e, self.Nf) > s:
            out.append((s, min(e, self.Nf), b))
        if e > self.Nf:  # the last block is partial
            out.append((self.Nf, self.Nf + 1, self.T - self.Nf * b))
        return out

    def _blocks(self, xf, i0: int, i1: int, lq: int) -> torch.Tensor:
        """Rows of blocks i0..i1-1 as [BH, Q, lq, d] (lq < b only for the single partial block)."""
        b = self.cfg.block_size
        r0 = i0 * b
        return xf[:, r0: r0 + (i1 - i0 - 1) * b + lq].view(xf.shape[0], i1 - i0, lq, self.d)

    def _window(self, xf, i0: int, i1: int, lq: int) -> torch.Tensor:
        """Keys of blocks i-w..i (the own block's first lq) for i in i0..i1-1 -> [BH, Q, w*b+lq, d],
        a strided view whose rows overlap from one query block to the next (no copy)."""
        b, w = self.cfg.block_size, self.cfg.window_blocks
        st = xf.stride()
        return xf.as_strided((xf.shape[0], i1 - i0, w * b + lq, self.d), (st[0], b * st[1], st[1], st[2]),
                             xf.storage_offset() + (i0 - w) * b * st[1])

    # -- branches: each returns groups of parts; the parts of one group share the softmax
    def local(self, s: int, e: int) -> list[list[_Part]]:
        b, w, g = self.cfg.block_size, self.cfg.window_blocks, self.cfg.global_blocks
        qf, kf, vf = self.qf, self.kf, self.vf
        groups = []
        for i0, i1, lq in self.segments(s, e):
            # blocks before w+g: global and window keys together are the prefix [0, own token]
            for i in range(i0, min(i1, w + g)):
                r0, pre = i * b, i * b
                mask = _tail_causal_mask(pre, lq, qf.dtype, qf.device, self.masks)
                groups.append([_Part(r0, r0 + lq, qf[:, r0: r0 + lq], kf[:, :pre + lq], vf[:, :pre + lq], mask,
                                     _prefix_sink(pre + lq))])
            j0 = max(i0, w + g)
            if j0 >= i1:
                continue
            r0, r1 = j0 * b, j0 * b + (i1 - j0 - 1) * b + lq
            mask = _tail_causal_mask(w * b, lq, qf.dtype, qf.device, self.masks)

            def sink_win(grads, dk, dv, j0=j0, i1=i1, lq=lq):
                # dk [BH,Q,w*b+lq,d]: slot m of query block i holds key block i-w+m
                Q = i1 - j0
                for m in range(w + 1):
                    n = b if m < w else lq
                    a = (j0 - w + m) * b
                    grads.dk[:, a: a + (Q - 1) * b + n].view(-1, Q, n, self.d).add_(dk[:, :, m * b: m * b + n])
                    grads.dv[:, a: a + (Q - 1) * b + n].view(-1, Q, n, self.d).add_(dv[:, :, m * b: m * b + n])
            group = [_Part(r0, r1, self._blocks(qf, j0, i1, lq), self._window(kf, j0, i1, lq), self._window(vf, j0, i1, lq), mask, sink_win)]
            if g:
                group.append(_Part(r0, r1, qf[:, r0:r1], kf[:, :g * b], vf[:, :g * b], None, _prefix_sink(g * b)))
            groups.append(group)
        return groups

    def compressed(self, s: int, e: int) -> list[list[_Part]]:
        b, c = self.cfg.block_size, self.cfg.compress_block
        r0, r1 = max(s * b, c), min(e * b, self.T)  # rows whose block starts at or after the first summary's end
        if r0 >= r1:
            return []
        ncv = min(self.C, ((r1 - 1) // b * b) // c)  # summaries visible to the chunk's last row
        nvis = (torch.arange(r0, r1, device=self.qf.device) // b * b // c).clamp(max=self.C)  # [rows]
        mask = None
        if int(nvis[0]) < ncv:
            j = torch.arange(ncv, device=self.qf.device)
            mask = torch.zeros(r1 - r0, ncv, dtype=self.qf.dtype, device=self.qf.device).masked_fill_(j[None] >= nvis[:, None], float("-inf"))
        return [[_Part(r0, r1, self.qf[:, r0:r1], self.cmp_kf[:, :ncv], self.cmp_vf[:, :ncv], mask,
                       _prefix_sink(ncv, summaries=True))]]

    def _selection(self, i0: int, i1: int):
        """Top-k compressed blocks of query blocks i0..i1-1, chosen by each block's first query."""
        cfg, b, c = self.cfg, self.cfg.block_size, self.cfg.compress_block
        kk = min(cfg.select_topk, self.C)
        q4 = self.qf.view(self.B, self.H, self.T, self.d)
        qs = q4[:, :, i0 * b: min(i1 * b, self.T): b] * self.scale  # [B,H,Q,d] first query of each block
        i_blk = torch.arange(i0, i1, device=qs.device)
        cand = (torch.arange(self.C, device=qs.device)[None, :] + 1) * c <= i_blk[:, None] * b  # [Q,C]
        top = selection_scores(qs, self.kmin, self.kmax, cand[None].expand(self.B, i1 - i0, self.C)).topk(kk, dim=-1)
        return top.indices, torch.isfinite(top.values)  # [B,Q,K] each

    def selected(self, s: int, e: int, n_chunk: int, gather: bool = True) -> list[list[_Part]]:
        b, c = self.cfg.block_size, self.cfg.compress_block
        i_first = max(s, c // b)  # blocks before it have no complete compressed block behind them
        if self.C == 0 or i_first >= e:
            if len(self.sel) <= n_chunk:
                self.sel.append(None)
            return []
        if len(self.sel) <= n_chunk:
            self.sel.append(self._selection(i_first, e))
        idx, ok = self.sel[n_chunk]
        B, H, d, kk = self.B, self.H, self.d, idx.shape[-1]
        Cc = self.C * c
        groups = []
        for i0, i1, lq in self.segments(i_first, e):
            a, z = i0 - i_first, i1 - i_first
            Q = i1 - i0
            ix = idx[:, a:z].reshape(B, Q * kk)  # [B,Q*K]
            r0 = i0 * b
            if not gather:  # backward: selected_backward reads the chosen blocks in place
                groups.append([_Part(r0, r0 + (Q - 1) * b + lq, self._blocks(self.qf, i0, i1, lq), None, None, None,
                                     None, sel=(ix, ok[:, a:z]))])
                continue
            ks, vs = self._gather_buffers(Q * kk, a * kk)  # [BH,Q*K,c,d] each, reused across chunks
            for r in range(B * H):  # contiguous per-row gathers straight into the buffer
                torch.index_select(self.kf[r, :Cc].view(self.C, c, d), 0, ix[r // H], out=ks[r])
                torch.index_select(self.vf[r, :Cc].view(self.C, c, d), 0, ix[r // H], out=vs[r])
            mask = None
            if not bool(ok[:, a:z].all()):
                m = torch.zeros(B, 1, Q, 1, kk, dtype=ks.dtype, device=ks.device).masked_fill_(~ok[:, None, a:z, None, :], float("-inf"))
                mask = m.expand(B, H, Q, 1, kk).repeat_interleave(c, dim=-1).reshape(B * H, Q, 1, kk * c)
            groups.append([_Part(r0, r0 + (Q - 1) * b + lq, self._blocks(self.qf, i0, i1, lq),
                                 ks.view(B * H, Q, kk * c, d), vs.view(B * H, Q, kk * c, d), mask, None)])
        return groups

    def _gather_buffers(self, n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices [offset, offset+n) of two [BH, chunk_blocks*K, c, d] buffers allocated once per
        plan: the selected blocks of one chunk are consumed before the next chunk is gathered, and
        a fresh multi-MB buffer per chunk costs its page faults every time."""
        if self._bufs is None:
            cfg = self.cfg
            shape = (self.B * self.H, cfg.chunk_blocks * min(cfg.select_topk, self.C), cfg.compress_block, self.d)
            self._bufs = (self.kf.new_empty(shape), self.kf.new_empty(shape))
        return self._bufs[0][:, offset: offset + n], self._bufs[1][:, offset: offset + n]

    def selected_backward(self, p: _Part, og, lg, go, grads) -> None:
        """Backward of one selected-branch call without gathering: the query blocks that chose
        the same compressed block (per batch row) go through one flash backward against that
        block's keys in place, whose gradient is added straight into its rows of dk and dv.
        Each (query block, chosen block) pair is one key set of the block's softmax, so the
        kernel's backward with the merged output and log-sum-exp is exact per pair.
        og/lg/go: [BH, rows, d] / [BH, rows] / [BH, rows, d] for the call's rows."""
        b, c, H = self.cfg.block_size, self.cfg.compress_block, self.H
        ix, ok = p.sel
        Q, kk = ok.shape[1], ok.shape[2]
        lq = (p.r1 - p.r0) - (Q - 1) * b
        ar = torch.arange(lq, device=og.device)
        for n in range(self.B):
            hs = slice(n * H, (n + 1) * H)
            for j, picks in _by_choice(ix[n], ok[n].reshape(-1)):
                rows = ((picks // kk)[:, None] * b + ar).reshape(-1)  # [m*lq] call rows of the query blocks that chose j
                take = lambda t: t[hs].index_select(1, rows)  # noqa: E731
                dq, dk, dv = _attn_bwd(take(go), self.qf[hs, p.r0:p.r1].index_select(1, rows), self.kf[hs, j * c:(j + 1) * c],
                                       self.vf[hs, j * c:(j + 1) * c], take(og), take(lg), None, self.scale)
                grads.dq[hs, p.r0:p.r1].index_add_(1, rows, dq)
                grads.dk[hs, j * c:(j + 1) * c] += dk
                grads.dv[hs, j * c:(j + 1) * c] += dv

    def selected_by_block(self, of: torch.Tensor, gf: torch.Tensor | None, n_branch: int) -> None:
        """Inference, ``select_topk`` 1: the selected branch of the whole sequence at once, grouped
        by chosen block.  The query blocks (of one batch row) that chose compressed block j are
        gathered and attend to j's raw keys in place, one kernel call per chosen block, and the
        (gated) output is added into their rows of ``of`` [BH, T, d].  Against the per-chunk path
        it copies a block's 64 queries instead of its c chosen keys and values, and the kernel
        gets one longer query run per chosen block (bigger tiles) instead of one 64-row block."""
        b, c, H, T = self.cfg.block_size, self.cfg.compress_block, self.H, self.T
        i_first = c // b  # blocks before it have no complete compressed block behind them
        if self.C == 0 or i_first >= self.N:
            return
        idx, ok = self._selection(i_first, self.N)  # [B,Q,1] each
        ar = torch.arange(b, device=of.device)
        for n in range(self.B):
            hs = slice(n * self.H, (n + 1) * self.H)
            q_n, o_n = self.qf[hs], of[hs]  # [H,T,d] views
            g_n = None if gf is None else gf[hs, :, n_branch]  # [H,T]
            for j, picks in _by_choice(idx[n, :, 0], ok[n, :, 0]):
                blk_j = picks + i_first  # the query blocks that chose j
                rows = (blk_j[:, None] * b + ar).reshape(-1)  # [m*b] their rows
                if int(blk_j[-1]) == self.N - 1 and T % b:  # the partial last block
                    rows = rows[rows < T]
                og, _ = _attn_fwd(q_n.index_select(1, rows), self.kf[hs, j * c:(j + 1) * c],
                                  self.vf[hs, j * c:(j + 1) * c], None, self.scale)  # [H,m*b,d]
                if g_n is not None:
                    og.mul_(g_n.index_select(1, rows)[..., None])
                o_n.index_add_(1, rows, og)

    def branch(self, name: str, s: int, e: int, n_chunk: int, gather: bool = True) -> list[list[_Part]]:
        if name == "local":
            return self.local(s, e)
        if name == "compressed":
            return self.compressed(s, e)
        return self.selected(s, e, n_chunk, gather)


def _group_forward(plan: _Plan, group: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [BH, rows, d] and log-sum-exp [BH, rows] of one softmax over the group's key sets."""
    BH, d = plan.qf.shape[0], plan.d
    o = lse = None
    for p in group:
        op, lp = _attn_fwd(p.q, p.k, p.v, p.mask, plan.scale)
        op, lp = op.reshape(BH, -1, d), lp.reshape(BH, -1)  # [BH,rows,d], [BH,rows]
        if o is None:
            o, lse = op, lp
        else:  # merge two key sets of one softmax by their log-sum-exps (o is a fresh kernel output)
            new = torch.logaddexp(lse, lp)
            o = o.mul_((lse - new).exp_()[..., None]).addcmul_(op, (lp - new).exp_()[..., None])
            lse = new
    return o, lse


class _Grads:
    __slots__ = ("dq", "dk", "dv", "dck", "dcv")

    def __init__(self, plan: _Plan):
        self.dq, self.dk, self.dv = (torch.zeros_like(x) for x in (plan.qf, plan.kf, plan.vf))
        self.dck = None if plan.cmp_kf is None else torch.zeros_like(plan.cmp_kf)
        self.dcv = None if plan.cmp_vf is None else torch.zeros_like(plan.cmp_vf)


class _BlockSparseFn(torch.autograd.Function):
    """All query chunks in one autograd node.  Forward writes the gated sum of the branches straight
    into the output; backward replays each chunk's attention calls through the flash backward with
    the stored (or, with ``recompute``, recomputed) output and log-sum-exp of every softmax, and
    adds the calls' gradients into slices of dq, dk, dv, d(summaries) and dgates."""

    @staticmethod
    def forward(ctx, q, k, v, wk, wv, gates, kmin, kmax, cfg, recompute, grad):
        B, H, T, d = q.shape
        # summaries of the complete compressed blocks, computed here so that their gradient goes
        # straight into dk/dv in backward (no full-size gradient per summary path)
        cmp_k = None if wk is None else _pool(k, wk, cfg.compress_block)  # [B,H,C,d]
        cmp_v = None if wv is None else _pool(v, wv, cfg.compress_block)
        plan = _Plan(q, k, v, cmp_k, cmp_v, kmin, kmax, cfg)
        BH, nb = B * H, len(cfg.branches)
        gf = None if gates is None else gates.reshape(BH, T, -1)  # [BH,T,G]
        o = q.new_empty(B, H, T, d)
        of = o.view(BH, T, d)
        # which softmax outputs backward gets from forward instead of recomputing: all of them at
        # short T; always the selected branch's (recomputing it means gathering its K*c raw keys
        # per query block again, the costliest step; keeping it costs one output-sized tensor)
        keep = {name: grad and (not recompute or name in KEEP_WHEN_RECOMPUTING) for name in cfg.branches}
        # inference with one selected block per query block: that branch runs after the chunks,
        # grouped by chosen block (Plan.selected_by_block); with gradients it stays per chunk
        by_block = not grad and "selected" in cfg.branches and cfg.select_topk == 1
        saved = []
        for n_chunk, (s, e) in enumerate(plan.chunks()):
            r0, r1 = s * cfg.block_size, min(e * cfg.block_size, T)
            oc = of[:, r0:r1]
            if cfg.branches[0] != "local":  # local covers every row and writes first; others may not
                oc.zero_()
            for n, name in enumerate(cfg.branches):
                if by_block and name == "selected":
                    continue
                for group in plan.branch(name, s, e, n_chunk):
                    og, lg = _group_forward(plan, group)
                    a, z = group[0].r0, group[0].r1
                    saved.append((og, lg) if keep[name] else None)
                    dst = oc[:, a - r0: z - r0]
                    if nb == 1:
                        dst.copy_(og) if name == "local" else dst.add_(og)
                    elif n == 0 and name == "local":
                        torch.mul(gf[:, a:z, n: n + 1], og, out=dst)
                    else:
                        dst.addcmul_(gf[:, a:z, n: n + 1], og)
        if by_block:
            plan.selected_by_block(of, gf if nb > 1 else None, cfg.branches.index("selected"))
        ctx.cfg, ctx.sel, ctx.saved_groups = cfg, plan.sel, saved if grad else None
        ctx.has = (wk is not None, gates is not None, kmin is not None)
        ctx.save_for_backward(*(t for t in (q, k, v, wk, wv, cmp_k, cmp_v, gates, kmin, kmax) if t is not None))
        return o

    @staticmethod
    def backward(ctx, go):
        cfg = ctx.cfg
        rest = list(ctx.saved_tensors)
        q, k, v = rest[:3]
        rest = rest[3:]
        has_cmp, has_g, has_bounds = ctx.has
        wk, wv, cmp_k, cmp_v = (rest.pop(0), rest.pop(0), rest.pop(0), rest.pop(0)) if has_cmp else (None,) * 4
        gates = rest.pop(0) if has_g else None
        kmin, kmax = (rest.pop(0), rest.pop(0)) if has_bounds else (None, None)
        B, H, T, d = q.shape
        BH, nb = B * H, len(cfg.branches)
        plan = _Plan(q, k, v, cmp_k, cmp_v, kmin, kmax, cfg, sel=ctx.sel)
        grads = _Grads(plan)
        gof = go.reshape(BH, T, d)
        gf = None if gates is None else gates.reshape(BH, T, -1)
        dg = None if gates is None else torch.zeros_like(gf)
        stored = iter(ctx.saved_groups)
        for n_chunk, (s, e) in enumerate(plan.chunks()):
            for n, name in enumerate(cfg.branches):
                for group in plan.branch(name, s, e, n_chunk, gather=False):
                    kept = next(stored)
                    og, lg = kept if kept is not None else _group_forward(plan, group)
                    a, z = group[0].r0, group[0].r1
                    go_g = gof[:, a:z]  # [BH,rows,d]
                    if nb > 1:
                        dg[:, a:z, n] += (go_g * og).sum(-1)
                        go_g = go_g * gf[:, a:z, n: n + 1]
                    if group[0].sel is not None:
                        plan.selected_backward(group[0], og, lg, go_g, grads)
                        continue
                    for p in group:
                        shape = p.q.shape
                        dq_p, dk_p, dv_p = _attn_bwd(go_g.reshape(shape), p.q, p.k, p.v, og.reshape(shape),
                                                     lg.reshape(shape[:-1]), p.mask, plan.scale)
                        grads.dq[:, a:z] += dq_p.reshape(BH, z - a, d)
                        p.sink(grads, dk_p, dv_p)
        dwk = dwv = None  # (saved_groups stay: backward may run again with retain_graph, as Grad-CAM does)
        if has_cmp:  # summaries -> the keys/values they pool and the pooling weights
            dwk = _pool_backward(grads.dck, plan.kf, wk, grads.dk, cfg.compress_block)
            dwv = _pool_backward(grads.dcv, plan.vf, wv, grads.dv, cfg.compress_block)
        view = lambda t, like: None if t is None else t.view(like.shape)  # noqa: E731
        return (view(grads.dq, q), view(grads.dk, k), view(grads.dv, v), dwk, dwv, view(dg, gates),
                None, None, None, None, None)


# Under autograd, each softmax's output and log-sum-exp are kept from forward (no recompute in
# backward) while B*T is at most this many tokens: (branches x (d + 1)) floats per token and head,
# ~50 MB per layer at the demo sizes; above it backward recomputes the local and compressed ones
# chunk by chunk.  Keeping them measured ~10 % faster at B=8, T=1024 (0.28 vs 0.32 s, one layer).
KEEP_GRAPH_MAX_TOKENS = 16384
# Branches whose softmax outputs are kept from forward even above that size (the others are
# recomputed chunk by chunk in backward), one output-sized tensor each: the selected branch's
# recompute would gather its raw key blocks again, the costliest step; keeping the local one too
# measured 2.30 -> 2.07 s for forward+backward at 100K tokens, extra memory 0.20 -> 0.29 GB
# (session 11; all three: 2.01 s, 0.40 GB, at the bar's limit).
KEEP_WHEN_RECOMPUTING: tuple[str, ...] = ("selected", "local")


# Inference on the CPU (fp32/fp64, no gradient) runs every branch in one compiled pass
# (core/csrc/attention_cpu.cpp, built by core.ext; the same maths as _BlockSparseFn.forward, one
# task per head and group of query blocks, keys read in place, the gates folded into the probabilities).
# Tests turn it off to compare the two paths; MEDREPORT_NO_EXT=1 turns it off for a process.
COMPILED_CPU = True


def compiled_available(q: torch.Tensor | None = None) -> bool:
    """Whether inference on ``q`` (or on fp32 CPU tensors) takes the compiled forward."""
    if not COMPILED_CPU or (q is not None and (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64))):
        return False
    return ext.ops() is not None


def _compiled_forward(q, k, v, cfg: AttentionConfig, gates, wk, wv, kmin, kmax) -> torch.Tensor:
    """block_sparse_attention's inference through the compiled op; arguments as prepared there."""
    B, H, T, d = q.shape
    b, c = cfg.block_size, cfg.compress_block
    cmp_k = None if wk is None else _pool(k, wk, c).reshape(B * H, -1, d)  # [BH,C,d]
    cmp_v = None if wv is None else _pool(v, wv, c).reshape(B * H, -1, d)
    sel_idx = sel_ok = None
    if kmin is not None and T // c and c // b < -(-T // b):  # query blocks with a compressed block behind them
        plan = _Plan(q, k, v, None, None, kmin, kmax, cfg)
        sel_idx, sel_ok = plan._selection(c // b, plan.N)  # [B,Q,K] each
        sel_idx, sel_ok = sel_idx.contiguous(), sel_ok.contiguous()
    gf = None if gates is None else gates.to(q.dtype).reshape(B * H, T, -1).contiguous()  # [BH,T,G]
    o = ext.ops().bsa_forward(q.reshape(B * H, T, d), k.reshape(B * H, T, d), v.reshape(B * H, T, d), cmp_k, cmp_v,
                              sel_idx, sel_ok, gf, H, b, cfg.window_blocks, cfg.global_blocks, c,
                              [BRANCHES.index(n) for n in cfg.branches], 1.0 / math.sqrt(d))  # [BH,T,d]
    return o.view(B, H, T, d)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig,
                           gates: torch.Tensor | None = None, cmp_weight_k: torch.Tensor | None = None,
                           cmp_weight_v: torch.Tensor | None = None, checkpoint_chunks: bool | None = None) -> torch.Tensor:
    """Block-sparse attention of post-RoPE q, k, v [B, H, T, d] -> [B, H, T, d].

    gates: [B, H, T, len(cfg.branches)] (ignored with one branch).  cmp_weight_*: [compress_block]
    logits of the pooling weights (None: plain mean).  Under autograd the softmax outputs are
    recomputed chunk by chunk in backward when ``checkpoint_chunks`` (default: when
    B*T > KEEP_GRAPH_MAX_TOKENS); otherwise they are kept from forward.  Any T works: no padding.
    """
    B, H, T, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gates = gates.to(q.dtype).contiguous() if gates is not None and len(cfg.branches) > 1 else None
    wk = wv = kmin = kmax = None
    if cfg.uses_compressed and T >= cfg.compress_block:
        c = cfg.compress_block
        if "compressed" in cfg.branches:  # pooling weights (uniform without learned logits)
            wk, wv = ((q.new_full((c,), 1.0 / c) if w is None else w.softmax(0).to(q.dtype)) for w in (cmp_weight_k, cmp_weight_v))
        if "selected" in cfg.branches:
            with torch.no_grad():
                kmin, kmax = key_bounds(k.detach(), c)  # [B,H,C,d] each
    recompute = B * T > KEEP_GRAPH_MAX_TOKENS if checkpoint_chunks is None else checkpoint_chunks
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, wk, wv, gates))
    if not grad and compiled_available(q):
        return _compiled_forward(q, k, v, cfg, gates, wk, wv, kmin, kmax)
    # mixed precision: the kernel runs in q's dtype with fp32 softmax statistics of its own, not
    # autocast's per-op choices (which differ between CPU and CUDA); backward runs without autocast
    with torch.autocast(q.device.type, enabled=False):
        return _BlockSparseFn.apply(q, k.to(q.dtype), v.to(q.dtype), wk, wv, gates, kmin, kmax, cfg, recompute, grad)  # [B,H,T,d]


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
        cos, sin = rope_angles(pos, d, cfg.rope_base, x_BTD.dtype, cfg.rope_fraction)
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
            # rows below each prefix length are copied from k/v below; only the rest needs zeros
            cache.full_k, cache.full_v = k.new_empty(B, H, cap, d), k.new_empty(B, H, cap, d)
            cache.cmp_k, cache.cmp_v = k.new_zeros(B, H, capc, d), k.new_zeros(B, H, capc, d)
            cache.cmp_kmin, cache.cmp_kmax = k.new_zeros(B, H, capc, d), k.new_zeros(B, H, capc, d)
            kk = max(1, cfg.select_topk)
            cache.sel_idx = torch.zeros(B, kk, dtype=torch.long, device=k.device)
            cache.sel_ok = torch.zeros(B, kk, dtype=torch.bool, device=k.device)
        for n in range(B):
            L = int(lengths_B[n])
            g_n = min(G, L)
            cache.glob_k[n, :, :g_n], cache.glob_v[n, :, :g_n] = k[n, :, :g_n], v[n, :, :g_n]
            pos = torch.arange(max(0, L - R), L, device=k.device)
            cache.ring_k[n, :, pos % R], cache.ring_v[n, :, pos % R] = k[n, :, pos], v[n, :, pos]
            cache.ring_pos[n, pos % R] = pos
            if cfg.uses_compressed:
                cache.full_k[n, :, :L], cache.full_v[n, :, :L] = k[n, :, :L], v[n, :, :L]
                cache.full_k[n, :, L:].zero_()
                cache.full_v[n, :, L:].zero_()
                nc = L // c
                cache.cmp_k[n, :, :nc] = compress_kv(k[n:n + 1, :, :L], wk, c)[0]
                cache.cmp_v[n, :, :nc] = compress_kv(v[n:n + 1, :, :L], wv, c)[0]
                kmin, kmax = key_bounds(k[n:n + 1, :, :L], c)
                cache.cmp_kmin[n, :, :nc], cache.cmp_kmax[n, :, :nc] = kmin[0], kmax[0]
                if L % b:  # the prefix ends inside a block: its selection came from the block's first query
                    first = (L // b) * b
                    self._select(cache, q[n:n + 1, :, first:first + 1] * (1.0 / math.sqrt(d)), torch.tensor([first], device=k.device),
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
