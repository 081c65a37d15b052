"""Cross-modal attention fusion of image, audio and history tokens into F fused tokens.

Steps (all in width ``FusionConfig.dim``):

1. Each modality's tokens are projected, and a learned type embedding is added. The history
   reaches fusion only as a bounded summary: ``HistorySummary`` block-pools the decoder's token
   embeddings of the record into at most ``n_history_tokens`` tokens, whatever its length.
2. ``n_layers`` rounds of cross-attention in both directions: image <-> history summary and
   audio <-> history summary. Every key set starts with a learned per-modality *null* token, so
   attention is well defined when a modality is absent (it then reads the null token only).
3. Attention pooling: ``n_fused`` learned queries pool each modality separately, plus a
   token-wise max of the modality (projected, added to every pooled token) so that evidence
   confined to a few tokens is not diluted while attention is still uniform.
4. Gates: a small MLP scores each modality from its mean token; a softmax over the modalities
   *present in that study* gives the gate weights (an absent modality gets exactly 0, the
   others renormalise). fused = sum_m gate_m * pooled_m, projected to the decoder width.

The gates are returned per study ([B, 3], order ``MODALITIES``) so the UI can show them.

Shape legend: B batch, N tokens, L history length, D width, F fused tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from multimodal.layers import CrossAttentionBlock

MODALITIES = ("image", "audio", "history")


@dataclass
class FusionConfig:
    dim: int = 256
    n_heads: int = 4
    n_layers: int = 2
    n_fused: int = 32  # F: fused tokens handed to every decoder layer
    n_history_tokens: int = 64  # bound on the history summary
    # The history digest (the record's last, relevant sentences) pooled apart into this many more
    # history tokens (0 = the digest is pooled with the record; ReportModel.history_tokens).
    n_digest_tokens: int = 0
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    # One extra fused token: the max over the image tokens (encoder output, before any mixing
    # with the history), not gated. A direct image path for the heads and the decoder.
    image_max_token: bool = False

    @classmethod
    def preset(cls, name: str) -> "FusionConfig":
        presets = {
            "tiny": cls(dim=64, n_heads=2, n_layers=1, n_fused=8, n_history_tokens=8),
            "demo": cls(dim=256, n_heads=4, n_layers=1, n_fused=32, n_history_tokens=32),  # 1 layer: CPU budget
            "full": cls(dim=512, n_heads=8, n_layers=3, n_fused=64, n_history_tokens=64),
        }
        if name not in presets:
            raise KeyError(f"unknown fusion preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


class HistorySummary(nn.Module):
    """Token embeddings [B, L, E] + mask [B, L] -> summary [B, n, E] + mask [B, n].

    Each record's valid tokens are cut into n contiguous, equal blocks (n = min(n_max, length))
    and mean-pooled, so the summary is bounded however long the record is. Hand-written as a
    scatter-add because the block size differs per study (no library op pools ragged segments).
    """

    def __init__(self, n_max: int):
        super().__init__()
        self.n_max = n_max

    def forward(self, emb_BLE: torch.Tensor, mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, E = emb_BLE.shape
        n = self.n_max
        lengths_B = mask_BL.sum(1)  # [B]
        # Position of each token among its record's valid tokens (works for left or right padding).
        pos_BL = mask_BL.long().cumsum(1) - 1
        seg_BL = (pos_BL * n) // lengths_B.clamp_min(1)[:, None]  # block index 0..n-1
        seg_BL = torch.where(mask_BL, seg_BL, torch.full_like(seg_BL, n))  # padding -> dump slot n
        sums = emb_BLE.new_zeros(B, n + 1, E).scatter_add_(1, seg_BL[..., None].expand(B, L, E), emb_BLE)
        counts = emb_BLE.new_zeros(B, n + 1).scatter_add_(1, seg_BL, mask_BL.to(emb_BLE.dtype))
        summary = sums[:, :n] / counts[:, :n, None].clamp_min(1)  # [B, n, E]
        return summary, counts[:, :n] > 0


class Fusion(nn.Module):
    """(image, audio, history-summary) tokens -> fused [B, F, D_out], mask [B, F], gates [B, 3]."""

    def __init__(self, cfg: FusionConfig, image_dim: int, audio_dim: int, history_dim: int, out_dim: int):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.in_proj = nn.ModuleDict(
            {
                "image": nn.Linear(image_dim, D),
                "audio": nn.Linear(audio_dim, D),
                "history": nn.Linear(history_dim, D),
            }
        )
        self.type_emb = nn.Parameter(torch.zeros(len(MODALITIES), D))
        self.null_tok = nn.Parameter(torch.zeros(len(MODALITIES), D))
        self.hist_pos = nn.Parameter(torch.zeros(cfg.n_history_tokens + cfg.n_digest_tokens, D))
        for p in (self.type_emb, self.null_tok, self.hist_pos):
            nn.init.trunc_normal_(p, std=0.02)

        def block() -> CrossAttentionBlock:
            return CrossAttentionBlock(D, cfg.n_heads, cfg.mlp_ratio, cfg.dropout)

        # Per layer: image<-history, history<-image, history<-audio, audio<-history.
        self.layers = nn.ModuleList(
            nn.ModuleDict({"img_from_hist": block(), "hist_from_img": block(),
                           "hist_from_aud": block(), "aud_from_hist": block()})
            for _ in range(cfg.n_layers)
        )
        self.pool_queries = nn.Parameter(torch.zeros(cfg.n_fused, D))
        nn.init.trunc_normal_(self.pool_queries, std=0.02)
        self.pool = CrossAttentionBlock(D, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, query_residual=False)
        # Max-pooled companion: a finding often lives in a handful of tokens (one lesion in one slab);
        # attention pooling starts near-uniform and dilutes it ~N-fold, so learning is slow. A
        # token-wise max (multiple-instance learning) carries the strongest evidence from step one.
        self.max_proj = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D))
        self.gate_mlp = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D // 2), nn.GELU(), nn.Linear(D // 2, 1))
        self.gate_bias = nn.Parameter(torch.zeros(len(MODALITIES)))
        self.out = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, out_dim))
        if cfg.image_max_token:
            self.image_skip = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, out_dim))

    def _with_null(self, idx: int, tok_BND: torch.Tensor, mask_BN: torch.Tensor):
        """Prepend modality idx's null token (always valid) to a key set."""
        B = tok_BND.shape[0]
        null = self.null_tok[idx].expand(B, 1, -1)
        ones = torch.ones(B, 1, dtype=torch.bool, device=mask_BN.device)
        return torch.cat([null, tok_BND], 1), torch.cat([ones, mask_BN], 1)

    def forward(
        self,
        image: tuple[torch.Tensor, torch.Tensor],
        audio: tuple[torch.Tensor, torch.Tensor],
        history: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each argument is (tokens [B, N_m, D_m], mask [B, N_m]); a modality may be all-masked."""
        toks, masks = [], []
        for i, (name, (t, m)) in enumerate(zip(MODALITIES, (image, audio, history))):
            x = self.in_proj[name](t) + self.type_emb[i]
            if name == "history":
                x = x + self.hist_pos[: x.shape[1]]
            toks.append(x * m[..., None].to(x.dtype))  # zero padded tokens (keeps them finite)
            masks.append(m.bool())
        img, aud, hist = toks
        img_m, aud_m, hist_m = masks

        for layer in self.layers:
            hist_kv = self._with_null(2, hist, hist_m)
            img_kv = self._with_null(0, img, img_m)
            aud_kv = self._with_null(1, aud, aud_m)
            img_new, _ = layer["img_from_hist"](img, *hist_kv)
            hist_new, _ = layer["hist_from_img"](hist, *img_kv)
            hist_new, _ = layer["hist_from_aud"](hist_new, *aud_kv)
            aud_new, _ = layer["aud_from_hist"](aud, *hist_kv)
            img, hist, aud = img_new, hist_new, aud_new

        # Attention pooling of each modality to F tokens, with the same queries.
        B = img.shape[0]
        q = self.pool_queries.expand(B, -1, -1)
        pooled, scores = [], []
        for i, (t, m) in enumerate(zip((img, aud, hist), (img_m, aud_m, hist_m))):
            p, _ = self.pool(q, *self._with_null(i, t, m))  # [B, F, D]
            mx = t.masked_fill(~m[..., None], float("-inf")).amax(1)  # [B, D]
            mx = torch.where(m.any(1, keepdim=True), mx, torch.zeros_like(mx))  # absent: 0
            pooled.append(p + self.max_proj(mx)[:, None, :])
            mf = m[..., None].to(t.dtype)
            mean = (t * mf).sum(1) / mf.sum(1).clamp_min(1)  # [B, D]
            scores.append(self.gate_mlp(mean).squeeze(-1) + self.gate_bias[i])  # [B]
        present_BM = torch.stack([m.any(1) for m in (img_m, aud_m, hist_m)], 1)  # [B, 3]
        score_BM = torch.stack(scores, 1).masked_fill(~present_BM, float("-inf"))
        # Softmax over present modalities; a study with none present gets all-zero gates.
        gates_BM = torch.softmax(score_BM, dim=1).nan_to_num(0.0)
        fused = sum(gates_BM[:, i, None, None] * pooled[i] for i in range(len(MODALITIES)))  # [B, F, D]
        fused_BFD = self.out(fused)
        # Always valid: with no modality at all the tokens are a learned constant (finite), which
        # keeps the decoder's cross-attention well defined (an all-masked row would give NaN).
        mask_BF = torch.ones(B, self.cfg.n_fused, dtype=torch.bool, device=fused_BFD.device)
        if self.cfg.image_max_token:
            t0, m0 = image
            mx = t0.masked_fill(~m0.bool()[..., None], float("-inf")).amax(1)  # [B, D_img]
            mx = torch.where(m0.bool().any(1, keepdim=True), mx, torch.zeros_like(mx))  # no image: 0
            fused_BFD = torch.cat([fused_BFD, self.image_skip(mx)[:, None, :]], 1)  # [B, F+1, D]
            mask_BF = torch.cat([mask_BF, torch.ones(B, 1, dtype=torch.bool, device=mask_BF.device)], 1)
        return fused_BFD, mask_BF, gates_BM
