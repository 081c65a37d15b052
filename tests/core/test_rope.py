"""RoPE, full and partial (``rope_fraction``): the slow pairs stay unrotated, scores keep depending
on relative position only, and the unrotated channels match content at any distance."""
import pytest
import torch

from core.attention import AttentionConfig, BlockSparseAttention
from core.rope import apply_rope, rope_angles, rotated_pairs


def _rotate(x, pos, fraction, d=16, base=500_000.0):
    cos, sin = rope_angles(torch.as_tensor(pos), d, base, torch.float64, fraction)
    return apply_rope(x, cos, sin)


@pytest.mark.parametrize("fraction,n_rot", [(1.0, 8), (0.5, 4), (0.25, 2), (0.0, 0)])
def test_partial_rope_leaves_the_slowest_pairs_unrotated(fraction, n_rot):
    d = 16
    assert rotated_pairs(d, fraction) == n_rot
    pos = torch.tensor([0, 1, 7, 99_999])
    cos, sin = rope_angles(pos, d, 500_000.0, torch.float64, fraction)
    full_cos, full_sin = rope_angles(pos, d, 500_000.0, torch.float64)
    # the fastest n_rot pairs are exactly full RoPE's; the rest are the identity at every position
    torch.testing.assert_close(cos[:, :n_rot], full_cos[:, :n_rot], rtol=0, atol=0)
    torch.testing.assert_close(sin[:, :n_rot], full_sin[:, :n_rot], rtol=0, atol=0)
    assert (cos[:, n_rot:] == 1).all() and (sin[:, n_rot:] == 0).all()
    x = torch.randn(1, 1, 4, d, dtype=torch.float64)
    y = apply_rope(x, cos, sin)
    half = d // 2  # rotate-half layout: pair i is (channel i, channel i + d/2)
    for ch in list(range(n_rot, half)) + list(range(half + n_rot, d)):
        torch.testing.assert_close(y[..., ch], x[..., ch], rtol=0, atol=0)
    if n_rot:
        assert not torch.allclose(y[..., 2, :n_rot], x[..., 2, :n_rot])  # position 7 turns the fast pairs


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_scores_depend_on_relative_position_only(fraction):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64, generator=g)
    for dist in (3, 4_000, 90_000):
        scores = [(_rotate(q, [p + dist], fraction) * _rotate(k, [p], fraction)).sum() for p in (0, 17, 5_000)]
        torch.testing.assert_close(torch.stack(scores), scores[0].expand(3), rtol=1e-9, atol=1e-9)


def test_unrotated_channels_match_content_at_any_distance():
    """What partial RoPE is for: a query/key pair that lives in the unrotated channels scores the
    same at distance 10 as at 100,000 tokens, where full RoPE's slow pairs have turned it away."""
    d = 16
    q = torch.zeros(1, 1, 1, d, dtype=torch.float64)
    q[..., 7], q[..., 15] = 1.0, 1.0  # the slowest pair
    k = q.clone()

    def score(fraction, dist):
        return float((_rotate(q, [dist], fraction, d) * _rotate(k, [0], fraction, d)).sum())

    assert score(0.5, 10) == pytest.approx(2.0, abs=1e-12)
    assert score(0.5, 100_000) == pytest.approx(2.0, abs=1e-12)
    assert score(1.0, 10) == pytest.approx(2.0, abs=1e-3)  # barely turned at short range...
    assert score(1.0, 100_000) < 1.5  # ...and turned away at 100K (base 500,000, d = 16)


def test_attention_config_takes_the_fraction_and_the_module_applies_it():
    with pytest.raises(ValueError, match="rope_fraction"):
        AttentionConfig(rope_fraction=1.5)
    assert AttentionConfig.from_dict({}).rope_fraction == 1.0  # configs saved before the field load as full RoPE
    torch.manual_seed(0)
    cfg = AttentionConfig(d_model=32, n_heads=2, head_dim=16, block_size=8, compress_block=16, chunk_blocks=4,
                          rope_fraction=0.0)
    att = BlockSparseAttention(cfg)
    x = torch.randn(1, 40, 32)
    q, k, _, _ = att._qkvg(x, torch.arange(40))
    q0, k0, _ = att.wqkv(x).view(1, 40, 3, 2, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(q, q0)  # fraction 0: no rotation at all (NoPE)
    torch.testing.assert_close(k, k0)
