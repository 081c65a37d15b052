import dataclasses

import pytest
import torch

from core.decoder import Decoder, DecoderConfig


def _model(**kw):
    torch.manual_seed(0)
    return Decoder(DecoderConfig.preset("tiny", vocab_size=50, **kw))


@pytest.mark.parametrize("name", ["tiny", "demo", "full"])
def test_presets_round_trip_through_dict(name):
    cfg = DecoderConfig.preset(name, vocab_size=123)
    d = dataclasses.asdict(cfg)
    assert DecoderConfig.from_dict(d) == cfg
    assert d["attention"]["d_model"] == d["d_model"] == d["moe"]["d_model"]


def test_forward_shapes_and_outputs():
    dec = _model()
    ids = torch.randint(0, 50, (2, 70))
    ctx = torch.randn(2, 5, 64)
    out = dec(ids, ctx, torch.ones(2, 5, dtype=torch.bool))
    assert out.logits.shape == (2, 70, 50) and out.hidden.shape == (2, 70, 64)
    assert out.aux_loss.dim() == 0 and out.aux_loss > 0
    assert out.expert_load.shape == (2, 4)
    torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(2))
    assert dec.tok_embeddings.weight.shape == (50, 64)


def test_context_changes_output_and_mask_hides_it():
    dec = _model()
    ids = torch.randint(0, 50, (1, 20))
    ctx = torch.randn(1, 5, 64)
    none = dec(ids).logits
    with_ctx = dec(ids, ctx).logits
    assert not torch.allclose(none, with_ctx)
    masked = dec(ids, ctx, torch.zeros(1, 5, dtype=torch.bool)).logits
    torch.testing.assert_close(masked, none)
    part = torch.tensor([[True, True, False, False, False]])
    ctx2 = ctx.clone()
    ctx2[:, 2:] = 99.0  # masked tokens must not matter
    torch.testing.assert_close(dec(ids, ctx, part).logits, dec(ids, ctx2, part).logits)


def test_causal_and_right_padding_harmless():
    dec = _model()
    ids = torch.randint(0, 50, (1, 60))
    a = dec(ids).logits
    ids2 = ids.clone()
    ids2[:, 40:] = 0
    torch.testing.assert_close(dec(ids2).logits[:, :40], a[:, :40])


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 50, (2, 50))
    grads = []
    for ckpt in (False, True):
        dec = _model(grad_checkpoint=ckpt)
        out = dec(ids, torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)))
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in dec.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_prefill_and_step_match_forward():
    dec = _model().double()
    ids = torch.randint(0, 50, (2, 90))
    ctx = torch.randn(2, 4, 64, dtype=torch.float64)
    full = dec(ids, ctx).logits
    lens = torch.tensor([33, 50])
    lg, cache = dec.prefill(ids[:, :50], lens, ctx, None, capacity=90)
    for n in range(2):
        torch.testing.assert_close(lg[n], full[n, lens[n] - 1])
    for _ in range(35):
        lg = dec.step(ids[torch.arange(2), cache.length], cache)
        for n in range(2):
            torch.testing.assert_close(lg[n], full[n, cache.length[n] - 1])


def test_wrong_context_width_says_how_to_fix():
    with pytest.raises(ValueError, match="d_model"):
        _model()(torch.zeros(1, 4, dtype=torch.long), torch.randn(1, 2, 32))
