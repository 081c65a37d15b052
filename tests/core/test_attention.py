import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from core import attention
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
