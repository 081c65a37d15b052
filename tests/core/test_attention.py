import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from core import attention, ext
from core.attention import BRANCHES, AttentionConfig, BlockSparseAttention, block_sparse_attention, dense_reference

SMALL = dict(d_model=16, n_heads=2, head_dim=8, block_size=8, window_blocks=1, global_blocks=1,
             compress_block=16, select_topk=2, chunk_blocks=3)
CASES = [("local",), ("compressed",), ("selected",), ("local", "compressed"), BRANCHES]


def _inputs(cfg, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, cfg.n_heads, T, cfg.head_dim, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    gates = torch.rand(B, cfg.n_heads, T, len(cfg.branches), generator=g, dtype=torch.float64).requires_grad_()
    wk = torch.randn(cfg.compress_block, generator=g, dtype=torch.float64).requires_grad_()
    return q, k, v, gates, wk


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "plain-matmul"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-graph", "recompute"])
@pytest.mark.parametrize("branches", CASES)
@pytest.mark.parametrize("T", [1, 45, 160, 203])
def test_kernel_matches_dense_reference_fp64_with_gradients(branches, T, recompute, fused, monkeypatch):
    """Both implementations of each attention call (PyTorch's fused CPU kernel, used on CPU, and the
    plain matmuls used elsewhere) against dense masks, at lengths that are and are not multiples of
    the block and the compressed block."""
    monkeypatch.setattr(attention, "FUSED_CPU", fused)
    cfg = AttentionConfig(**SMALL, branches=branches)
    q, k, v, gates, wk = _inputs(cfg, 2, T)
    out = block_sparse_attention(q, k, v, cfg, gates, wk, None, checkpoint_chunks=recompute)
    ref = dense_reference(q, k, v, cfg, gates, wk, None)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    ins = [q, k, v, gates, wk]
    g1 = torch.autograd.grad((out * go).sum(), ins, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad((ref * go).sum(), ins, allow_unused=True, materialize_grads=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "plain-matmul"])
@pytest.mark.parametrize("branches", [("selected",), ("local", "selected"), BRANCHES])
@pytest.mark.parametrize("T", [45, 160, 203, 517])
def test_inference_selected_by_chosen_block_matches_dense_reference(branches, T, fused, monkeypatch):
    """Without gradients and with one selected block per query block, the selected branch runs
    grouped by chosen block over the whole sequence (Plan.selected_by_block): still exact, for two
    batch rows that choose differently, partial last blocks included, and equal to the path with
    gradients."""
    monkeypatch.setattr(attention, "FUSED_CPU", fused)
    monkeypatch.setattr(attention, "COMPILED_CPU", False)  # the PyTorch path (the compiled one is tested below)
    cfg = AttentionConfig(**{**SMALL, "select_topk": 1}, branches=branches)
    q, k, v, gates, wk = _inputs(cfg, 2, T, seed=3)
    calls = []
    real = attention._Plan.selected_by_block
    monkeypatch.setattr(attention._Plan, "selected_by_block", lambda self, *a: (calls.append(1), real(self, *a)))
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, cfg, gates, wk, None)
        ref = dense_reference(q, k, v, cfg, gates, wk, None)
    assert calls  # the grouped path ran
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    with_grad = block_sparse_attention(q, k, v, cfg, gates, wk, None)
    torch.testing.assert_close(out, with_grad.detach(), rtol=1e-10, atol=1e-12)


# --- the compiled inference forward (core/csrc/attention_cpu.cpp, built through core.ext) ---------

compiled = pytest.mark.skipif(ext.disabled(), reason="MEDREPORT_NO_EXT is set: the PyTorch paths are used")


@compiled
def test_compiled_forward_builds_and_is_what_inference_runs(monkeypatch):
    """On a machine with the documented toolchain the compiled forward is built, and inference on
    CPU (no gradient) goes through it; with gradients the autograd path runs."""
    assert attention.compiled_available(), "core/csrc/attention_cpu.cpp did not build: see the warning logged by core.ext"
    calls = []
    real = attention._compiled_forward
    monkeypatch.setattr(attention, "_compiled_forward", lambda *a: (calls.append(1), real(*a))[1])
    cfg = AttentionConfig(**SMALL)
    q, k, v, gates, wk = _inputs(cfg, 1, 40)
    with torch.no_grad():
        block_sparse_attention(q, k, v, cfg, gates, wk)
    assert len(calls) == 1
    block_sparse_attention(q, k, v, cfg, gates, wk).sum().backward()
    assert len(calls) == 1 and q.grad is not None


GEOMETRIES = [dict(),  # SMALL: b 8, window 1, global 1, c 16, top-2
              dict(window_blocks=2, global_blocks=0, select_topk=3),
              dict(block_size=4, window_blocks=0, global_blocks=2, compress_block=8, select_topk=1),
              dict(compress_block=32, window_blocks=3, global_blocks=2)]


