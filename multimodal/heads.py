"""Finding heads: presence, side and coarse location per finding, their loss, and calibration.

A shared trunk over the fused tokens gives, per finding, a presence logit, side logits
(``SIDES``) and coarse-location logits (``HeadsConfig.locations``). Presence probabilities are
calibrated by one temperature (``fit_temperature`` on validation logits, stored in the heads).
A finding may also read a detector's evidence (a classical measurement on the image, e.g. the
lung-nodule detector of ``data.detectors``): its calibrated logit and the evidence are
combined by a logistic fit on validation studies (``fit_evidence_fusion``, stored in the config).

Shape legend: B batch, F fused tokens, K findings, D width, L locations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import vocab

SIDES = ("none", "left", "right", "bilateral")
# Coarse locations: lobes and nodal stations as in the vocabulary, vertebrae grouped by region.
SPINE_REGIONS = ("upper thoracic spine", "lower thoracic spine", "lumbar spine")
DEFAULT_LOCATIONS = ("unspecified",) + vocab.LOBES + vocab.NODE_STATIONS + SPINE_REGIONS


def coarse_location(location: str | None) -> str:
    """A vocabulary location (lobe, nodal station, vertebra) -> its coarse head class."""
    if not location:
        return "unspecified"
    if location in vocab.VERTEBRAE:
        if location.startswith("L"):
            return "lumbar spine"
        return "upper thoracic spine" if int(location[1:]) <= 6 else "lower thoracic spine"
    return location if location in DEFAULT_LOCATIONS else "unspecified"


def side_index(side: str | None) -> int:
    return SIDES.index(side) if side in SIDES else 0


@dataclass
class HeadsConfig:
    finding_names: tuple[str, ...] = vocab.FINDING_NAMES  # stored in the checkpoint's config
    locations: tuple[str, ...] = DEFAULT_LOCATIONS
    presence_weight: float = 1.0
    side_weight: float = 0.3
    location_weight: float = 0.3
    # Finding context: K extra decoder-context tokens, one per finding, made from the heads' own
    # (uncalibrated, detached) presence / side / location predictions. The decoder still writes
    # every word; these tokens tell it compactly what the heads saw, so that its text agrees with
    # the findings table (text-finding consistency) and it learns the mapping in few steps.
    finding_context: bool = False
    # What the finding-context tokens encode. "probs": the heads' raw probabilities (sessions 2-5).
    # "calls": the calls themselves, as the findings table shows them: presence 1/0 at each
    # finding's operating point on the calibrated probability, side and location one-hot (argmax)
    # where called present. "calls" lets training feed the same format from the labels.
    context_mode: str = "probs"
    # Share of training studies whose finding context is built from their labels instead of the
    # heads' calls (teacher forcing of the context; needs context_mode "calls"). The decoder then
    # learns from a clean signal how the calls map to the text; at inference the context always
    # comes from the heads, so the report says what the findings table says.
    context_teacher: float = 0.0
    # Which findings' context tokens carry a side / a location (per finding, finding_names order;
    # empty = all). Training builds the context from labels, and a finding whose labels carry no
    # side (cardiomegaly, hiatal hernia) or no location (pleural effusion) has zeros there; the
    # heads' calls always have an argmax side and location, so without these masks the decoder
    # read, at inference, a token it never saw in training for every such finding called present
    # (session 15: the heart line then ignored a called cardiomegaly). ``medreport train`` fills
    # them from the training labels (app.train_data.call_feature_masks).
    call_sides: tuple[bool, ...] = ()
    call_locations: tuple[bool, ...] = ()
    # Weight of a per-image-token localisation loss (0 = off): with data that knows where each
    # lesion is (the synthetic manifest's lesion centres and radii), every image token gets a
    # finding target, a much denser signal for the image encoder than one label per study.
    token_loss_weight: float = 0.0
    # Presence from the image tokens (multiple-instance learning): each image token gets finding
    # logits (the same layer the token loss trains) and their max over the study's tokens is added
    # to the presence logit. A direct path from the image encoder to the finding calls: in our
    # demo-size runs the fused-token trunk alone stayed at chance while the max-token logits of
    # the same encoder reached val AUC 0.93-0.99 on the large findings (docs/training.md).
    token_presence: bool = False
    # Sharpness r of the token pooling: (1/r)·log(mean(exp(r·logits))) over the study's valid
    # tokens, a smooth max (r -> inf: the max, r -> 0: the mean). Unlike a hard max every token
    # gets gradient, so a study without the finding pushes all its tokens down and the lesion's
    # token, not whichever token happened to be largest, is pushed up in a study with it.
    token_pool_sharpness: float = 4.0
    # Weight of the dense localisation loss (0 = off; training only, read where the image
    # backbone runs). A 1x1 convolution on each intermediate backbone map in ``dense_stages``
    # (timm feature indices: 2 = layer2 at stride 8, 3 = layer3 at stride 16; 16 x 16 and 8 x 8
    # cells for a 128-pixel slab) predicts which findings each cell shows, against the synthetic
    # lesion spheres. The 4 x 4 token loss gives a focal lesion one or two positive cells per
    # slab; the finer maps give it tens, and supervise the stages where small shapes are still
    # resolved (session 10 probe: docs/training.md).
    dense_loss_weight: float = 0.0
    dense_stages: tuple[int, ...] = (2, 3)
    # Token and dense losses: "weighted" = BCE averaged over cells with positives up-weighted
    # (x4); "balanced" = per finding, the mean BCE over its positive cells plus the mean over its
    # negative cells, so a finding that covers 0.1 % of the cells pulls as hard as one covering
    # 10 % (rare, small lesions otherwise hardly move the encoder).
    localisation_loss: str = "weighted"
    # Side and location from where the finding is in the image ("where" heads; needs
    # token_presence): each finding's own token logits weight the image tokens (a softmax over the
    # study's tokens, sharpness ``where_sharpness``), and the weighted mean of the tokens' positions
    # (in-plane cell column and row one-hot, slab height as ``where_z_bins`` soft bins from the
    # first to the last slab) feeds a per-finding linear map to side and location logits, added to
    # the trunk's. Session 15: the trunk's side and location, read from the pooled fused tokens,
    # had collapsed to one answer per finding (val: nodule lobe 23 of 107, pleural effusion side 8
    # of 37), so the calls, the prompt and the text named the wrong lobe and side.
    where_from_tokens: bool = False
    where_sharpness: float = 1.0
    where_z_bins: int = 5
    # Operating points: a finding is called present when its calibrated probability reaches its
    # threshold (same order as finding_names; empty = 0.5 for all). Chosen on the validation split
    # after training (fit_decision_thresholds); the probabilities themselves are not changed.
    decision_thresholds: tuple[float, ...] = ()
    # What the operating points maximise on the validation split: micro F-beta over all findings.
    # 1 = F1 (a missed finding and a false call cost the same); beta > 1 weighs recall, a missed
    # finding costing beta^2 false calls -- the radiologist's preference (a false call is
    # dismissed on the images, a missed nodule is not followed up), and what the report's text
    # needs: the decoder writes what is called, and on the demo test split a missed finding cost
    # BLEU-4 two to three times what a false call did (session 13, docs/training.md).
    operating_beta: float = 1.0
    # Detector evidence (late fusion with a classical detector on the image, as CAD systems are
    # combined with a reader): ``detector_evidence`` names the findings whose presence also reads
    # a per-study evidence score (``ModelInputs.evidence``, data.detectors: "nodule", the log of
    # the best ball-shaped candidate's score; "fracture" and "bone_lesion", the vertebral bodies'
    # sclerosis and lytic share). ``evidence_fusion`` holds, per such
    # finding, (name, w_logit, w_evidence, bias), fitted on the validation split after training
    # (``fit_evidence_fusion``): where a study has the evidence, the finding's calibrated logit
    # z / T becomes w_logit * z / T + w_evidence * evidence + bias. Empty = not fitted, the heads
    # alone (session 23, docs/training.md).
    detector_evidence: tuple[str, ...] = ()
    evidence_fusion: tuple[tuple[str, float, float, float], ...] = ()

    @property
    def num_findings(self) -> int:
        return len(self.finding_names)

    def thresholds(self) -> np.ndarray:
        """[K] decision threshold per finding."""
        if not self.decision_thresholds:
            return np.full(self.num_findings, 0.5)
        if len(self.decision_thresholds) != self.num_findings:
            raise ValueError(f"decision_thresholds has {len(self.decision_thresholds)} values for "
                             f"{self.num_findings} findings; refit them (fit_decision_thresholds) or leave them empty")
        return np.asarray(self.decision_thresholds, dtype=np.float64)

    def fusion_table(self) -> np.ndarray:
        """[K, 3] (w_logit, w_evidence, bias) per finding; (1, 0, 0), the identity, where none is fitted."""
        W = np.tile(np.asarray([1.0, 0.0, 0.0]), (self.num_findings, 1))
        for row in self.evidence_fusion:
            name, *w = row
            if name not in self.finding_names:
                raise ValueError(f"heads.evidence_fusion names {name!r}, which is not a finding of this model; "
                                 "refit the fusion (medreport calibrate) or remove the row")
            W[self.finding_names.index(name)] = w
        return W


@dataclass
class FindingLabels:
    """Targets per study and finding. present: 1/0, or -1 = unknown (ignored);
    side / location: class index, or -100 = unknown / not applicable (ignored)."""

    present_BK: torch.Tensor
    side_BK: torch.Tensor | None = None
    location_BK: torch.Tensor | None = None


def labels_to_targets(
    studies: list[list[dict]], cfg: HeadsConfig, unlisted_as_absent: bool = True
) -> FindingLabels:
    """Manifest ``labels`` lists (one per study) -> head targets.

    ``present`` None (uncertain) -> unknown; findings a study does not list -> absent (0) when
    ``unlisted_as_absent`` (synthetic data labels every planted finding), else unknown (-1).
    Side / location targets only where the finding is present and they are given."""
    B, K = len(studies), cfg.num_findings
    index = {n: k for k, n in enumerate(cfg.finding_names)}
    present = torch.full((B, K), 0.0 if unlisted_as_absent else -1.0)
    side = torch.full((B, K), -100, dtype=torch.long)
    loc = torch.full((B, K), -100, dtype=torch.long)
    for b, labels in enumerate(studies):
        for lab in labels:
            k = index.get(lab.get("finding"))
            if k is None:
                continue
            p = lab.get("present")
            present[b, k] = -1.0 if p is None else float(bool(p))
            if p:
                side[b, k] = side_index(lab.get("side"))
                loc_name = coarse_location(lab.get("location"))
                loc[b, k] = cfg.locations.index(loc_name) if loc_name in cfg.locations else 0
    return FindingLabels(present, side, loc)


@dataclass
class HeadsOutput:
    presence_logits_BK: torch.Tensor
    side_logits_BK4: torch.Tensor
    location_logits_BKL: torch.Tensor
    temperature: torch.Tensor = field(default_factory=lambda: torch.tensor(1.0))
    evidence_BK: torch.Tensor | None = None  # detector evidence, NaN where a study has none
    fusion_K3: torch.Tensor | None = None  # (w_logit, w_evidence, bias) per finding (HeadsConfig.fusion_table)

    @property
    def calibrated_logits_BK(self) -> torch.Tensor:
        """Temperature-scaled presence logits [B, K], fused with the detector evidence where a
        study has it and a fusion is fitted."""
        z_BK = self.presence_logits_BK / self.temperature
        if self.evidence_BK is None or self.fusion_K3 is None:
            return z_BK
        e_BK = self.evidence_BK.to(z_BK)
        W_K3 = self.fusion_K3.to(z_BK)
        fused_BK = W_K3[:, 0] * z_BK + W_K3[:, 1] * torch.nan_to_num(e_BK) + W_K3[:, 2]
        return torch.where(torch.isnan(e_BK), z_BK, fused_BK)

    @property
    def presence_probs(self) -> torch.Tensor:
        """Calibrated presence probabilities [B, K]."""
        return torch.sigmoid(self.calibrated_logits_BK)


class FindingHeads(nn.Module):
    """fused [B, F, D] -> presence logits [B, K], side logits [B, K, 4], location logits [B, K, L].

    A shared trunk reads the mean and the max of the fused tokens (the max keeps evidence that
    lives in few tokens), then one linear layer per output. This plain multi-label classifier
    learns much faster than per-finding attention queries did in our tiny-data tests (the
    queries' attention starts uniform and the shared query dilutes the study's content).
    """

    def __init__(self, cfg: HeadsConfig, dim: int, image_dim: int | None = None,
                 dense_channels: tuple[int, ...] = (), grid: int | None = None):
        super().__init__()
        if cfg.num_findings == 0:
            raise ValueError("HeadsConfig.finding_names is empty: give the finding vocabulary")
        self.cfg = cfg
        K, L = cfg.num_findings, len(cfg.locations)
        self.trunk = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.presence = nn.Linear(dim, K)
        self.side = nn.Linear(dim, K * len(SIDES))
        self.location = nn.Linear(dim, K * L)
        self.register_buffer("temperature", torch.tensor(1.0))
        if cfg.token_presence or cfg.token_loss_weight > 0:
            if image_dim is None:
                raise ValueError("token_presence / token_loss_weight need the image token width: pass image_dim")
            self.token_logits = nn.Linear(image_dim, K)  # image token [D_img] -> K finding logits
        if cfg.token_presence:
            self.token_scale = nn.Parameter(torch.ones(K))
        self.grid = grid
        if cfg.where_from_tokens:
            if not cfg.token_presence or grid is None:
                raise ValueError("heads.where_from_tokens reads the per-token finding logits: it needs "
                                 "heads.token_presence and the image grid (ReportModel passes it)")
            P = 2 * grid + cfg.where_z_bins
            # per finding: position descriptor [P] -> side / location logits; zero = the trunk's alone
            self.where_side = nn.Parameter(torch.zeros(K, P, len(SIDES)))
            self.where_location = nn.Parameter(torch.zeros(K, P, L))
        if cfg.dense_loss_weight > 0:
            if len(dense_channels) != len(cfg.dense_stages):
                raise ValueError(f"dense_loss_weight needs the channels of the {len(cfg.dense_stages)} dense_stages: "
                                 "pass dense_channels (ReportModel does)")
            # one 1x1 convolution per backbone stage: map [V, C_i, h, w] -> finding logits [V, K, h, w]
            self.dense_logits = nn.ModuleList(nn.Conv2d(c, K, 1) for c in dense_channels)
        if cfg.localisation_loss not in ("weighted", "balanced"):
            raise ValueError(f"heads.localisation_loss must be 'weighted' or 'balanced', not {cfg.localisation_loss!r}")
        if cfg.finding_context:
            self.context_emb = nn.Parameter(torch.randn(K, dim) * 0.02)  # [K, D] which finding
            self.context_proj = nn.Linear(1 + len(SIDES) + L, dim)  # prediction -> D
            self.context_norm = nn.LayerNorm(dim)

    def context_tokens(self, out: HeadsOutput, labels: FindingLabels | None = None) -> torch.Tensor | None:
        """[B, K, D] decoder-context tokens from the predictions (None when not configured).

        ``context_mode`` "probs": detached, uncalibrated probabilities (the temperature fitted after
        training does not change what the decoder reads). "calls": the calls (see
        :meth:`call_features`); in training mode, with ``labels``, a ``context_teacher`` share
        of the studies reads its labels instead."""
        if not self.cfg.finding_context:
            return None
        if self.cfg.context_mode == "calls":
            feats = self.call_features(out)  # [B, K, 1+4+L]
            share = self.cfg.context_teacher
            if self.training and labels is not None and share > 0:
                teach_B = torch.rand(feats.shape[0], device=feats.device) < share if share < 1 else \
                    torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
                feats = torch.where(teach_B[:, None, None], self.label_features(labels).to(feats), feats)
        elif self.cfg.context_mode == "probs":
            p_BK1 = torch.sigmoid(out.presence_logits_BK.detach().float())[..., None]  # [B, K, 1]
            side_BK4 = torch.softmax(out.side_logits_BK4.detach().float(), -1)  # [B, K, 4]
            loc_BKL = torch.softmax(out.location_logits_BKL.detach().float(), -1)  # [B, K, L]
            feats = torch.cat([p_BK1, side_BK4 * p_BK1, loc_BKL * p_BK1], -1)  # [B, K, 1+4+L]
        else:
            raise ValueError(f"heads.context_mode must be 'probs' or 'calls', got {self.cfg.context_mode!r}")
        feats = feats.to(self.context_emb.dtype)
        return self.context_norm(self.context_emb + self.context_proj(feats))  # [B, K, D]

    def calls(self, out: HeadsOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads' calls: (present [B, K] bool: calibrated probability at the finding's
        operating point, side index [B, K] into SIDES, location index [B, K] into
        ``cfg.locations``), the most likely side and location."""
        probs_BK = out.presence_probs.detach().float()
        thr_K = torch.as_tensor(self.cfg.thresholds(), dtype=probs_BK.dtype, device=probs_BK.device)
        return probs_BK >= thr_K, out.side_logits_BK4.detach().argmax(-1), out.location_logits_BKL.detach().argmax(-1)

    def call_features(self, out: HeadsOutput) -> torch.Tensor:
        """[B, K, 1+4+L] the heads' calls (:meth:`calls`): presence 1/0, side and location one-hot
        where present, zeros elsewhere."""
        present_BK, side_BK, loc_BK = self.calls(out)
        return self._one_hot_features(present_BK.float(), side_BK, loc_BK)

    def label_features(self, labels: FindingLabels) -> torch.Tensor:
        """[B, K, 1+4+L] the same features from labels (unknown presence reads as absent; an
        unknown side or location of a present finding as all zeros)."""
        present_BK = (labels.present_BK > 0.5).float()
        B, K = present_BK.shape
        unknown = torch.full((B, K), -100, dtype=torch.long, device=present_BK.device)
        side_BK = labels.side_BK if labels.side_BK is not None else unknown
        loc_BK = labels.location_BK if labels.location_BK is not None else unknown
        return self._one_hot_features(present_BK, side_BK.to(present_BK.device), loc_BK.to(present_BK.device))

    def _feature_mask(self, mask: tuple[bool, ...], what: str, ref: torch.Tensor) -> torch.Tensor:
        """[K, 1] 1 where a finding's context carries its ``what`` (HeadsConfig.call_sides / call_locations)."""
        K = self.cfg.num_findings
        if not mask:
            return torch.ones(K, 1, dtype=torch.float32, device=ref.device)
        if len(mask) != K:
            raise ValueError(f"heads.call_{what} has {len(mask)} entries for {K} findings; "
                             "leave it empty or give one per finding (finding_names order)")
        return torch.tensor(mask, dtype=torch.float32, device=ref.device)[:, None]

    def _one_hot_features(self, present_BK: torch.Tensor, side_BK: torch.Tensor, loc_BK: torch.Tensor) -> torch.Tensor:
        L = len(self.cfg.locations)
        side_BK4 = F.one_hot(side_BK.clamp_min(0), len(SIDES)).float() * (side_BK >= 0)[..., None]  # [B, K, 4]
        loc_BKL = F.one_hot(loc_BK.clamp_min(0), L).float() * (loc_BK >= 0)[..., None]  # [B, K, L]
        side_BK4 = side_BK4 * self._feature_mask(self.cfg.call_sides, "sides", side_BK4)  # findings without a side: 0
        loc_BKL = loc_BKL * self._feature_mask(self.cfg.call_locations, "locations", loc_BKL)
        p_BK1 = present_BK[..., None]  # [B, K, 1]
        return torch.cat([p_BK1, side_BK4 * p_BK1, loc_BKL * p_BK1], -1)  # [B, K, 1+4+L]

    def pooled_token_logits(self, tokens_BND: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        """Smooth max (log-mean-exp, sharpness r) over a study's valid image tokens of their
        finding logits -> [B, K]; 0 for a study without image."""
        return self._pool_token_logits(self.token_logits(tokens_BND).float(), mask_BN)

    def _pool_token_logits(self, lg_BNK: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        r = self.cfg.token_pool_sharpness
        m_BN1 = mask_BN.bool()[..., None]  # [B, N, 1]
        lse_BK = torch.logsumexp((r * lg_BNK).masked_fill(~m_BN1, float("-inf")), 1)  # [B, K]
        n_B1 = m_BN1.sum(1).clamp_min(1).float()  # [B, 1]
        pooled_BK = (lse_BK - n_B1.log()) / r
        return torch.where(m_BN1.any(1), pooled_BK, torch.zeros_like(pooled_BK))

    def token_positions(self, mask_BN: torch.Tensor) -> torch.Tensor:
        """[B, N, P] where each image token is: its cell's column and row one-hot (G each) and its
        slab's height among the study's valid slabs as soft bins (``where_z_bins``). Tokens are laid
        out slab by slab, G*G cells per slab in row-major order (``ImageEncoder.tokens_from_features``)."""
        G, nb = self.grid, self.cfg.where_z_bins
        B, N = mask_BN.shape
        S = -(-N // (G * G))  # a padded batch of studies without image may hold one dummy token
        mask_BN = F.pad(mask_BN, (0, S * G * G - N))  # [B, S*G*G]
        cell = torch.arange(G * G, device=mask_BN.device)
        xy_CP = torch.cat([F.one_hot(cell % G, G), F.one_hot(cell // G, G)], -1).float()  # [G*G, 2G]
        valid_BS = mask_BN.view(B, S, G * G)[..., 0].float()  # [B, S]
        rank_BS = valid_BS.cumsum(1) - 1  # the slab's index among the valid ones
        z_BS = rank_BS / (valid_BS.sum(1, keepdim=True) - 1).clamp_min(1)  # 0 first slab .. 1 last
        centres = torch.linspace(0, 1, nb, device=mask_BN.device)
        zb_BSZ = torch.exp(-(((z_BS[..., None] - centres) * max(nb - 1, 1)) ** 2))  # [B, S, nb]
        zb_BSZ = zb_BSZ / zb_BSZ.sum(-1, keepdim=True)
        pos = torch.cat([xy_CP.expand(B, S, -1, -1), zb_BSZ[:, :, None, :].expand(-1, -1, G * G, -1)], -1)
        return pos.reshape(B, S * G * G, -1)[:, :N]  # [B, N, 2G+nb]

    def where_logits(self, lg_BNK: torch.Tensor, mask_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Side [B, K, 4] and location [B, K, L] logits from where each finding's token logits
        (``token_logits`` of the image tokens, [B, N, K]) point."""
        m_BN1 = mask_BN.bool()[..., None]  # [B, N, 1]
        lg_BNK = lg_BNK.masked_fill(~m_BN1, float("-inf"))  # [B, N, K]
        w_BNK = torch.softmax(self.cfg.where_sharpness * lg_BNK, 1).nan_to_num(0.0)  # per finding over tokens
        desc_BKP = torch.einsum("bnk,bnp->bkp", w_BNK, self.token_positions(mask_BN))  # [B, K, P]
        side_BK4 = torch.einsum("bkp,kps->bks", desc_BKP, self.where_side)
        loc_BKL = torch.einsum("bkp,kpl->bkl", desc_BKP, self.where_location)
        return side_BK4, loc_BKL

    def evidence_tensor(self, evidence, batch: int, device=None) -> torch.Tensor | None:
        """Per-study evidence dicts ({finding: score}) -> [B, K] float, NaN where a study has no
        score for a finding or the finding is not in ``cfg.detector_evidence``; None when no study has any."""
        if not evidence or not self.cfg.detector_evidence:
            return None
        names = self.cfg.finding_names
        e_BK = torch.full((batch, len(names)), float("nan"), device=device)
        for b, ev in enumerate(evidence):
            for name, v in (ev or {}).items():
                if name in self.cfg.detector_evidence and name in names and v is not None:
                    e_BK[b, names.index(name)] = float(v)
        return e_BK

    def forward(self, fused_BFD: torch.Tensor, mask_BF: torch.Tensor,
                image_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
                evidence=None) -> HeadsOutput:
        """image_tokens: the image encoder's (tokens [B, N, D_img], mask [B, N]), read when
        ``token_presence`` is on. evidence: per study, a detector's scores ({finding: score} or
        None; ``cfg.detector_evidence``), fused into the calibrated probabilities where fitted."""
        B = fused_BFD.shape[0]
        K = self.cfg.num_findings
        m = mask_BF.bool()[..., None]  # [B, F, 1]
        mean = (fused_BFD * m).sum(1) / m.sum(1).clamp_min(1)  # [B, D]
        mx = fused_BFD.masked_fill(~m, float("-inf")).amax(1)  # [B, D]
        mx = torch.where(m.any(1), mx, torch.zeros_like(mx))
        h = self.trunk(torch.cat([mean, mx], -1))  # [B, D]
        presence_BK = self.presence(h)  # [B, K]
        side_BK4 = self.side(h).view(B, K, len(SIDES))
        loc_BKL = self.location(h).view(B, K, -1)
        if self.cfg.token_presence and image_tokens is not None:
            tokens_BND, mask_BN = image_tokens
            lg_BNK = self.token_logits(tokens_BND).float()  # [B, N, K], read by presence and the where heads
            pooled_BK = self._pool_token_logits(lg_BNK, mask_BN).to(presence_BK.dtype)
            presence_BK = presence_BK + self.token_scale * pooled_BK
            if self.cfg.where_from_tokens:  # needs token_presence (checked in __init__)
                w_side, w_loc = self.where_logits(lg_BNK, mask_BN)
                side_BK4, loc_BKL = side_BK4 + w_side.to(side_BK4.dtype), loc_BKL + w_loc.to(loc_BKL.dtype)
        e_BK = self.evidence_tensor(evidence, B, presence_BK.device)
        W_K3 = None
        if e_BK is not None and self.cfg.evidence_fusion:
            W_K3 = torch.as_tensor(self.cfg.fusion_table(), dtype=torch.float32, device=presence_BK.device)
        return HeadsOutput(presence_BK, side_BK4, loc_BKL, self.temperature, e_BK, W_K3)


def heads_loss(out: HeadsOutput, labels: FindingLabels, cfg: HeadsConfig) -> dict[str, torch.Tensor]:
    """Weighted sum of presence BCE (known labels only), side and location CE (where labelled)."""
    present = labels.present_BK.float()
    known = present >= 0
    bce = F.binary_cross_entropy_with_logits(out.presence_logits_BK, present.clamp(0, 1), reduction="none")
    presence = (bce * known).sum() / known.sum().clamp_min(1)
    zero = out.presence_logits_BK.new_zeros(())
    side = location = zero
    if labels.side_BK is not None and bool((labels.side_BK >= 0).any()):
        side = F.cross_entropy(out.side_logits_BK4.flatten(0, 1), labels.side_BK.flatten(), ignore_index=-100)
    if labels.location_BK is not None and bool((labels.location_BK >= 0).any()):
        location = F.cross_entropy(
            out.location_logits_BKL.flatten(0, 1), labels.location_BK.flatten(), ignore_index=-100
        )
    total = cfg.presence_weight * presence + cfg.side_weight * side + cfg.location_weight * location
    return {"heads": total, "presence": presence, "side": side, "location": location}


def _flat_known(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    lg = torch.as_tensor(np.asarray(logits, dtype=np.float64) if not torch.is_tensor(logits) else logits)
    lb = torch.as_tensor(np.asarray(labels, dtype=np.float64) if not torch.is_tensor(labels) else labels)
    lg, lb = lg.detach().double().flatten(), lb.detach().double().flatten()
    known = lb >= 0
    return lg[known], lb[known]


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """Temperature T > 0 minimising the BCE of sigmoid(logits / T) on held-out data.

    logits, labels: arrays/tensors of the same shape (labels 1/0; negative = unknown, ignored).
    Optimises log T with L-BFGS (1 parameter, converges in a few steps).
    """
    lg, lb = _flat_known(logits, labels)
    if lg.numel() == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(lg / log_t.exp(), lb)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fit_evidence_fusion(z, evidence, labels, l2: float = 1e-3, max_iter: int = 200) -> tuple[float, float, float]:
    """Logistic regression of a finding's labels on its calibrated logit ``z`` (= logit / T) and a
    detector's ``evidence`` (1-D arrays over held-out studies; labels 1/0, negative = unknown, and
    NaN evidence are left out): returns (w_logit, w_evidence, bias), fitted by L-BFGS on the
    mean BCE with an L2 penalty on the (standardised) weights, not the bias. Both weights are kept
    >= 0 (softplus): more evidence, or a higher logit, never lowers the probability, even where a
    few val studies would say so (a detector that separates them perfectly otherwise lets the fit
    trade the heads' sign for nothing; the L2 keeps such a fit finite). Returns the identity
    (1, 0, 0) when the data hold fewer than 5 positives or 5 negatives."""
    z_N = torch.as_tensor(np.asarray(z, dtype=np.float64))
    e_N = torch.as_tensor(np.asarray(evidence, dtype=np.float64))
    y_N = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    keep = (y_N >= 0) & ~torch.isnan(e_N) & ~torch.isnan(z_N)
    z_N, e_N, y_N = z_N[keep], e_N[keep], y_N[keep]
    if int((y_N == 1).sum()) < 5 or int((y_N == 0).sum()) < 5:
        return 1.0, 0.0, 0.0
    X_N2 = torch.stack([z_N, e_N], 1)  # [N, 2]
    mu, sd = X_N2.mean(0), X_N2.std(0).clamp_min(1e-6)  # standardised for a well-conditioned fit
    Xs_N2 = (X_N2 - mu) / sd
    u = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # softplus^-1 of (w_z, w_e), then b; standardised features
    opt = torch.optim.LBFGS([u], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        w2 = F.softplus(u[:2])
        loss = F.binary_cross_entropy_with_logits(Xs_N2 @ w2 + u[2], y_N) + l2 * (w2 ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = F.softplus(u.detach()[:2]) / sd  # back to the raw features
    bias = u.detach()[2] - (w_raw * mu).sum()
    return float(w_raw[0]), float(w_raw[1]), float(bias)


def fit_decision_thresholds(probs, labels, min_positives: int = 10, min_gain: float = 0.002,
                            passes: int = 2, min_lift: float = 1.5, beta: float = 1.0) -> tuple[float, ...]:
    """Per-finding operating points (on a 0.05 grid, 0.10-0.90) that maximise the **micro-F1**
    (micro F-beta with ``beta`` != 1: a missed finding weighs beta^2 false calls) over all
    findings on held-out data, by coordinate ascent from 0.5 (``passes`` sweeps over the
    findings; a finding moves only when that raises the score by ``min_gain``, nearest 0.5 on
    ties). Micro-F1, not each finding's own F1: a finding the model does not see would maximise
    its own F1 by being called in every study, flooding the calls with false positives. A finding
    with fewer than ``min_positives`` known positives or negatives keeps 0.5. An operating point
    other than 0.5 must be informative: its precision on the held-out data at least ``min_lift``
    times the finding's prevalence (calling a finding the model barely sees in nearly every study
    can raise micro-F1 at a 30 % prevalence, but the call then says nothing about the study: found
    in session 7, a nodule called in 297 of 310 test studies).
    probs, labels: [N, K] (labels 1/0, negative = unknown)."""
    if not beta > 0:
        raise ValueError(f"operating-point beta must be > 0, got {beta}")
    P, Y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    K = P.shape[1]
    b2 = float(beta) ** 2
    grid = np.round(np.arange(0.10, 0.901, 0.05), 2)  # [G]
    known, pos = Y >= 0, Y == 1
    pred = P[None] >= grid[:, None, None]  # [G,N,K]
    tp = (pred & pos & known).sum(1)  # [G,K] counts per threshold and finding
    fp = (pred & ~pos & known).sum(1)
    fn = (~pred & pos & known).sum(1)
    half = int(np.argmin(np.abs(grid - 0.5)))
    cur = np.full(K, half)
    cols = np.arange(K)
    prevalence = (pos & known).sum(0) / np.maximum(known.sum(0), 1)  # [K]
    informative = tp >= min_lift * prevalence[None] * np.maximum(tp + fp, 1)  # [G,K] precision >= lift x prevalence
    informative[half] = True

    def micro(sel: np.ndarray) -> float:  # micro F-beta
        t, f, n = tp[sel, cols].sum(), fp[sel, cols].sum(), fn[sel, cols].sum()
        return (1 + b2) * t / ((1 + b2) * t + b2 * n + f) if t + f + n else 1.0

    eligible = [k for k in range(K) if (pos & known)[:, k].sum() >= min_positives
                and (~pos & known)[:, k].sum() >= min_positives]
    for _ in range(passes):
        for k in eligible:
            base = micro(cur)
            scores = []
            for g in range(len(grid)):
                trial = cur.copy()
                trial[k] = g
                scores.append(micro(trial) if informative[g, k] else -1.0)
            scores = np.asarray(scores)
            best = int(np.lexsort((np.abs(grid - 0.5), -scores))[0])  # highest micro-F1, then nearest 0.5
            if scores[best] >= base + min_gain:
                cur[k] = best
    return tuple(float(grid[g]) for g in cur)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE of binary probabilities over all (study, finding) pairs with known labels:
    sum over equal-width probability bins of (bin share) * |observed rate - mean probability|."""
    p, y = _flat_known(probs, labels)
    if p.numel() == 0:
        return 0.0
    bins = torch.clamp((p * n_bins).long(), max=n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.double().mean() * (y[sel].mean() - p[sel].mean()).abs()
    return float(ece)
