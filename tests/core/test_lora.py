import torch

from core.decoder import Decoder, DecoderConfig
from core.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_state_dict, merge_lora, trainable_fraction


def _dec(seed=0):
    torch.manual_seed(seed)
    return Decoder(DecoderConfig.preset("tiny", vocab_size=30))


def test_full_preset_trainable_fraction_under_one_percent_at_rank_8():
    with torch.device("meta"):
        dec = apply_lora(Decoder(DecoderConfig.preset("full", vocab_size=8000)), LoRAConfig(rank=8))
    assert 0 < trainable_fraction(dec) < 0.01


def _train_adapters(dec, ids, steps=5):
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        out = dec(ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 30), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_adapters_train_merge_and_separate_state_dict():
    dec = apply_lora(_dec(), LoRAConfig(rank=4, targets=("wqkv", "wo", "w13", "w2")))
    for blk in dec.layers:  # exercise the per-expert loop path (tiny batches would take the padded one)
        blk.moe.cfg.dispatch = "loop"
    base_before = {k: v.clone() for k, v in dec.state_dict().items() if "lora" not in k}
    ids = torch.randint(0, 30, (2, 40))
    with torch.no_grad():
        start = dec(ids).logits
    torch.testing.assert_close(start, _dec()(ids).logits.detach())  # B = 0: starts equal to the base
    _train_adapters(dec, ids)
    for k, v in dec.state_dict().items():
        if k in base_before:
            torch.testing.assert_close(v, base_before[k])  # frozen
    dec.eval()
    with torch.no_grad():
        adapted = dec(ids).logits
    assert not torch.allclose(adapted, start)
    sd = lora_state_dict(dec)
    assert sd and all("lora" in k for k in sd)
    # a fresh base + the adapter dict reproduces the adapted model
    fresh = apply_lora(_dec(), LoRAConfig(rank=4, targets=("wqkv", "wo", "w13", "w2")))
    load_lora_state_dict(fresh, sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, adapted)
    for blk in dec.layers:
        blk.moe.cfg.dispatch = "padded"
    with torch.no_grad():
        torch.testing.assert_close(dec(ids).logits, adapted, rtol=1e-4, atol=1e-5)  # batched adapters agree
    merged = merge_lora(dec)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)
