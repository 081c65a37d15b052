"""Mixture-of-Experts feed-forward: top-k routing over SwiGLU experts, dropless sort-based dispatch.

Tokens are sorted by their assigned expert so each expert runs one dense matmul chain on a
contiguous slice (a loop over experts, never over tokens); outputs are weighted and summed back
with ``index_add_``.  Inference picks by size (``MoEConfig.dispatch="auto"``, thresholds measured
at the bench.moe configuration): at 1-2 tokens (N*K <= E/4) the chosen experts' weights are
gathered and run as batched matmuls ("gather": one token's two experts read what a dense FFN of
the same width reads); up to N <= E/2 (8 tokens) every expert runs on every token in two batched
matmuls, mixed by routing weights that are zero off the top-k ("all": a few tokens x top-2 read
most experts' weights anyway); up to N*K <= 64*E (512 tokens) a zero-padded [E, M, D] batched matmul laid
out without sorting ("padded"); up to ~4K tokens the experts'
matmuls write into shared buffers and the SwiGLU runs once over all rows ("grouped"); above,
one expert at a time without [N*K, D] buffers. The router's inference path skips the full
softmax and the auxiliary loss (they only matter with gradients).  Training uses per-expert slices
(or the zero-padded [E, M, D] bmm at decode sizes).  Balance: Switch-style auxiliary loss (``balance="aux"``) or DeepSeek-V3's
auxiliary-loss-free bias (``balance="bias"``: a non-learned per-expert bias added to the scores
for selection only, nudged by ``update_bias`` after each optimiser step).

On CPU, inference ("auto" or "fused") runs the compiled kernel of ``core/csrc/moe_cpu.cpp``
wherever it builds (``core.ext``): the router's top-k, a counting sort, each expert's GEMMs on one
core (experts spread over the cores), the SwiGLU and the weighted combine in one call, with the
BLAS called directly and a reused workspace. It is exact against the same reference; the paths
above remain for GPUs, autocast, LoRA and machines without a compiler.

Legend: B batch, T tokens, N flattened tokens, D width, E experts, K top-k, F expert hidden.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from core import ext


DISPATCH = ("auto", "loop", "grouped", "padded", "all", "gather", "fused")

# Tokens per pass of the fused CPU kernel: bounds its per-thread workspace (2 x 4096 x K rows of
# width D and 2F: 16 MB at the demo sizes) and keeps a pass's rows in cache; measured best of
# 1K-16K at 16K tokens (runs/s16/moe_cmp.py).
FUSED_CHUNK = 4096


def fused_available() -> bool:
    """Whether the compiled CPU kernel (core/csrc/moe_cpu.cpp) is built and loaded."""
    return ext.ops() is not None


@dataclass
class MoEConfig:
    d_model: int = 256
    n_experts: int = 16
    top_k: int = 2
    d_expert: int = 256
    n_shared: int = 0  # shared experts (each of width d_expert) applied to every token
    balance: str = "aux"  # "aux" | "bias"
    aux_loss_coef: float = 0.01
    bias_update_rate: float = 1e-3
    # "auto" | "loop" (per-expert slices) | "grouped" (per-expert matmuls into shared buffers,
    # elementwise work once; inference) | "padded" (one bmm over experts) | "all" (every expert on
    # every token, mixed by the sparse routing weights; inference) | "gather" (the chosen experts'
    # weights gathered; inference at 1-2 tokens) | "fused" (the compiled CPU kernel of core/csrc,
    # inference; "auto" picks it on CPU wherever it is built, see core.ext)
    dispatch: str = "auto"
    fused_kernel: bool = True  # False: "auto" keeps to the PyTorch paths (bench.moe compares both)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError("need 1 <= top_k <= n_experts")
        if self.balance not in ("aux", "bias"):
            raise ValueError("balance must be 'aux' or 'bias'")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {', '.join(DISPATCH)}, got {self.dispatch!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward (shared expert; the dense baseline in bench.moe)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """forward(x_BTD) -> (y_BTD, aux) with aux = {"aux_loss": scalar, "expert_load": [E] fractions}."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D, Fh = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.router = nn.Linear(D, E, bias=False)
        # Stacked expert weights (x @ w); gate and up projections fused: one matmul per expert.
        self.w13 = nn.Parameter(torch.empty(E, D, 2 * Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))
        for w, fan_in in ((self.w13, D), (self.w2, Fh)):
            nn.init.normal_(w, std=fan_in ** -0.5)
        self.shared = SwiGLU(D, cfg.n_shared * Fh) if cfg.n_shared else None
        self.register_buffer("route_bias", torch.zeros(E), persistent=True)
        self.lora: nn.Module | None = None  # core.lora.ExpertLoRA: (e, which, x_slice) -> delta

    def route(self, x_ND: torch.Tensor, need_probs: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (weights [N,K], expert ids [N,K], router probabilities [N,E] or None).

        ``need_probs=False`` (inference: the probabilities only feed the auxiliary loss) takes the
        top-k of the logits and a softmax over those k only: the same weights as renormalising the
        top-k of the full softmax, without the [N,E] softmax and division."""
        logits = self.router(x_ND)  # [N,E]
        if not need_probs and self.cfg.balance != "bias":
            K = self.cfg.top_k
            if K <= 2 and x_ND.shape[0] >= 512:
                # measured: topk over a short last dim is slow on CPU (183 us at 1K tokens x 16
                # experts); K passes of max are half that from ~512 tokens (runs of bench.moe sizes)
                v1, i1 = logits.max(-1, keepdim=True)  # [N,1]
                if K == 1:
                    return torch.ones_like(v1), i1, None
                v2, i2 = logits.scatter(1, i1, float("-inf")).max(-1, keepdim=True)  # [N,1] runner-up
                return torch.cat([v1, v2], 1).softmax(-1), torch.cat([i1, i2], 1), None  # [N,2]
            top, idx = logits.topk(K, dim=-1)  # [N,K]
            return top.softmax(-1), idx, None
        if self.cfg.balance == "bias":
            scores = torch.sigmoid(logits)
            idx = (scores + self.route_bias).topk(self.cfg.top_k, dim=-1).indices  # bias: selection only
            w = scores.gather(1, idx)
            return w / w.sum(-1, keepdim=True), idx, scores / scores.sum(-1, keepdim=True)
        probs = logits.softmax(-1)
        w, idx = probs.topk(self.cfg.top_k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx, probs

    def _expert(self, e: int, x: torch.Tensor, scale_n: torch.Tensor | None = None,
                out: torch.Tensor | None = None, w13: torch.Tensor | None = None,
                w2: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e on rows x [n,D]; scale_n (routing weights) is applied to the hidden [n,F]
        before the (linear) down-projection: same result, half the elements of scaling [n,D]."""
        w13 = self.w13[e] if w13 is None else w13  # [D,2F]
        w2 = self.w2[e] if w2 is None else w2  # [F,D]
        h13 = x @ w13  # [n,2F]
        if self.lora is not None:
            h13 = h13 + self.lora(e, "w13", x)
        h1, h3 = h13.chunk(2, dim=-1)
        h = F.silu(h1) * h3  # [n,F]
        if scale_n is not None:
            h = h * scale_n[:, None]
        y = h @ w2 if out is None else torch.mm(h, w2, out=out)  # [n,D]
        if self.lora is not None:
            y = y + self.lora(e, "w2", h) if out is None else y.add_(self.lora(e, "w2", h))
        return y

    def _experts_padded(self, xs: torch.Tensor, expert_sorted: torch.Tensor, slot: torch.Tensor, M: int) -> torch.Tensor:
        """All experts in one bmm over a zero-padded [E, M, D] layout of the sorted assignments."""
        E, D = self.cfg.n_experts, xs.shape[-1]
        xp = xs.new_zeros(E, M, D)
        xp[expert_sorted, slot] = xs  # [E,M,D]
        h13 = torch.bmm(xp, self.w13)  # [E,M,2F]
        if self.lora is not None:
            h13 = h13 + self.lora.batched("w13", xp)
        h1, h3 = h13.chunk(2, dim=-1)
        h = F.silu(h1) * h3  # [E,M,F]
        y = torch.bmm(h, self.w2)  # [E,M,D]
        if self.lora is not None:
            y = y + self.lora.batched("w2", h)
        return y[expert_sorted, slot]  # [N*K,D] back in sorted order

    def _experts_grouped(self, x: torch.Tensor, tok: torch.Tensor, ws: torch.Tensor, counts_l: list[int]) -> torch.Tensor:
        """Inference at mid sizes: one gather, each expert's two matmuls written into shared
        [N*K, 2F] and [N*K, D] buffers, the SwiGLU and routing scale once over all rows, one
        scatter-add. (The loop path does ~8 ops per expert; at 1K tokens those dominate.)"""
        Fh = self.cfg.d_expert
        xs = x.index_select(0, tok)  # [N*K,D] sorted by expert
        h13 = x.new_empty(xs.shape[0], 2 * Fh)  # [N*K,2F]
        # split/unbind: one op each for all experts' views (per-expert slicing was ~100 Python-level
        # slice/select ops per call, ~0.2 ms at 1K tokens)
        live = [e for e, c in enumerate(counts_l) if c]
        w13_e, w2_e = self.w13.unbind(0), self.w2.unbind(0)
        xs_s, h13_s = xs.split(counts_l), h13.split(counts_l)
        for e in live:
            torch.mm(xs_s[e], w13_e[e], out=h13_s[e])
        h = F.silu(h13[:, :Fh]).mul_(h13[:, Fh:]).mul_(ws[:, None])  # [N*K,F] routing weight applied
        ys = xs  # [N*K,D]: the gathered inputs are not needed any more; reuse their buffer
        h_s, ys_s = h.split(counts_l), ys.split(counts_l)
        for e in live:
            torch.mm(h_s[e], w2_e[e], out=ys_s[e])
        return torch.zeros_like(x).index_add_(0, tok, ys)  # [N,D]

    def _experts_all(self, x: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Inference at decode sizes: every expert on every token (two batched matmuls over the
        experts), mixed by the routing weights, which are zero off the top-k. At <= 16 tokens top-2
        reads nearly every expert's weights anyway, and this skips the sort/gather/scatter."""
        E, N = self.cfg.n_experts, x.shape[0]
        Fh = self.cfg.d_expert
        h13 = torch.bmm(x.expand(E, N, x.shape[1]), self.w13)  # [E,N,2F]
        h = F.silu(h13[..., :Fh]) * h13[..., Fh:]  # [E,N,F]
        y_END = torch.bmm(h, self.w2)  # [E,N,D]
        w_NE = x.new_zeros(N, E).scatter_(1, idx_NK, w_NK.to(x.dtype))  # [N,E] routing weights, 0 off the top-k
        y = torch.bmm(w_NE[:, None, :], y_END.transpose(0, 1))[:, 0]  # [N,1,E] @ [N,E,D] -> [N,D]
        return y.to(x.dtype)  # (autocast: the matmuls may run in bf16)

    def _experts_gather(self, x: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference at 1-2 tokens (N*K <= 4): copy the chosen experts' weights (2 x 384 KB at the
        pinned sizes, what a dense FFN of the same active width reads) and run one batched matmul
        per projection; the padded layout would read all 16 experts for one token's two."""
        N, K = idx_NK.shape
        E, D, Fh = self.cfg.n_experts, x.shape[1], self.cfg.d_expert
        flat = idx_NK.reshape(-1)  # [N*K] token-major
        x_rows = x[:, None, :].expand(N, K, D).reshape(N * K, 1, D)  # [N*K,1,D] each token once per choice
        h13 = torch.bmm(x_rows, self.w13.index_select(0, flat))  # [N*K,1,2F]
        h = F.silu(h13[..., :Fh]).mul_(h13[..., Fh:])  # [N*K,1,F]
        y_NKD = torch.bmm(h, self.w2.index_select(0, flat)).view(N, K, D)  # [N,K,D]
        y = torch.bmm(w_NK[:, None, :].to(y_NKD.dtype), y_NKD)[:, 0]  # [N,1,K] @ [N,K,D] -> [N,D] weighted sum
        return y.to(x.dtype), torch.bincount(flat, minlength=E)  # (autocast: bmm in bf16)

    def _experts_padded_small(self, x: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference at small sizes (9-512 tokens): the zero-padded [E, M, D] bmm without sorting.
        Each assignment's row within its expert comes from a running count over a one-hot of the
        expert ids (whose last row is the experts' counts), the inputs are written into their rows
        with one broadcasting index_put, and the outputs are read back in token order and mixed by
        one batched matmul with the routing weights: ~18 ops in all, because at decode sizes each
        op's fixed cost (~5-10 us here) is what the time is made of. -> (y [N,D], counts [E])."""
        N, K = idx_NK.shape
        E, D, Fh = self.cfg.n_experts, x.shape[1], self.cfg.d_expert
        flat = idx_NK.reshape(-1)  # [N*K] token-major
        running = torch.zeros(N * K, E, dtype=torch.long, device=x.device).scatter_(1, flat[:, None], 1).cumsum(0)  # [N*K,E]
        counts = running[-1]  # [E] assignments per expert
        M = int(counts.max())
        rows = torch.add(running.gather(1, flat[:, None]).view(N, K), idx_NK, alpha=M).sub_(1)  # [N,K] expert*M + slot
        xp = x.new_zeros(E * M, D)  # zeros, not empty: stale memory can hold denormals, which made
        # the padding rows' matmul 10x slower on this CPU (measured: 3.5 ms instead of 0.3 at 4 tokens)
        xp[rows] = x[:, None, :]  # [E*M,D]: token n in its K experts' rows (broadcast over K)
        h13 = torch.bmm(xp.view(E, M, D), self.w13)  # [E,M,2F]
        h = F.silu(h13[..., :Fh]).mul_(h13[..., Fh:])  # [E,M,F]
        yp = torch.bmm(h, self.w2).view(E * M, D)  # [E*M,D]
        y_NKD = yp.index_select(0, rows.view(-1)).view(N, K, D)  # [N,K,D] (index_select: 3x faster than yp[rows] at 512 tokens)
        y = torch.bmm(w_NK[:, None, :].to(yp.dtype), y_NKD)[:, 0]  # [N,1,K] @ [N,K,D] -> [N,D]
        return y.to(x.dtype), counts  # (autocast: bmm in bf16)

    @staticmethod
    def _fused_ok(x: torch.Tensor) -> bool:
        """The compiled kernel takes CPU fp32/fp64 inputs outside autocast, where it is built."""
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and fused_available())

    def _mode(self, N: int, grad: bool, x: torch.Tensor | None = None) -> str:
        """The dispatch for N tokens from the config: "fused" (the compiled CPU kernel, inference
        on x where it applies), "all", "grouped", "padded_small" (inference only; the latter is
        "padded" at inference), "loop", "padded", or "sorted" = loop or padded, decided once the
        experts' counts are known."""
        cfg = self.cfg
        inference = not grad and self.lora is None
        if inference and (cfg.dispatch == "fused" or (cfg.dispatch == "auto" and cfg.fused_kernel)) \
                and x is not None and self._fused_ok(x):
            return "fused"
        # "fused" where the kernel does not apply (not built, GPU, autocast, gradients): "auto"
        dispatch = "auto" if cfg.dispatch == "fused" else cfg.dispatch
        if dispatch != "auto":
            mode = dispatch if inference or dispatch in ("loop", "padded") else "loop"
            return "padded_small" if inference and mode == "padded" else mode
        if inference and N * cfg.top_k <= max(cfg.top_k, cfg.n_experts // 4):  # measured: 1-2 tokens at 16 x top-2
            return "gather"
        if inference and N <= cfg.n_experts // 2:  # measured: 3-8 tokens
            return "all"
        if inference and N * cfg.top_k <= 64 * cfg.n_experts:  # measured: 9-512 tokens (sort-free padded bmm)
            return "padded_small"
        if inference and N * cfg.top_k <= 8192:  # measured: up to ~4K tokens; above, fresh [N*K,*] buffers cost more than they save
            return "grouped"
        return "sorted"

    def _experts_sorted(self, x: torch.Tensor, w_NK: torch.Tensor, flat: torch.Tensor, counts: torch.Tensor,
                        mode: str, grad: bool) -> torch.Tensor:
        """The dispatches that sort the assignments by expert ("padded", "grouped", "loop"; "sorted"
        = padded or loop, decided here from the counts). -> y [N,D]."""
        N, K, E = x.shape[0], self.cfg.top_k, self.cfg.n_experts
        order = flat.argsort(stable=True)  # assignments sorted by expert
        tok = order // K  # [N*K] source token of each sorted assignment
        counts_l = counts.tolist()
        if mode == "sorted":  # measured: padded wins only at decode sizes
            mode = "padded" if N * K <= 8 * E and max(counts_l) * E <= max(2 * N * K, 4 * E) else "loop"
        if mode == "padded":
            expert_sorted = flat[order]  # [N*K]
            starts = torch.cumsum(counts, 0) - counts  # [E]
            slot = torch.arange(N * K, device=x.device) - starts[expert_sorted]  # row within its expert
            ys = self._experts_padded(x.index_select(0, tok), expert_sorted, slot, max(counts_l))  # [N*K,D]
            ys = ys * w_NK.reshape(-1)[order, None]  # [N*K,D] weighted
            y = torch.zeros_like(x).index_add_(0, tok, ys.to(x.dtype))  # [N,D] (autocast: experts may run in bf16)
        elif mode == "grouped":
            y = self._experts_grouped(x, tok, w_NK.reshape(-1)[order].to(x.dtype), counts_l)
        else:
            ws = w_NK.reshape(-1)[order]  # [N*K] routing weights in sorted order
            tok_e, ws_e = tok.split(counts_l), ws.split(counts_l)
            w13_e, w2_e = self.w13.unbind(0), self.w2.unbind(0)
            if grad:
                # split/unbind instead of slicing per expert: their backward is one cat/stack, where
                # E slices would each build a zero-filled full-size gradient and add it up.
                xs_e = x.index_select(0, tok).split(counts_l)  # [N*K,D] contiguous per expert
                parts = [self._expert(e, xs_e[e], ws_e[e], w13=w13_e[e], w2=w2_e[e]) for e in range(E) if counts_l[e]]
                y = torch.zeros_like(x).index_add_(0, tok, torch.cat(parts).to(x.dtype))  # [N,D] (autocast: bf16 parts)
            else:
                # Inference at large sizes: gather and scatter-add one expert at a time; no [N*K,D]
                # buffers (at 16K tokens those are >32 MB fresh mmap allocations whose page faults
                # cost as much as the gather itself).
                y = torch.zeros_like(x)  # [N,D]
                for e in range(E):
                    if counts_l[e]:
                        y.index_add_(0, tok_e[e], self._expert(e, x.index_select(0, tok_e[e]), ws_e[e],
                                                               w13=w13_e[e], w2=w2_e[e]).to(x.dtype))
        return y

    def _experts(self, x: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor, mode: str, grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts for given routing by the dispatch ``mode`` (``_mode``) -> (y [N,D], counts [E])."""
        if mode == "fused":
            return ext.ops().moe_experts(x, w_NK, idx_NK, self.w13, self.w2, FUSED_CHUNK)
        if mode == "padded_small":
            return self._experts_padded_small(x, w_NK, idx_NK)
        if mode == "gather":
            return self._experts_gather(x, w_NK, idx_NK)
        flat = idx_NK.reshape(-1)  # [N*K]
        counts = torch.bincount(flat, minlength=self.cfg.n_experts)  # [E]
        if mode == "all":
            return self._experts_all(x, w_NK, idx_NK), counts
        return self._experts_sorted(x, w_NK, flat, counts, mode, grad), counts

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        shape = x_BTD.shape
        x = x_BTD.reshape(-1, shape[-1])  # [N,D]
        N, K, E = x.shape[0], cfg.top_k, cfg.n_experts
        grad = torch.is_grad_enabled() and (x.requires_grad or self.w2.requires_grad or self.lora is not None)
        mode = self._mode(N, grad, x)
        probs_NE = None
        # router, top-k and experts in one compiled call; not with a replaced router (int8 dynamic
        # quantization makes it a quantized Linear, whose weight is a method) or the bias router:
        # those route in PyTorch, and the experts still run compiled (_experts, "fused")
        if mode == "fused" and cfg.balance == "aux" and isinstance(self.router.weight, torch.Tensor):
            y, counts = ext.ops().moe_forward(x, self.router.weight, self.w13, self.w2, K, FUSED_CHUNK)
        else:
            w_NK, idx_NK, probs_NE = self.route(x, need_probs=grad)
            y, counts = self._experts(x, w_NK, idx_NK, mode, grad)
        if self.shared is not None:
            y = y + self.shared(x)
        load_E = counts.to(x.dtype) / max(N * K, 1)
        # The auxiliary loss only matters with gradients; inference returns a constant 0.
        aux_loss = cfg.aux_loss_coef * E * (load_E.detach() * probs_NE.mean(0)).sum() \
            if cfg.balance == "aux" and probs_NE is not None else x.new_zeros(())
        return y.reshape(shape), {"aux_loss": aux_loss, "expert_load": load_E.detach()}

    @torch.no_grad()
    def update_bias(self, expert_load_E: torch.Tensor) -> None:
        """DeepSeek-V3 balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        self.route_bias += self.cfg.bias_update_rate * torch.sign(expert_load_E.mean() - expert_load_E)


def moe_reference(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """Naive per-token, per-expert loop (tests and the slow baseline in bench.moe)."""
    x = x_BTD.reshape(-1, x_BTD.shape[-1])
    w, idx, _ = moe.route(x)
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for j in range(moe.cfg.top_k):
            acc = acc + w[n, j] * moe._expert(int(idx[n, j]), x[n:n + 1])[0]
        rows.append(acc)
    y = torch.stack(rows)
    if moe.shared is not None:
        y = y + moe.shared(x)
    return y.reshape(x_BTD.shape)
