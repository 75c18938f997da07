"""Speech model structure (docs/method.md §3.2, §8), FLOP counts and describe."""
import json
import subprocess
import sys

import pytest
import torch

from d2v.config import get_preset
from d2v.estimate.flops import flops_per_sample
from d2v.models import build_model
from d2v.config.schema import AudioFeatureConfig
from d2v.shapes import conv_output_length

AUDIO_CONV_LAYERS = AudioFeatureConfig().conv_layers  # the reference's stack, model.audio.conv_layers' default


def test_frame_counts():
    assert conv_output_length(16_000, AUDIO_CONV_LAYERS) == 49
    assert conv_output_length(320_000, AUDIO_CONV_LAYERS) == 999
    model = build_model(get_preset("audio_tiny"))
    for n in (16_000, 12_345, 400):
        frames = conv_output_length(n, AUDIO_CONV_LAYERS)
        assert model.features(torch.randn(1, n)).x.shape[1] == frames == model.frontend.num_frames(n)


def test_audio_base_parameter_count_and_layout():
    model = build_model(get_preset("audio_base"))
    assert 93_000_000 <= model.num_parameters() <= 95_000_000
    without_head = model.num_parameters() - sum(p.numel() for p in model.head.parameters())
    assert abs(without_head - 93.16e6) < 0.01e6  # transformers' Data2VecAudioModel base
    names = dict(model.named_parameters())
    assert names["frontend.conv_layers.0.conv.weight"].shape == (512, 1, 10)
    assert "frontend.conv_layers.0.conv.bias" not in names
    assert names["encoder.pos_conv.layers.4.conv.weight"].shape == (768, 48, 19)
    assert names["mask_embedding.weight"].shape == (768,)
    assert "encoder.pos_conv.layers.0.layer_norm.weight" not in names  # no affine in positional LNs


def test_tiny_matches_transformers_tiny_count():
    # transformers' Data2VecAudioModel(hidden 64, 2 layers, 4 heads, ffn 128, conv_dim 32): 111,104 parameters.
    model = build_model(get_preset("audio_tiny"))
    assert model.num_parameters() - sum(p.numel() for p in model.head.parameters()) == 111_104


def test_padding_content_never_reaches_valid_frames():
    model = build_model(get_preset("audio_tiny")).eval()
    lengths = torch.tensor([16_000, 24_000])
    batch = torch.randn(2, 24_000)
    batch[0, 16_000:] = 0.0
    noisy = batch.clone()
    noisy[0, 16_000:] = 100 * torch.randn(8_000)
    outs = []
    for wav in (batch, noisy):
        feats = model.features(wav, lengths)
        assert feats.padding_mask is not None
        assert feats.padding_mask[0].sum() == conv_output_length(24_000, AUDIO_CONV_LAYERS) - 49
        assert not feats.padding_mask[1].any()
        outs.append(model.encode(feats.x, feats.padding_mask))
    assert torch.allclose(outs[0][:, :49], outs[1][:, :49], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)


def test_ffn_tap_is_before_residual_and_norm():
    model = build_model(get_preset("audio_tiny")).eval()
    seen = []
    x = torch.randn(2, 30, 64)
    model.encode(x, tap=lambda i, out: seen.append(out))
    block = model.encoder.blocks[0]
    h = block.attention_norm(model.encoder.layer_norm(x + model.encoder.pos_conv(x))
                             + block.attention(model.encoder.layer_norm(x + model.encoder.pos_conv(x))))
    assert torch.allclose(seen[0].ffn, block.ffn.fc2(torch.nn.functional.gelu(block.ffn.fc1(h))), atol=1e-5)
    assert len(seen) == 2


def hand_count_tiny(samples: int) -> dict:
    """audio_tiny by hand: 7 convs of 32 channels, D=64, 2 blocks, FFN 128, 5 pos convs (k19, 16 groups)."""
    spec = [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]
    n, c_in, cnn = samples, 1, 0
    for k, s in spec:
        n = (n - k) // s + 1
        cnn += 2 * c_in * 32 * k * n
        c_in = 32
    T = n
    proj = 2 * 32 * 64 * T
    pos = 5 * 2 * (64 // 16) * 64 * 19 * T
    block = 2 * T * 64 * 64 * 4 + 2 * 2 * T * 64 * 128 + 2 * 2 * T * T * 64
    return {"feature": cnn + proj, "pos": pos, "blocks": 2 * block, "T": T}


def test_flops_match_a_hand_count():
    cfg = get_preset("audio_tiny")
    f = flops_per_sample(cfg, 1.0)
    h = hand_count_tiny(16_000)
    assert h["T"] == 49
    assert f.feature_encoder == h["feature"] and f.positions == h["pos"] and f.blocks == h["blocks"]
    assert f.teacher_forward == h["pos"] + h["blocks"]
    assert f.train_step == pytest.approx(3 * (h["feature"] + h["pos"] + h["blocks"] + f.head) + f.teacher_forward)


def test_describe_cli_json():
    out = subprocess.run([sys.executable, "-m", "d2v", "describe", "audio_tiny", "--json", "--seconds", "1"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["frames_per_second"] == 49
    assert info["flops_per_sample"]["blocks"] == hand_count_tiny(16_000)["blocks"]
    assert info["student_trainable_parameters"] == 115_264


def test_layerdrop_draws_depend_only_on_the_seed():
    cfg = get_preset("audio_base")
    model = build_model(cfg).train()
    enc = model.encoder
    torch.manual_seed(123)  # the global RNG must not matter: every rank draws the same blocks
    a = enc.kept_blocks(42)
    torch.manual_seed(456)
    assert enc.kept_blocks(42) == a
    draws = [len(enc.kept_blocks(s)) for s in range(400)]
    assert abs(1 - sum(draws) / (400 * 12) - cfg.model.layerdrop) < 0.015
    assert len({tuple(enc.kept_blocks(s)) for s in range(50)}) > 1
    assert enc.eval().kept_blocks(42) == list(range(12))
