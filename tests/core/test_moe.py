import pytest
import torch

import core.moe
from core import ext
from core.moe import MoE, MoEConfig, moe_reference


@pytest.mark.parametrize("dispatch", ["loop", "padded", "auto"])
@pytest.mark.parametrize("balance", ["aux", "bias"])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_moe_matches_naive_reference_with_gradients(balance, n_shared, dispatch):
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=16, n_experts=6, top_k=2, d_expert=8, n_shared=n_shared, balance=balance,
                      dispatch=dispatch)).double()
    if balance == "bias":
        m.route_bias.copy_(torch.randn(6, dtype=torch.float64) * 0.1)
    x = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    y, aux = m(x)
    ref = moe_reference(m, x)
    torch.testing.assert_close(y, ref)
    go = torch.randn_like(y)
    params = [x] + list(m.parameters())
    g1 = torch.autograd.grad((y * go).sum(), params, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad((ref * go).sum(), params, allow_unused=True, materialize_grads=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert aux["expert_load"].shape == (6,)
    torch.testing.assert_close(aux["expert_load"].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_aux_loss_trains_router_towards_balance():
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=16, n_experts=4, top_k=1, d_expert=8, aux_loss_coef=1.0))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] += 0.2  # expert 0 dominates for positive inputs
    x = torch.rand(256, 16)
    opt = torch.optim.SGD(m.router.parameters(), lr=0.5)
    first = m.route(x)[2].mean(0)[0].item()
    assert m(x)[1]["expert_load"][0] == 1.0
    for _ in range(50):
        _, aux = m(x)
        opt.zero_grad()
        aux["aux_loss"].backward()
        opt.step()
    assert m.route(x)[2].mean(0)[0].item() < first - 0.1  # router mass moves off the overloaded expert