@compiled
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("branches", CASES + [("selected", "local"), ("compressed", "selected")])
@pytest.mark.parametrize("T", [1, 7, 45, 160, 203])
def test_compiled_forward_matches_dense_reference_fp64(branches, T, geometry, monkeypatch):
    """fp64, two batch rows that select differently: every branch and branch order, gated, with
    and without global blocks, several windows and top-k, lengths that are and are not multiples
    of the block and the compressed block; equal to the dense masks and to the PyTorch path."""
    monkeypatch.setattr(attention, "COMPILED_CPU", True)
    cfg = AttentionConfig(**{**SMALL, **GEOMETRIES[geometry]}, branches=branches)
    q, k, v, gates, wk = _inputs(cfg, 2, T, seed=geometry)
    wv = torch.randn(cfg.compress_block, dtype=torch.float64)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, cfg, gates, wk, wv)
        ref = dense_reference(q, k, v, cfg, gates, wk, wv)
        monkeypatch.setattr(attention, "COMPILED_CPU", False)
        torch_path = block_sparse_attention(q, k, v, cfg, gates, wk, wv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, torch_path, rtol=1e-10, atol=1e-12)


@compiled
def test_compiled_forward_fp32_at_demo_geometry(monkeypatch):
    """fp32 at the pinned 64-token blocks, 256-token compressed blocks and d 64 (the AVX2 softmax
    path), a length with a partial last block: within fp32 rounding of the PyTorch path."""
    cfg = AttentionConfig(d_model=128, n_heads=2, head_dim=64)
    T = 2 * 1024 + 37
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, T, 64, generator=g) for _ in range(3))
    gates = torch.rand(1, 2, T, 3, generator=g)
    with torch.no_grad():
        monkeypatch.setattr(attention, "COMPILED_CPU", True)
        out = block_sparse_attention(q, k, v, cfg, gates)
        monkeypatch.setattr(attention, "COMPILED_CPU", False)
        ref = block_sparse_attention(q, k, v, cfg, gates)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


@compiled
def test_compiled_forward_fp32_avx2_softmax_where_avx512_is_taken(run_without_avx512):
    """The AVX2 softmax (the CI machine's) checked even on a machine whose CPU takes the AVX-512
    one: the same comparison in a process with MEDREPORT_NO_AVX512=1."""
    code = ("import torch, core.attention as A; from core.attention import *; torch.manual_seed(1);"
            "cfg = AttentionConfig(d_model=128, n_heads=2, head_dim=64); T = 1100;"
            "q, k, v = (torch.randn(1, 2, T, 64) for _ in range(3)); gates = torch.rand(1, 2, T, 3);"
            "torch.set_grad_enabled(False); out = block_sparse_attention(q, k, v, cfg, gates);"
            "A.COMPILED_CPU = False; ref = block_sparse_attention(q, k, v, cfg, gates);"
            "torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6); print('ok')")
    run_without_avx512(code)


@compiled
def test_compiled_op_rejects_bad_inputs_with_a_reason():
    ops = ext.ops()
    x = torch.randn(2, 16, 8)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.bsa_forward(x.half(), x.half(), x.half(), None, None, None, None, None, 2, 8, 1, 1, 16, [0], 0.3)
    with pytest.raises(RuntimeError, match="gates must be"):
        ops.bsa_forward(x, x, x, None, None, None, None, None, 2, 8, 1, 1, 16, [0, 0], 0.3)
    with pytest.raises(RuntimeError, match="needs cmp_k"):
        ops.bsa_forward(x, x, x, None, None, None, None, None, 2, 8, 1, 1, 16, [1], 0.3)
    y = torch.randn(1, 24, 8)
    bad = torch.tensor([[[1]]])  # compressed block 1 (rows 16..31) chosen by query block 2 (rows 16..23)
    with pytest.raises(RuntimeError, match="is not before"):
        ops.bsa_forward(y, y, y, None, None, bad, torch.ones(1, 1, 1, dtype=torch.bool), None, 1, 8, 1, 1, 16, [2], 0.3)
    ok = ops.bsa_forward(y, y, y, None, None, bad - 1, torch.ones(1, 1, 1, dtype=torch.bool), None, 1, 8, 1, 1, 16, [2], 0.3)
    assert torch.isfinite(ok).all() and ok[0, :16].abs().max() == 0  # blocks 0-1 have nothing to select


def test_reference_pattern_is_sparse_and_global_path_reaches_far_tokens():
    """The compressed/selected branches let the last query see the first block; local alone does not."""
    T = 200
    for branches, reaches in ((("local",), False), (("compressed",), True), (("selected",), True)):
        cfg = AttentionConfig(**{**SMALL, "global_blocks": 0, "select_topk": 50}, branches=branches)  # top-k covers all
        q, k, v, gates, wk = _inputs(cfg, 1, T, seed=3)
        out = block_sparse_attention(q, k, v, cfg, gates, None, None)
        g = torch.autograd.grad(out[0, :, -1].sum(), v)[0]
        assert bool(g[0, :, 8:16].abs().sum() > 0) == reaches, branches


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-graph", "recompute"])
def test_no_quadratic_tensor_forward_and_backward(recompute):
    cfg = AttentionConfig(d_model=32, n_heads=2, head_dim=16, block_size=16, compress_block=32, select_topk=2, chunk_blocks=4)
    T = 4096
    q, k, v = (torch.randn(1, 2, T, 16, requires_grad=True) for _ in range(3))
    gates = torch.rand(1, 2, T, 3)
    with _MaxNumel() as m:
        out = block_sparse_attention(q, k, v, cfg, gates, checkpoint_chunks=recompute)
        out.sum().backward()
    # largest tensor is linear in T (q/k/v-sized or a chunk's scores), far below T*T
    assert m.max <= 4 * 2 * T * 16, m.max
    assert m.max < T * T // 8


