"""Image and audio encoders: shapes, masks, padding independence, local backbone weights."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from multimodal.audio_encoder import AudioEncoder, AudioEncoderConfig
from multimodal.image_encoder import ImageEncoder, ImageEncoderConfig
from multimodal.layers import BackboneWeightsError, create_resnet_backbone
from data.errors import MedreportError


@pytest.fixture(scope="module")
def image_encoder():
    torch.manual_seed(0)
    return ImageEncoder(ImageEncoderConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def audio_encoder():
    torch.manual_seed(0)
    return AudioEncoder(AudioEncoderConfig.preset("tiny")).eval()


def test_image_tokens_shapes_and_mask(image_encoder):
    B, S, G = 2, 3, image_encoder.cfg.grid
    slabs = torch.rand(B, S, 3, 64, 64)
    mask = torch.tensor([[True, True, True], [True, False, False]])  # a CT and a radiograph
    z = torch.tensor([[0.0, 10.0, 20.0], [0.0, 0.0, 0.0]])
    with torch.inference_mode():
        tok, tmask = image_encoder(slabs, mask, z)
    assert tok.shape == (B, S * G * G, image_encoder.cfg.dim)
    assert tmask.shape == (B, S * G * G)
    assert tmask.sum(1).tolist() == [3 * G * G, 1 * G * G]
    assert torch.all(tok[1, G * G:] == 0)  # padded slabs are not computed
    assert torch.isfinite(tok).all()


def test_image_padding_does_not_change_valid_tokens(image_encoder):
    """A study gives the same tokens alone or padded in a batch with a longer study."""
    torch.manual_seed(1)
    a = torch.rand(1, 2, 3, 64, 64)
    za = torch.tensor([[5.0, 15.0]])
    with torch.inference_mode():
        alone, _ = image_encoder(a, torch.ones(1, 2, dtype=torch.bool), za)
        batch = torch.cat([torch.cat([a, torch.rand(1, 1, 3, 64, 64)], 1), torch.rand(1, 3, 3, 64, 64)])
        mask = torch.tensor([[True, True, False], [True, True, True]])
        z = torch.tensor([[5.0, 15.0, 0.0], [0.0, 1.0, 2.0]])
        padded, _ = image_encoder(batch, mask, z)
    n = alone.shape[1]
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-5, rtol=1e-4)


def test_image_z_position_matters_relative_only(image_encoder):
    slabs = torch.rand(1, 2, 3, 64, 64)
    m = torch.ones(1, 2, dtype=torch.bool)
    with torch.inference_mode():
        t0, _ = image_encoder(slabs, m, torch.tensor([[0.0, 10.0]]))
        t_shift, _ = image_encoder(slabs, m, torch.tensor([[100.0, 110.0]]))  # same geometry, moved
        t_far, _ = image_encoder(slabs, m, torch.tensor([[0.0, 80.0]]))  # different spacing
    torch.testing.assert_close(t0, t_shift, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(t0, t_far, atol=1e-3)


def test_image_backward_reaches_backbone():
    enc = ImageEncoder(ImageEncoderConfig.preset("tiny"))
    tok, mask = enc(torch.rand(2, 2, 3, 64, 64), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2))
    tok.sum().backward()
    assert enc.backbone.conv1.weight.grad is not None and enc.backbone.conv1.weight.grad.abs().sum() > 0


def test_no_image_in_batch_is_all_masked(image_encoder):
    tok, mask = image_encoder(torch.rand(2, 1, 3, 64, 64), torch.zeros(2, 1, dtype=torch.bool), torch.zeros(2, 1))
    assert not mask.any() and tok.abs().sum() == 0


def test_mip_channels_widen_the_stem_and_in_chans_must_match():
    """mip_windows adds input channels: the backbone's stem takes 3 + len(mip_windows); a config
    whose in_chans disagrees is refused with the value to set."""
    import dataclasses

    cfg = dataclasses.replace(ImageEncoderConfig.preset("tiny"), mip_windows=("lung",), in_chans=4)
    enc = ImageEncoder(cfg).eval()
    stem = next(m for m in enc.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 4
    with torch.inference_mode():
        tok, mask = enc(torch.rand(1, 2, 4, 64, 64), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2))
    assert tok.shape[:2] == mask.shape and bool(mask.all()) and torch.isfinite(tok).all()
    with pytest.raises(ValueError, match="set in_chans to 4"):
        dataclasses.replace(ImageEncoderConfig.preset("tiny"), mip_windows=["lung"])
    assert ImageEncoderConfig.preset("demo").mip_windows == () and ImageEncoderConfig.preset("demo").in_chans == 3


def test_demo_preset_is_narrow_resnet50_layout():
    cfg = ImageEncoderConfig.preset("demo")
    enc = ImageEncoder(cfg)
    layers = [len(getattr(enc.backbone, f"layer{i}")) for i in range(1, 5)]
    assert layers == [3, 4, 6, 3]  # ResNet-50 depth, bottleneck blocks
    assert type(enc.backbone.layer1[0]).__name__ == "Bottleneck"
    assert enc.num_features == cfg.channels[-1] * 4 < 2048


def test_local_backbone_weights_file_is_loaded(tmp_path):
    torch.manual_seed(3)
    src = timm.create_model("resnet50", channels=(8, 16, 32, 64), stem_width=8)  # with its classifier
    f = tmp_path / "backbone.safetensors"
    save_file(src.state_dict(), str(f))
    cfg = ImageEncoderConfig.preset("tiny")
    cfg.weights_file = str(f)
    enc = ImageEncoder(cfg)
    torch.testing.assert_close(enc.backbone.layer4[2].conv3.weight, src.layer4[2].conv3.weight)
    torch.testing.assert_close(enc.backbone.conv1.weight, src.conv1.weight)
    # the one-channel audio trunk adapts the RGB stem (timm sums over input channels)
    aud = create_resnet_backbone("resnet50", 1, (8, 16, 32, 64), 8, 32, str(f))
    torch.testing.assert_close(aud.conv1.weight, src.conv1.weight.sum(1, keepdim=True))


def test_bad_backbone_weights_file_refused(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BackboneWeightsError, match="not found"):
        create_resnet_backbone("resnet50", 3, (8, 16, 32, 64), 8, 32, str(missing))
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"\x80\x04not really")
    with pytest.raises(MedreportError, match="safetensors"):
        create_resnet_backbone("resnet50", 3, (8, 16, 32, 64), 8, 32, str(pth))


def test_audio_tokens_and_absent_audio(audio_encoder):
    B, M, T = 3, audio_encoder.cfg.n_mels, 160
    mel = torch.randn(B, 1, M, T)
    present = torch.tensor([True, False, True])
    with torch.inference_mode():
        tok, mask = audio_encoder(mel, present, lengths_B=torch.tensor([160, 0, 80]))
    N = tok.shape[1]
    assert tok.shape == (B, N, audio_encoder.cfg.dim) and mask.shape == (B, N)
    assert N <= audio_encoder.cfg.max_tokens
    assert mask[0].all() and not mask[1].any()
    assert 0 < mask[2].sum() < N  # shorter clip: later tokens masked
    assert tok[1].abs().sum() == 0 and torch.isfinite(tok).all()
    with torch.inference_mode():
        t2, m2 = audio_encoder(mel, torch.zeros(B, dtype=torch.bool))
    assert not m2.any()


def test_audio_long_clip_is_bounded(audio_encoder):
    with torch.inference_mode():
        tok, mask = audio_encoder(torch.randn(1, 1, audio_encoder.cfg.n_mels, 3000), torch.ones(1, dtype=torch.bool))
    assert tok.shape[1] == audio_encoder.cfg.max_tokens and mask.all()


@pytest.mark.parametrize("output_stride", [32, 16])
def test_backbone_maps_are_one_pass_with_the_intermediate_stages(output_stride):
    """backbone_maps (the dense loss's input) returns the same final map as backbone_features and
    the intermediate stages at the strides and widths the config and timm's feature_info state."""
    torch.manual_seed(0)
    cfg = ImageEncoderConfig.preset("tiny")
    cfg.output_stride = output_stride
    enc = ImageEncoder(cfg).eval()
    slabs, mask = torch.rand(2, 3, 3, 64, 64), torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        final, maps = enc.backbone_maps(slabs, mask, (2, 3))
        ref = enc.backbone_features(slabs, mask)
    torch.testing.assert_close(final, ref)
    for stage, m in zip((2, 3), maps):
        red = cfg.stage_reduction(stage)
        assert red == enc.backbone.feature_info[stage]["reduction"]
        assert m.shape == (3, enc.stage_channels(stage), 64 // red, 64 // red)
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        cfg.stage_reduction(5)