def test_bias_balancing_moves_bias_against_load():
    m = MoE(MoEConfig(d_model=8, n_experts=4, top_k=1, d_expert=8, balance="bias"))
    m.update_bias(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    assert m.route_bias[0] < 0 < m.route_bias[1]


@pytest.mark.parametrize("dispatch", ["loop", "padded", "grouped", "all", "gather",
                                      pytest.param("fused", marks=pytest.mark.skipif(ext.disabled(), reason="MEDREPORT_NO_EXT"))])
@pytest.mark.parametrize("grad", [False, True])
def test_all_tokens_to_one_expert_and_empty_experts(dispatch, grad):
    """Inference (each dispatch as named) and the autograd path (loop or padded) with two experts
    taking every token and two left empty."""
    m = MoE(MoEConfig(d_model=8, n_experts=4, top_k=2, d_expert=8, dispatch=dispatch))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, 0] = torch.tensor([5.0, 4.0, -5.0, -5.0])
    x = torch.ones(5, 8)
    with torch.set_grad_enabled(grad):
        # with gradients: "padded" stays, "fused" falls back to "auto" (padded or loop by the counts:
        # "sorted"), the inference-only dispatches train through the loop
        expected = {"padded": "padded_small"}.get(dispatch, dispatch) if not grad else \
            {"padded": "padded", "fused": "sorted"}.get(dispatch, "loop")
        assert m._mode(5, grad, x) == expected
        y, aux = m(x)
    torch.testing.assert_close(y, moe_reference(m, x))
    assert aux["expert_load"].tolist() == [0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("dispatch", ["loop", "padded", "grouped", "all", "gather", "auto"])
def test_inference_path_equals_autograd_path_and_reference(dispatch):
    """Without grad the loop dispatch gathers/scatters per expert (no [N*K,D] buffers), "grouped"
    writes every expert into shared buffers and "all" runs every expert on every token; each must
    give the same output as the autograd path and the naive reference."""
    torch.manual_seed(1)
    m = MoE(MoEConfig(d_model=16, n_experts=8, top_k=2, d_expert=8, dispatch=dispatch)).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    y_grad = m(x.clone().requires_grad_())[0]
    with torch.no_grad():
        y_inf, aux = m(x)
        ref = moe_reference(m, x)
    torch.testing.assert_close(y_inf, y_grad.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(y_inf, ref, rtol=1e-12, atol=1e-13)
    assert aux["expert_load"].shape == (8,)


@pytest.mark.parametrize("dispatch", ["padded", "loop", "grouped", "all", "gather"])
@pytest.mark.parametrize("grad", [True, False])
def test_moe_runs_under_bf16_autocast(dispatch, grad):
    """Mixed precision (as training on a GPU uses it): the experts' matmuls run in bf16 while the
    scatter-add target is fp32; found on a lent H200 (index_add_ dtype mismatch). CPU autocast
    exercises the same dtype path."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, n_experts=4, top_k=2, d_expert=16, dispatch=dispatch))
    x = torch.randn(2, 24, 32, requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y, info = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    ref, _ = moe(x)  # fp32: bf16 rounding (and a rare token routed differently)
    assert (y.float() - ref).abs().mean() < 0.05 * ref.abs().mean()
    if grad:
        y.float().sum().backward()
        assert x.grad is not None and moe.w2.grad is not None


@pytest.mark.parametrize("n_tokens,expected", [(1, "gather"), (2, "gather"), (3, "all"), (8, "all"), (9, "padded_small"), (512, "padded_small"),
                                               (513, "grouped"), (4096, "grouped"), (4097, "loop")])
def test_auto_dispatch_by_size_at_inference(n_tokens, expected, monkeypatch):
    """Where the compiled kernel is not available (no compiler, a GPU), "auto" picks the measured
    PyTorch inference path by size (16 experts, top-2); with grad it never picks an
    inference-only path."""
    monkeypatch.setattr(core.moe, "fused_available", lambda: False)
    m = MoE(MoEConfig(d_model=8, n_experts=16, top_k=2, d_expert=4))
    used = []
    for name in ("_experts_all", "_experts_grouped", "_experts_padded", "_experts_padded_small", "_experts_gather"):
        orig = getattr(m, name)
        monkeypatch.setattr(m, name, lambda *a, _n=name, _o=orig: used.append(_n) or _o(*a))
    x = torch.randn(n_tokens, 8)
    with torch.no_grad():
        m(x)
    got = {"_experts_all": "all", "_experts_grouped": "grouped", "_experts_padded": "padded",
           "_experts_padded_small": "padded_small", "_experts_gather": "gather"}.get(used[0]) if used else "loop"
    assert got == expected
    used.clear()
    m(x.requires_grad_())
    assert not {"_experts_all", "_experts_grouped", "_experts_padded_small", "_experts_gather"} & set(used)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_tokens", [7, 600])
def test_inference_router_matches_the_training_router(top_k, n_tokens):
    """From 512 tokens the inference router takes the top-2 by two passes of max (topk over 16
    experts is slow on CPU); below, topk of the logits. Both must pick the experts the training
    router (softmax, topk, renormalise) picks, with the same weights, in the same order."""
    torch.manual_seed(3)
    m = MoE(MoEConfig(d_model=16, n_experts=16, top_k=top_k, d_expert=8)).double()
    x = torch.randn(n_tokens, 16, dtype=torch.float64)
    with torch.no_grad():
        w_fast, idx_fast, probs = m.route(x, need_probs=False)
        w_ref, idx_ref, _ = m.route(x, need_probs=True)
    assert probs is None
    assert torch.equal(idx_fast, idx_ref)
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(w_fast.sum(-1), torch.ones(n_tokens, dtype=torch.float64))


# --- the compiled CPU kernel (core/csrc/moe_cpu.cpp, built through core.ext) ---------------------

def test_fused_kernel_builds_here():
    """The product's CPU inference uses the compiled kernel; a machine with the documented
    toolchain (g++, ninja) must build it (set MEDREPORT_NO_EXT=1 to run without it)."""
    if ext.disabled():
        pytest.skip("MEDREPORT_NO_EXT is set: the PyTorch paths are used")
    assert core.moe.fused_available(), "core/csrc/moe_cpu.cpp did not build: see the warning logged by core.ext"


fused = pytest.mark.skipif(ext.disabled(), reason="MEDREPORT_NO_EXT is set")


@fused
@pytest.mark.parametrize("balance", ["aux", "bias"])
@pytest.mark.parametrize("n_tokens", [1, 2, 3, 16, 37, 600])
@pytest.mark.parametrize("chunk", [4096, 7])
def test_fused_kernel_equals_reference_and_autograd_path(balance, n_tokens, chunk, monkeypatch):
    """fp64: the kernel (router top-k, counting sort, per-expert BLAS, SwiGLU, combine), in one
    pass or in chunks of 7 tokens, gives the naive reference's output, the autograd path's, and
    the same expert load."""
    monkeypatch.setattr(core.moe, "FUSED_CHUNK", chunk)
    torch.manual_seed(n_tokens)
    m = MoE(MoEConfig(d_model=24, n_experts=8, top_k=2, d_expert=12, balance=balance)).double()
    if balance == "bias":
        m.route_bias.copy_(torch.randn(8, dtype=torch.float64) * 0.3)
    x = torch.randn(n_tokens, 24, dtype=torch.float64)
    assert m._mode(n_tokens, False, x) == "fused"
    with torch.no_grad():
        y, aux = m(x)
        ref = moe_reference(m, x)
    y_grad, aux_grad = m(x.clone().requires_grad_())
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(y, y_grad.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(aux["expert_load"], aux_grad["expert_load"])
    torch.testing.assert_close(aux["expert_load"].sum(), torch.tensor(1.0, dtype=torch.float64))


@fused
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_fused_kernel_fp32_top_k_and_shared_expert(top_k):
    torch.manual_seed(top_k)
    m = MoE(MoEConfig(d_model=32, n_experts=6, top_k=top_k, d_expert=16, n_shared=1))
    x = torch.randn(3, 50, 32)
    with torch.no_grad():
        assert m._mode(150, False, x.reshape(-1, 32)) == "fused"
        torch.testing.assert_close(m(x)[0], moe_reference(m, x), rtol=1e-5, atol=1e-5)


@fused
def test_fused_kernel_ties_pick_the_lower_expert_and_nan_propagates():
    m = MoE(MoEConfig(d_model=8, n_experts=4, top_k=2, d_expert=8))
    with torch.no_grad():
        m.router.weight.zero_()  # every logit equal: experts 0 and 1, weights 1/2 each
        x = torch.randn(3, 8)
        y, aux = m(x)
        assert aux["expert_load"].tolist() == [0.5, 0.5, 0.0, 0.0]
        expect = 0.5 * (m._expert(0, x) + m._expert(1, x))
        torch.testing.assert_close(y, expect)
        x[1, 0] = float("nan")
        y = m(x)[0]
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@fused
def test_fused_kernel_not_used_with_gradients_lora_or_autocast():
    m = MoE(MoEConfig(d_model=8, n_experts=4, top_k=2, d_expert=8))
    x = torch.randn(4, 8)
    assert m._mode(4, True, x) != "fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m._mode(4, False, x) != "fused"
    assert m._mode(4, False, x.half()) != "fused"
    m.cfg.dispatch = "loop"
    assert m._mode(4, False, x) == "loop"
    m.cfg.dispatch = "fused"
    assert m._mode(4, False, x) == "fused"
    m.cfg.dispatch, m.cfg.fused_kernel = "auto", False
    assert m._mode(4, False, x) == "padded_small"


@fused
def test_fused_kernel_is_safe_from_several_threads():
    """The web UI serves requests from several threads; each has its own workspace."""
    from concurrent.futures import ThreadPoolExecutor
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=32, n_experts=8, top_k=2, d_expert=16)).double()
    xs = [torch.randn(n, 32, dtype=torch.float64) for n in (5, 300, 40, 1000, 17, 600)]
    with torch.no_grad():
        refs = [moe_reference(m, x) for x in xs]

        def run(i):
            return m(xs[i])[0]

        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(run, list(range(len(xs))) * 3))
    for i, y in enumerate(outs):
        torch.testing.assert_close(y, refs[i % len(xs)], rtol=1e-12, atol=1e-13)


@fused
@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_fused_kernel_under_inference_mode_then_no_grad(first):
    """The pipeline runs under torch.inference_mode(), the trainer's validation under no_grad, in
    one process and one thread: the reused workspace must serve both, in either order (found
    with `medreport generate`: an inference-mode workspace could not be written under no_grad)."""
    import threading
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=16, n_experts=4, top_k=2, d_expert=8))
    x = torch.randn(40, 16)
    ref = moe_reference(m, x).detach()
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    order = [first, "no_grad" if first == "inference_mode" else "inference_mode"]
    outs = []

    def run():  # a fresh thread: a fresh thread-local workspace, first made under `first`
        for mode in order + order:
            with modes[mode]():
                outs.append(m(x)[0].clone())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(outs) == 4
    for y in outs:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@fused
def test_fused_kernel_with_an_int8_quantized_router():
    """bench.e2e and `--int8` quantize the decoder's nn.Linear layers dynamically, the MoE router
    among them (its weight becomes a method): the experts still run compiled, routed in PyTorch."""
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=32, n_experts=4, top_k=2, d_expert=16)).eval()
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(m), {torch.nn.Linear}, dtype=torch.qint8)[0]
    x = torch.randn(10, 32)
    with torch.no_grad():
        assert q._mode(10, False, x) == "fused"
        w, idx, _ = q.route(x, need_probs=False)
        y = q(x)[0]
        expect = torch.stack([sum(w[n, j] * m._expert(int(idx[n, j]), x[n:n + 1])[0] for j in range(2)) for n in range(10)])
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-6)


def _swiglu_extremes_case():
    """An fp32 MoE whose gate pre-activations span -300..300 (exp(-|g|) from 1 down to underflow),
    with an expert width that is not a multiple of the vector length (vector body and scalar tail),
    and 700 tokens on 4 experts (several 128-row tiles per expert)."""
    torch.manual_seed(3)
    m = MoE(MoEConfig(d_model=16, n_experts=4, top_k=2, d_expert=20))
    with torch.no_grad():
        m.w13[:, :, :20].mul_(60.0)  # gate columns: large positive and negative pre-activations
    x = torch.randn(700, 16)
    x[0] = 0.0  # g = 0 exactly
    return m, x


@fused
def test_fused_kernel_swiglu_is_exact_at_extreme_gates():
    """The kernel's vector SwiGLU (exp of -|g|, AVX-512 here) against the fp64 reference."""
    m, x = _swiglu_extremes_case()
    with torch.no_grad():
        g = torch.einsum("nd,edf->nef", x, m.w13[:, :, :20])
        assert g.max() > 80 and g.min() < -80  # the range the test is about
        y = m(x)[0]
        ref = moe_reference(m.double(), x.double()).float()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-4)


@fused
def test_fused_kernel_avx2_swiglu_in_a_process_without_avx512(run_without_avx512):
    """The AVX2 SwiGLU, forced with MEDREPORT_NO_AVX512=1 in a fresh process, gives the same."""
    code = ("import torch, tests.core.test_moe as T; from core.moe import moe_reference;"
            "m, x = T._swiglu_extremes_case(); torch.set_grad_enabled(False);"
            "assert m._mode(700, False, x) == 'fused'; y = m(x)[0];"
            "ref = moe_reference(m.double(), x.double()).float();"
            "torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-4); print('ok')")
    run_without_avx512(code)


@fused
@pytest.mark.parametrize("n_experts,top_k", [(16, 2), (16, 5), (11, 3), (16, 16)])
def test_fused_kernel_fp32_router_picks_what_pytorch_picks(n_experts, top_k):
    """fp32 with at most 16 experts: the kernel computes the router's logits and top-k itself
    (AVX-512 where the CPU has it): the same experts, weights and output as PyTorch's router, with
    a short last group of rows (ties are test_fused_kernel_ties_pick_the_lower_expert...: torch.topk
    breaks them its own way)."""
    torch.manual_seed(n_experts + top_k)
    m = MoE(MoEConfig(d_model=64, n_experts=n_experts, top_k=top_k, d_expert=16)).eval()
    x = torch.randn(4 * 37 + 3, 64)
    with torch.no_grad():
        w_ref, idx_ref, _ = m.route(x, need_probs=False)
        y, aux = m(x)
        ref = moe_reference(m, x)
    counts_ref = torch.bincount(idx_ref.flatten(), minlength=n_experts).float() / idx_ref.numel()
    torch.testing.assert_close(aux["expert_load"], counts_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
