"""bf16x3 on AMX (worker/m2fp/amx.py, csrc/amx_gemm.cpp): the op against float64, its modules
against oneDNN's fp32, and its refusal where it cannot run.

The products themselves need a CPU with AMX-BF16 (an Intel Xeon of the 4th generation or later)
and are skipped elsewhere, like the CUDA parity test on a machine without a GPU; the refusal and
the precision's fallback run everywhere. Bound: 1e-5 of the output's largest value (measured
2.2-5.3e-6 on run K's Xeon; oneDNN's fp32 5-9e-7; one bf16 product ~3e-3).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from worker.m2fp import amx, dense, fusion, ops, winograd
from worker.m2fp.config import get_config
from worker.m2fp.model import M2FP
from worker.m2fp.predictor import Predictor

ops.configure("auto")
MISSING = amx.unavailable_reason()
needs_amx = pytest.mark.skipif(MISSING is not None, reason=f"no AMX here: {MISSING}")
BOUND = 1e-5


def relative_error(out: torch.Tensor, reference: torch.Tensor, scale: float | None = None) -> float:
    """max |out - reference| over `scale` (default: max |reference|)."""
    scale = float(reference.abs().max()) if scale is None else scale
    return float((out.double() - reference).abs().max()) / scale


@pytest.mark.skipif(MISSING is None, reason="AMX runs here: nothing to refuse")
def test_without_amx_the_op_refuses_and_bf16x3_is_not_offered() -> None:
    if "amx_linear" in ops.status()["ops"]:
        packed = torch.zeros((2, 1, 1, 512), dtype=torch.int16)
        with pytest.raises(RuntimeError, match="cannot run AMX"):
            torch.ops.m2fp.amx_linear(torch.zeros(2, 8), packed, 4, None, None, False)
    model = M2FP(dataclasses.replace(get_config("tiny")))
    assert Predictor(model).precision == "fp32"  # auto
    with pytest.raises(ValueError, match="bf16x3 needs AMX"):
        Predictor(model, precision_mode="bf16x3")


@needs_amx
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 1, 1), (37, 70, 50), (100, 256, 256), (513, 1024, 33), (2048, 96, 300)]
)
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias+residual+relu"])
def test_linear_equals_float64(m: int, k: int, n: int, epilogue: str) -> None:
    generator = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k + 3, generator=generator)[:, 2 : k + 2]  # rows with a stride
    weight = torch.randn(n, k, generator=generator) / k**0.5
    bias = torch.randn(n, generator=generator) if epilogue != "none" else None
    residual = torch.randn(m, n, generator=generator) if "residual" in epilogue else None
    packed = amx.PackedWeight(weight)
    out = amx.linear(x, packed, bias, relu="relu" in epilogue, residual=residual)
    reference = x.double() @ weight.double().T
    if bias is not None:
        reference += bias.double()
    if residual is not None:
        reference = torch.relu(reference + residual.double())
    assert out.shape == (m, n) and out.dtype == torch.float32
    # The products' error scales with the terms they sum, not with what is left after they cancel.
    magnitude = x.double().abs() @ weight.double().abs().T
    magnitude += 0 if bias is None else bias.double().abs()
    magnitude += 0 if residual is None else residual.double().abs()
    assert relative_error(out, reference, float(magnitude.max())) <= BOUND


@needs_amx
def test_three_products_are_far_closer_than_one() -> None:
    """bf16x3, not bf16: against float64 at least 30x closer than a single bf16 product."""
    generator = torch.Generator().manual_seed(3)
    x, weight = (
        torch.randn(256, 512, generator=generator),
        torch.randn(384, 512, generator=generator),
    )
    reference = x.double() @ weight.double().T
    single = (x.bfloat16().double() @ weight.bfloat16().double().T).float()
    three = amx.linear(x, amx.PackedWeight(weight), None)
    assert relative_error(three, reference) * 30 < relative_error(single, reference)
    assert not torch.equal(three, x @ weight.T)


@needs_amx
def test_linear_into_writes_its_column_slice_only() -> None:
    x, weight = torch.randn(70, 64), torch.randn(48, 64)
    out = torch.full((70, 3 * 48), 7.0)
    torch.ops.m2fp.amx_linear_into(
        x, amx.PackedWeight(weight).tiles, 48, None, False, out[:, 48:96]
    )
    assert relative_error(out[:, 48:96], x.double() @ weight.double().T) <= BOUND
    assert bool((out[:, :48] == 7).all() and (out[:, 96:] == 7).all())


@needs_amx
def test_the_op_says_what_is_wrong_with_its_operands() -> None:
    packed = amx.PackedWeight(torch.randn(16, 32)).tiles
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.m2fp.amx_linear(
            torch.zeros(4, 32, dtype=torch.float64), packed, 16, None, None, False
        )
    with pytest.raises(RuntimeError, match="does not hold a"):
        torch.ops.m2fp.amx_linear(torch.zeros(4, 64), packed, 16, None, None, False)
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.m2fp.amx_linear(torch.zeros(4, 32), packed, 16, None, torch.zeros(4, 8), False)


@needs_amx
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_equals_float64(stride: int) -> None:
    generator = torch.Generator().manual_seed(stride)
    features = torch.randn(2, 96, 13, 17, generator=generator)
    features = features.contiguous(memory_format=torch.channels_last)
    weight, bias = (
        torch.randn(80, 96, 1, 1, generator=generator),
        torch.randn(80, generator=generator),
    )
    reference = F.conv2d(features.double(), weight.double(), bias.double(), stride=stride)
    residual = torch.randn(reference.shape, generator=generator)
    out = amx.pointwise_conv(features, amx.PackedWeight(weight), bias, True, stride, residual)
    assert out.shape == reference.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, torch.relu(reference + residual.double())) <= BOUND


@needs_amx
@pytest.mark.parametrize("tile", [2])  # F(4x4) keeps oneDNN's fp32 products (fusion.with_amx)
def test_winograd_with_amx_products_equals_float64(tile: int) -> None:
    generator = torch.Generator().manual_seed(tile)
    features = torch.randn(1, 64, 21, 30, generator=generator)
    weight, bias = (
        torch.randn(48, 64, 3, 3, generator=generator) / 24,
        torch.randn(48, generator=generator),
    )
    conv = winograd.WinogradConv(weight, bias, relu=False, tile=tile)
    conv.pack_for_amx()
    assert conv.weight.numel() == 0  # held once, as tiles
    reference = F.conv2d(features.double(), weight.double(), bias.double(), padding=1)
    with torch.no_grad():
        out = conv(features)
    assert relative_error(out, reference) <= BOUND


@needs_amx
def test_bf16x3_predictor_packs_every_product_and_stays_near_fp32() -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(get_config("cihp"), backbone_stage_blocks=(1, 1, 1, 1))
    model = M2FP(config).eval()
    auto, strict = Predictor(model), Predictor(model, precision_mode="fp32")
    assert auto.precision == "bf16x3" and strict.amx_path == "off: precision fp32"
    for module in auto.model.modules():  # every product packed, each weight held once
        if isinstance(module, fusion.OneDNNLinear) and module.packed is not None:
            assert module.weight.numel() == 0
        elif isinstance(module, torch.nn.Linear):  # an attention's output projection
            assert dense.weight_key(module.weight) in auto._amx_packs
    with torch.enable_grad(), pytest.raises(RuntimeError, match="inference only"):
        auto.model.backbone(torch.zeros(1, 3, 64, 64))
    pointwise = [
        m for m in auto.model.modules() if isinstance(m, fusion.FusedConv) and m.pointwise()
    ]
    assert pointwise and all(module.packed is not None for module in pointwise)
    image = torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8).numpy()
    ours, theirs = auto.infer(image), strict.infer(image)
    for a, b in ((ours.pred_logits, theirs.pred_logits), (ours.pred_masks, theirs.pred_masks)):
        assert relative_error(a, b.double()) < 1e-3


@needs_amx
@pytest.mark.parametrize(
    ("stride", "channels", "height", "width"), [(1, 64, 13, 17), (2, 32, 14, 20), (2, 96, 9, 11)]
)
def test_conv3x3_equals_float64(stride: int, channels: int, height: int, width: int) -> None:
    generator = torch.Generator().manual_seed(channels + stride)
    features = torch.randn(2, channels, height, width, generator=generator)
    features = features.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(40, channels, 3, 3, generator=generator) / (3 * channels**0.5)
    bias = torch.randn(40, generator=generator)
    out = amx.conv3x3(features, amx.conv3x3_weight(weight), bias, True, stride)
    reference = torch.relu(
        F.conv2d(features.double(), weight.double(), bias.double(), stride=stride, padding=1)
    )
    assert out.shape == reference.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, reference) <= BOUND
