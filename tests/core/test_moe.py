import pytest
import torch

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


@pytest.mark.parametrize("dispatch", ["loop", "padded", "grouped", "all", "gather"])
def test_all_tokens_to_one_expert_and_empty_experts(dispatch):
    m = MoE(MoEConfig(d_model=8, n_experts=4, top_k=2, d_expert=8, dispatch=dispatch))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:, 0] = torch.tensor([5.0, 4.0, -5.0, -5.0])
    x = torch.ones(5, 8)
    y, aux = m(x)
    torch.testing.assert_close(y, moe_reference(m, x))
    assert aux["expert_load"][2:].sum() == 0


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
    """"auto" picks the measured inference path by size (16 experts, top-2); with grad it never
    picks an inference-only path."""
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
