"""Parameter counts and estimated FLOPs per component of a ReportModel (for ``medreport model-info``
and ``bench.model``). Everything is built on the meta device: no memory, no weights, any preset.

FLOPs: ``torch.utils.flop_counter`` on meta tensors for the encoders, fusion and heads (one
forward of one study at the config's nominal input size); the decoder's data-dependent sparse
attention cannot run on meta, so its per-token cost is estimated analytically
(2 x active weights + attention over the keys one query reads).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from multimodal.model import ReportModel
from multimodal.presets import ModelConfig

AUDIO_SECONDS = 30.0  # nominal dictation length for the audio FLOPs
DECODER_CONTEXT = 4096  # nominal decoder position for its per-token attention cost


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn) -> int:
    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return int(fc.get_total_flops())


def backbone_name(cfg) -> str:
    widths = cfg.channels or (64, 128, 256, 512)
    std = cfg.channels is None
    return (f"{cfg.backbone} (timm; 3-4-6-3 bottlenecks, widths {'-'.join(map(str, widths))}"
            f"{' = standard' if std else ' = narrowed'}, {widths[-1] * 4} output channels, output stride {cfg.output_stride})")


def model_info(cfg: ModelConfig) -> dict:
    """Per-component parameters and GFLOPs (one study) plus MoE active/total parameters."""
    with torch.device("meta"):
        m = ReportModel(cfg)
    ic, ac, fc, dc = cfg.image, cfg.audio, cfg.fusion, cfg.decoder
    S, H = ic.max_slabs, ic.image_size
    T_audio = int(AUDIO_SECONDS / ac.hop_s)
    meta = dict(device="meta")

    img_flops = _flops(lambda: m.image_encoder.backbone.forward_features(torch.zeros(S, 3, H, H, **meta)))
    img_flops += 2 * S * ic.grid**2 * m.image_encoder.num_features * ic.dim  # token projection
    aud_flops = _flops(lambda: m.audio_encoder.backbone.forward_features(torch.zeros(1, 1, ac.n_mels, T_audio, **meta)))
    n_img = S * ic.grid**2
    n_aud = min(ac.max_tokens, -(-T_audio // ac.output_stride))
    ones = lambda n: torch.ones(1, n, dtype=torch.bool, **meta)  # noqa: E731
    n_hist = fc.n_history_tokens + fc.n_digest_tokens  # record blocks + digest blocks
    fus_flops = _flops(lambda: m.fusion(
        (torch.zeros(1, n_img, ic.dim, **meta), ones(n_img)),
        (torch.zeros(1, n_aud, ac.dim, **meta), ones(n_aud)),
        (torch.zeros(1, n_hist, dc.d_model, **meta), ones(n_hist)),
    ))
    heads_flops = _flops(lambda: m.heads(torch.zeros(1, fc.n_fused, dc.d_model, **meta), ones(fc.n_fused)))

    # Decoder: total vs active (MoE) parameters and an analytic per-token forward cost.
    dec = m.decoder
    total = _n(dec)
    emb = dec.tok_embeddings.weight.numel()
    expert = sum(p.numel() for n, p in dec.named_parameters() if ".moe.w13" in n or ".moe.w2" in n)
    moe = dc.moe
    active = total - expert + expert * moe.top_k // moe.n_experts
    att = dc.attention
    keys = ((att.global_blocks + att.window_blocks + 1) * att.block_size
            + DECODER_CONTEXT // att.compress_block + att.select_topk * att.compress_block)
    attn_flops = dc.n_layers * (4 * att.n_heads * att.head_dim * keys + 4 * dc.d_model * fc.n_fused)
    dec_flops_tok = 2 * (active - emb) + 2 * dc.d_model * dc.vocab_size + attn_flops

    comps = [
        dict(component="image encoder", params=_n(m.image_encoder), gflops=img_flops / 1e9,
             per=f"study ({S} slabs of {H}x{H})", backbone=backbone_name(ic)),
        dict(component="audio encoder", params=_n(m.audio_encoder), gflops=aud_flops / 1e9,
             per=f"{AUDIO_SECONDS:g} s dictation ({ac.n_mels} mels)", backbone=backbone_name(ac)),
        dict(component="fusion", params=_n(m.fusion), gflops=fus_flops / 1e9,
             per=f"study ({n_img}+{n_aud}+{fc.n_history_tokens} tokens -> {fc.n_fused})", backbone=""),
        dict(component="decoder", params=total, gflops=dec_flops_tok / 1e9,
             per=f"token (estimate, position {DECODER_CONTEXT})", backbone=""),
        dict(component="finding heads", params=_n(m.heads), gflops=heads_flops / 1e9,
             per="study", backbone=""),
    ]
    return {
        "preset": cfg.name,
        "total_params": _n(m),
        "components": comps,
        "moe": {"experts": moe.n_experts, "top_k": moe.top_k, "shared_experts": moe.n_shared,
                "decoder_params_total": total, "decoder_params_active": active,
                "expert_params": expert, "embedding_params": emb},
        "findings": len(cfg.heads.finding_names),
        "vocab_size": dc.vocab_size,
    }
