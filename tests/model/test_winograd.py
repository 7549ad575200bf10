"""Winograd F(4x4, 3x3) and F(2x2, 3x3) (worker/m2fp/winograd.py, csrc/winograd.cpp) against
direct convolution.

The transforms against a float64 convolution on odd shapes (maps smaller than a tile, sizes not a
multiple of 4, channel counts not a multiple of the kernels' 64-channel chunk, batches), where the
route applies, the fused backbone and the Predictor with it against without, and agreement of
whole predictions on the golden weights and the diverse checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.golden_weights import golden_state_dict
from worker.m2fp import fusion, ops, winograd
from worker.m2fp.backbone import Conv2dNormActivation
from worker.m2fp.checkpoint import load_into
from worker.m2fp.config import get_config
from worker.m2fp.cpu import cpu_features
from worker.m2fp.model import M2FP
from worker.m2fp.predictor import Predictor

pytestmark = pytest.mark.skipif(
    winograd.unavailable_reason() is not None,
    reason=f"Winograd route unavailable: {winograd.unavailable_reason()}",
)

# Measured, of the output's largest value: F(4x4) 3e-6 .. 8e-6, F(2x2) about 1e-6 (a direct
# float32 convolution: 2e-7).
RELATIVE_ERROR = {4: 2e-5, 2: 5e-6}
LABEL_AGREEMENT, INSTANCE_AGREEMENT = 0.995, 0.99  # the bar every adopted fast path meets


def random_case(batch, channels, out_channels, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, generator=generator).relu()
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) / (9 * channels) ** 0.5
    bias = torch.randn(out_channels, generator=generator)
    return features, weight, bias


@pytest.mark.parametrize(
    ("batch", "channels", "out_channels", "height", "width"),
    [
        (1, 64, 64, 37, 53),  # neither side a multiple of 4
        (2, 256, 256, 40, 54),  # the res4 shape at 640x864, two images
        (1, 130, 70, 21, 19),  # channel counts across the 64-channel chunks
        (1, 3, 5, 5, 6),
        (1, 16, 24, 1, 1),  # a map smaller than one tile: padding on every side
        (3, 8, 8, 4, 4),  # exactly one tile
    ],
)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("tile", [4, 2])
def test_winograd_conv_equals_a_float64_convolution(
    batch: int, channels: int, out_channels: int, height: int, width: int, relu: bool, tile: int
) -> None:
    features, weight, bias = random_case(batch, channels, out_channels, height, width)
    expected = F.conv2d(features.double(), weight.double(), bias.double(), padding=1)
    if relu:
        expected = expected.relu()
    with torch.inference_mode():
        got = winograd.WinogradConv(weight, bias, relu, tile)(
            features.contiguous(memory_format=torch.channels_last)
        )
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    error = (got.double() - expected).abs().max().item()
    assert error <= RELATIVE_ERROR[tile] * expected.abs().max().item(), error


def test_winograd_conv_takes_an_nchw_map_too() -> None:
    features, weight, bias = random_case(1, 32, 48, 13, 18, seed=1)
    conv = winograd.WinogradConv(weight, bias, relu=True)
    with torch.inference_mode():
        from_nchw = conv(features)
        from_nhwc = conv(features.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(from_nchw, from_nhwc, rtol=0, atol=0)


@pytest.mark.parametrize("tile", [4, 2])
def test_the_products_weight_is_packed_for_onednn_once_and_computes_the_same(tile: int) -> None:
    """Held in oneDNN's blocked layout (not reordered on every call), it is the transformed
    weight bit for bit and gives the plain weight's products, at band sizes other than the one
    it was packed for and with a band of one tile (bit for bit on the Zen 4 of run L; within
    float32 summation order wherever oneDNN would pick another kernel for the packed layout)."""
    features, weight, bias = random_case(1, 32, 48, 26, 35, seed=5)
    conv = winograd.WinogradConv(weight, bias, relu=True, tile=tile)
    plain = winograd.transformed_weight(weight, tile)
    assert conv.weight.is_mkldnn
    assert torch.equal(conv.weight.to_dense(), plain)
    assert torch.equal(torch.cat(conv.position_weights()), plain.flatten(1))
    unpacked = winograd.WinogradConv(weight, bias, relu=True, tile=tile)
    unpacked.weight = plain
    with torch.inference_mode():
        for channels_last in (False, True):
            batch = torch.cat([features, features.flip(2)])
            batch = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
            torch.testing.assert_close(conv(batch), unpacked(batch), rtol=1e-5, atol=1e-5)
        one_tile = features[:, :, :tile, :tile]
        torch.testing.assert_close(conv(one_tile), unpacked(one_tile), rtol=1e-5, atol=1e-5)
        copied = copy.deepcopy(conv)  # int8's quantize_dynamic copies the model
        assert copied.weight is conv.weight and copied.bias is not conv.bias
        torch.testing.assert_close(copied(features), conv(features), rtol=0, atol=0)


def test_the_transforms_refuse_what_they_cannot_read() -> None:
    features, _, bias = random_case(1, 8, 8, 8, 8)
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.m2fp.winograd_input(features, 4, 2, 2, 0, 4)  # NCHW
    channels_last = features.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="tile must be 4"):
        torch.ops.m2fp.winograd_input(channels_last, 3, 3, 3, 0, 9)
    with pytest.raises(RuntimeError, match="do not cover"):
        torch.ops.m2fp.winograd_input(channels_last, 4, 1, 2, 0, 2)
    with pytest.raises(RuntimeError, match="do not cover"):
        torch.ops.m2fp.winograd_input(channels_last, 2, 2, 2, 0, 4)  # 2x2 tiles: 4 x 4 of them
    with pytest.raises(RuntimeError, match="are not among the 4 tiles"):
        torch.ops.m2fp.winograd_input(channels_last, 4, 2, 2, 2, 3)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.m2fp.winograd_input(channels_last.double(), 4, 2, 2, 0, 4)
    out = torch.empty_like(channels_last)
    with pytest.raises(RuntimeError, match="tile must be 4"):
        torch.ops.m2fp.winograd_output(torch.zeros(4, 36 * 8), out, 6, 0, bias, False)
    with pytest.raises(RuntimeError, match="among the 4 tiles"):
        torch.ops.m2fp.winograd_output(torch.zeros(3, 36 * 8), out, 4, 2, bias, False)
    with pytest.raises(RuntimeError, match=r"not \(tiles, 36 \* 8\)"):
        torch.ops.m2fp.winograd_output(torch.zeros(4, 36 * 4), out, 4, 0, bias, False)
    with pytest.raises(RuntimeError, match=r"not \(tiles, 16 \* 8\)"):
        torch.ops.m2fp.winograd_output(torch.zeros(16, 36 * 8), out, 2, 0, bias, False)
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.m2fp.winograd_output(torch.zeros(4, 36 * 8), features, 4, 0, bias, False)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.m2fp.winograd_output(torch.zeros(4, 36 * 8), out, 4, 0, bias[:4], False)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd.WinogradConv(torch.zeros(8, 8, 3, 3), bias, relu=False, tile=6)


@pytest.mark.parametrize("tile", [4, 2])
def test_bands_of_tiles_give_the_whole_map_s_result(monkeypatch, tile: int) -> None:
    """One tile per band, bands across images, a shorter last band: the same outputs as one band
    for everything."""
    features, weight, bias = random_case(2, 24, 40, 9, 14, seed=4)
    conv = winograd.WinogradConv(weight, bias, relu=False, tile=tile)
    total = 2 * (-(-9 // tile)) * (-(-14 // tile))  # 24 tiles of 4x4, 70 of 2x2
    per_tile = winograd.positions(tile) * 64
    with torch.inference_mode():
        whole = conv(features)
        assert winograd.band_tiles(total, per_tile) == total  # the default: one band here
        monkeypatch.setattr(winograd, "BAND_BYTES", 1)
        assert winograd.band_tiles(total, per_tile) == 1
        banded = conv(features)
        monkeypatch.setattr(winograd, "BAND_BYTES", 5 * per_tile * 4)  # at most 5 tiles a band
        assert winograd.band_tiles(total, per_tile) == 5  # 24: 5, 5, 5, 5, 4
        fives = conv(features)
    torch.testing.assert_close(banded, whole, rtol=0, atol=0)
    torch.testing.assert_close(fives, whole, rtol=0, atol=0)


def test_the_route_applies_to_wide_stride_one_3x3_convolutions_only() -> None:
    def conv(channels_in, channels_out, kernel=3, stride=1, padding=1):
        return Conv2dNormActivation(
            channels_in, channels_out, kernel, stride=stride, padding=padding
        )

    amx, avx512, avx2 = (winograd.PLANS[isa] for isa in ("amx", "avx512", "avx2"))
    for plan in (amx, avx512, avx2):
        assert plan.applies(conv(256, 256)) and plan.applies(conv(64, 128))
        assert plan.applies(conv(512, 512))
        assert not plan.applies(conv(256, 256, stride=2))
        assert not plan.applies(conv(256, 256, kernel=1, padding=0))
        assert not plan.applies(conv(256, 256, padding=0))
        assert not plan.applies(conv(32, 32))
    assert avx512.applies(conv(64, 64)) and avx2.applies(conv(64, 64))  # measured per CPU
    assert not amx.applies(conv(64, 64))  # bf16x3 runs them direct on AMX


def test_each_cpu_gets_the_plan_measured_on_its_kind() -> None:
    assert winograd.plan_for(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})).isa == "amx"
    assert winograd.plan_for(frozenset({"avx2", "avx512f", "avx512_bf16"})).isa == "avx512"
    assert winograd.plan_for(frozenset({"avx2"})).isa == "avx2"
    assert winograd.plan_for(frozenset()).isa == "avx2"  # the compiled transforms' baseline
    assert "res4" in winograd.PLANS["avx512"].backbone_tiles  # measured per CPU
    assert "res4" not in winograd.PLANS["avx2"].backbone_tiles


def test_the_reference_mode_switches_the_route_off() -> None:
    previous = ops.mode()
    try:
        ops.configure("reference")
        assert "M2FP_DEFORM_ATTN=reference" in str(winograd.unavailable_reason())
    finally:
        ops.configure(previous)
    assert winograd.unavailable_reason() is None


def small_model() -> M2FP:
    """The CIHP network with 1, 2, 2, 2 blocks per stage (random weights)."""
    return M2FP(dataclasses.replace(get_config("cihp"), backbone_stage_blocks=(1, 2, 2, 2))).eval()


# The tiles each plan gives small_model()'s backbone, in module order: AVX2's the stem's two,
# res2's and res3's (res4 and res5 stay direct there, for memory); AVX-512's those and res4's
# stride-1 middle convolution; AMX's the stem's 64 -> 128 one, res3's and res4's (its 64 -> 64
# ones run direct on the AMX kernel).
SMALL_MODEL_TILES = {"amx": [4, 4, 2], "avx512": [4, 4, 4, 4, 2], "avx2": [4, 4, 4, 4]}


@pytest.mark.parametrize("isa", sorted(winograd.PLANS))
def test_fused_backbone_with_winograd_equals_it_without(isa: str) -> None:
    model = small_model()
    direct = fusion.FusedBackbone(model.backbone)
    fast = fusion.FusedBackbone(model.backbone, winograd.PLANS[isa])
    routed = [module for module in fast.modules() if isinstance(module, winograd.WinogradConv)]
    assert [conv.tile for conv in routed] == SMALL_MODEL_TILES[isa]
    images = torch.randn(1, 3, 96, 136, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected, got = direct(images), fast(images)
    for name, reference in expected.items():
        scale = max(1.0, reference.abs().max().item())
        assert (got[name] - reference).abs().max().item() <= 1e-4 * scale, name


def test_predictor_runs_the_route_and_reports_it() -> None:
    model = small_model()
    on = Predictor(model, precision_mode="fp32")  # on by default, with this CPU's plan
    plan = winograd.plan_for(cpu_features())
    tiles = [*SMALL_MODEL_TILES[plan.isa], 4]  # and the FPN's layer_1
    assert on.winograd_path == (
        f"F(4x4, 3x3) for {tiles.count(4)}, F(2x2, 3x3) for {tiles.count(2)} convolutions "
        f"({plan.isa} plan)"
    )
    layer = on.model.get_submodule(f"{fusion.PIXEL_DECODER_PATH}.layer_1")
    assert isinstance(layer, fusion.WinogradNormConv)
    assert not isinstance(
        model.get_submodule(f"{fusion.PIXEL_DECODER_PATH}.layer_1"), fusion.WinogradNormConv
    )
    assert Predictor(model, use_winograd=False).winograd_path == "off: switched off"
    unfused = Predictor(model, fuse_backbone=False, use_winograd=True)
    assert unfused.winograd_path == "off: the fused CPU backbone does not run"
    # bf16 on the CPU is oneDNN's bf16 math around the same modules: the same route.
    bf16 = Predictor(model, precision_mode="bf16", use_winograd=True)
    assert bf16.winograd_path == on.winograd_path


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["golden", "diverse"])
def test_predictions_with_winograd_agree_with_direct_convolution(weights: str) -> None:
    """Whole predicts at 320x427 with the route and without. Measured at 640x853: golden 100 %
    of labels and instances, the diverse checkpoint (13 classes) 100 % / 99.9996 %."""
    from bench.model_bench import synthetic_image
    from tests.diverse_weights import config_at, diverse_state_dict

    size = (320, 427)
    model = M2FP(config_at(*size))
    recipe = golden_state_dict if weights == "golden" else diverse_state_dict
    load_into(model, recipe(get_config("cihp")))
    model.eval()
    image = synthetic_image(*size)
    fast = Predictor(model, max_side=max(size), precision_mode="fp32", use_winograd=True)
    assert (
        fast.winograd_path
        == {  # the full network: stem, res2-res5 blocks, the FPN's layer_1
            "amx": "F(4x4, 3x3) for 5, F(2x2, 3x3) for 22 convolutions (amx plan)",
            "avx512": "F(4x4, 3x3) for 9, F(2x2, 3x3) for 22 convolutions (avx512 plan)",
            "avx2": "F(4x4, 3x3) for 9, F(2x2, 3x3) for 0 convolutions (avx2 plan)",
        }[winograd.plan_for(cpu_features()).isa]
    )
    direct = Predictor(model, max_side=max(size), precision_mode="fp32", use_winograd=False)
    got, baseline = fast.predict(image), direct.predict(image)
    if weights == "diverse":
        assert len(baseline.classes_present) >= 8
    labels = float(np.mean(got.label_map == baseline.label_map))
    instances = float(np.mean(got.instance_map == baseline.instance_map))
    assert labels >= LABEL_AGREEMENT and instances >= INSTANCE_AGREEMENT, (labels, instances)