@pytest.mark.parametrize("branches", CASES)
def test_kv_cache_decode_equals_full_forward(branches):
    torch.manual_seed(0)
    cfg = AttentionConfig(**SMALL, branches=branches)
    m = BlockSparseAttention(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    B, T = 3, 130
    x = torch.randn(B, T, cfg.d_model, dtype=torch.float64)
    full = m(x)
    lens = torch.tensor([40, 17, 64])
    y, cache = m.prefill(x[:, :64], lens, capacity=T)
    for n in range(B):
        torch.testing.assert_close(y[n, : lens[n]], full[n, : lens[n]])
    start = lens.clone()
    for s in range(60):
        o = m.step(x[torch.arange(B), cache.length][:, None], cache)
        for n in range(B):
            torch.testing.assert_close(o[n, 0], full[n, int(start[n]) + s], rtol=1e-9, atol=1e-10)


def test_config_round_trip_and_validation():
    cfg = AttentionConfig(**SMALL)
    assert AttentionConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    assert AttentionConfig.from_dict({**dataclasses.asdict(cfg), "branches": ["local"]}).branches == ("local",)
    with pytest.raises(ValueError, match="multiple of block_size"):
        AttentionConfig(block_size=64, compress_block=96)
    with pytest.raises(ValueError, match="subset"):
        AttentionConfig(branches=("dense",))


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-graph", "recompute"])
def test_backward_twice_with_retained_graph(recompute):
    """Grad-CAM evidence runs one backward per sentence through one retained graph."""
    cfg = AttentionConfig(**SMALL)
    q, k, v, gates, wk = _inputs(cfg, 1, 100)
    out = block_sparse_attention(q, k, v, cfg, gates, wk, None, checkpoint_chunks=recompute)
    g1 = torch.autograd.grad(out[0, :, -1].sum(), q, retain_graph=True)[0]
    g2 = torch.autograd.grad(out[0, :, -1].sum(), q)[0]
    torch.testing.assert_close(g1, g2)
    assert g1.abs().sum() > 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-kernel", "plain-matmul"])
@pytest.mark.parametrize("grad", ["keep-graph", "recompute", None], ids=["train", "train-recompute", "inference"])
@pytest.mark.parametrize("branches", CASES)
def test_runs_under_bf16_autocast(branches, grad, fused, monkeypatch):
    """Mixed precision, as training on a GPU runs it: the projections come out in bf16 while the
    residual stream (and so the RoPE angles) is fp32. q, k and v must reach the kernel in one dtype
    (found on a lent H200: a bf16 v gathered into an fp32 buffer), and the plain-matmul backward
    (the GPU's path) must take bf16 inputs with fp32 softmax statistics. CPU autocast takes the
    same paths."""
    monkeypatch.setattr(attention, "FUSED_CPU", fused)
    if grad == "recompute":  # long inputs recompute the softmax chunk by chunk in backward
        monkeypatch.setattr(attention, "KEEP_GRAPH_MAX_TOKENS", 0)
    grad = grad is not None
    torch.manual_seed(0)
    cfg = AttentionConfig(**SMALL, branches=branches)
    m = BlockSparseAttention(cfg)
    x = torch.randn(2, 70, cfg.d_model, requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with torch.set_grad_enabled(grad):
        ref = m(x)  # fp32
    assert (y.float() - ref).abs().mean() < 0.05 * ref.abs().mean()
    if grad:
        y.float().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and m.wqkv.weight.grad is not None


def test_plain_backward_takes_bf16_tensors_with_fp32_statistics(monkeypatch):
    """The GPU's attention backward (plain matmuls) gets bf16 q, k, v, o and gradients with an
    fp32 log-sum-exp, as CUDA autocast leaves them (it runs logsumexp in fp32). It keeps fp32
    scores and returns each gradient in its input's dtype, close to the fp32 result."""
    monkeypatch.setattr(attention, "FUSED_CPU", False)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(3, 16, 8, generator=g) for _ in range(4))
    o, lse = attention._attn_fwd(q, k, v, None, 0.35)  # fp32 reference statistics
    ref = attention._attn_bwd(do, q, k, v, o, lse, None, 0.35)
    bf = [t.bfloat16() for t in (do, q, k, v, o)]
    got = attention._attn_bwd(*bf, lse, None, 0.35)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).abs().mean() < 0.03 * b.abs().mean()
    o_bf, lse_bf = attention._attn_fwd(*bf[1:4], None, 0.35)
    assert o_bf.dtype == torch.bfloat16 and lse_bf.dtype == torch.float32
