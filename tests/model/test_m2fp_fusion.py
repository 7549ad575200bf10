"""The fused CPU backbone (worker/m2fp/fusion.py) against the backbone as built and the golden data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.golden_weights import golden_state_dict
from tests.model.golden_cases import (
    NET_CASES,
    REL_TOLERANCE,
    compare_with_golden,
    flatten_outputs,
    keys_file,
    load_case,
)
from worker.m2fp import fusion
from worker.m2fp.backbone import DeepLabResNet
from worker.m2fp.checkpoint import load_into
from worker.m2fp.config import get_config
from worker.m2fp.model import M2FP
from worker.m2fp.predictor import Predictor

pytestmark = pytest.mark.skipif(not fusion.available(), reason="this torch has no oneDNN")

LABEL_AGREEMENT, INSTANCE_AGREEMENT = 0.995, 0.99  # the bar every adopted fast path meets


def small_backbone() -> DeepLabResNet:
    """A two-blocks-per-stage ResNet with non-trivial frozen batch norms (random statistics)."""
    config = dataclasses.replace(get_config("cihp"), backbone_stage_blocks=(2, 2, 2, 2))
    backbone = DeepLabResNet(config).eval()
    generator = torch.Generator().manual_seed(0)
    for name, buffer in backbone.named_buffers():
        shape = buffer.shape
        if name.endswith("running_var"):
            buffer.copy_(torch.rand(shape, generator=generator) + 0.5)
        elif name.endswith(("running_mean", "bias")):
            buffer.copy_(torch.randn(shape, generator=generator) * 0.1)
        elif name.endswith("weight"):
            buffer.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.5)
    return backbone


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 96), (2, 96, 64), (1, 160, 224)])
def test_fused_backbone_equals_the_backbone_as_built(batch: int, height: int, width: int) -> None:
    backbone = small_backbone()
    fused = fusion.FusedBackbone(backbone)
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = backbone(images), fused(images)
    assert list(got) == list(expected) == ["res2", "res3", "res4", "res5"]
    for name, reference in expected.items():
        assert got[name].shape == reference.shape
        scale = max(1.0, reference.abs().max().item())
        difference = (got[name] - reference).abs().max().item()
        assert difference <= 1e-5 * scale, (name, difference, scale)


def test_folding_refuses_a_norm_it_cannot_fold() -> None:
    backbone = small_backbone()
    backbone.stem.conv1.norm = torch.nn.GroupNorm(4, backbone.stem.conv1.out_channels)
    with pytest.raises(TypeError, match="GroupNorm"):
        fusion.FusedBackbone(backbone)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "variant"), NET_CASES)
def test_fused_network_matches_golden(case: str, variant: str) -> None:
    model = M2FP(get_config(variant))
    load_into(model, golden_state_dict(keys_file=keys_file(variant)))
    fused = fusion.with_fused_backbone(model.eval())
    assert isinstance(model.backbone, DeepLabResNet)  # the original is left as it was
    assert isinstance(fused.backbone, fusion.FusedBackbone)
    arrays = load_case(case)
    with_intermediates = "aux_pred_logits" in arrays
    with torch.inference_mode():
        output = fused(
            torch.from_numpy(arrays["model_input"]), return_intermediates=with_intermediates
        )
    failures = compare_with_golden(case, arrays, flatten_outputs(output), REL_TOLERANCE, {})
    assert not failures, f"{case} (fused): " + "; ".join(failures)


def test_predictor_fuses_where_it_applies_and_reports_it() -> None:
    model = M2FP(dataclasses.replace(get_config("cihp"), backbone_stage_blocks=(1, 1, 1, 1)))
    assert Predictor(model, precision_mode="fp32").backbone_path == "fused"
    assert isinstance(Predictor(model, precision_mode="fp32").model.backbone, fusion.FusedBackbone)
    assert Predictor(model, precision_mode="bf16").backbone_path == "fused"  # oneDNN's bf16 math
    unfused = Predictor(model, precision_mode="fp32", fuse_backbone=False)
    assert unfused.backbone_path == "as built: fusion switched off"
    assert isinstance(unfused.model.backbone, DeepLabResNet)
    assert isinstance(model.backbone, DeepLabResNet)
    assert Predictor(model, precision_mode="bf16", fuse_backbone=True).backbone_path == "fused"


@pytest.mark.slow
def test_fused_predictions_agree_with_the_backbone_as_built() -> None:
    """The diverse checkpoint (14 classes on the synthetic photo): fused vs as built, whole predict."""
    from bench.model_bench import synthetic_image
    from tests.diverse_weights import config_at, diverse_state_dict

    size = (160, 213)
    model = M2FP(config_at(*size))
    load_into(model, diverse_state_dict(get_config("cihp")))
    image = synthetic_image(*size)
    fused = Predictor(model, max_side=max(size), precision_mode="fp32").predict(image)
    built = Predictor(model, max_side=max(size), precision_mode="fp32", fuse_backbone=False)
    baseline = built.predict(image)
    assert len(baseline.classes_present) >= 8
    labels = float(np.mean(fused.label_map == baseline.label_map))
    instances = float(np.mean(fused.instance_map == baseline.instance_map))
    assert labels >= LABEL_AGREEMENT and instances >= INSTANCE_AGREEMENT, (labels, instances)


@pytest.mark.parametrize("shape", [(1, 256, 20, 27), (2, 5, 33, 31), (1, 3, 1, 1), (1, 8, 0, 4)])
def test_channels_first_equals_contiguous(shape, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocked transposition gives `.contiguous()`'s NCHW map bit for bit (blocks that do
    not divide the pixels, a batch of 2, empty maps); NCHW and other strides pass through it."""
    monkeypatch.setattr(fusion, "NCHW_BLOCK_PIXELS", 64)
    nchw = torch.randn(shape)
    channels_last = nchw.contiguous(memory_format=torch.channels_last)
    out = fusion.channels_first(channels_last)
    assert out.is_contiguous()
    assert torch.equal(out, nchw)
    assert fusion.channels_first(nchw) is nchw
    transposed = nchw.transpose(2, 3)  # neither layout: `.contiguous()`
    assert torch.equal(fusion.channels_first(transposed), transposed.contiguous())


def test_fused_encoder_equals_the_encoder_as_built() -> None:
    """The encoder FFNs as oneDNN linears (ReLU a post-op): same outputs within fp32 rounding,
    the model as built untouched, and the Predictor says it runs them."""
    model = M2FP(dataclasses.replace(get_config("cihp"), backbone_stage_blocks=(1, 1, 1, 1))).eval()
    fused = fusion.with_fused_encoder(model)
    layers = fused.get_submodule(fusion.ENCODER_PATH + ".layers")
    assert all(isinstance(layer, fusion.FusedEncoderLayer) for layer in layers)
    assert not any(
        isinstance(layer, fusion.FusedEncoderLayer)
        for layer in model.get_submodule(fusion.ENCODER_PATH + ".layers")
    )
    images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(2)) * 255
    with torch.inference_mode():
        padded, _ = model.normalize_and_pad(images)
        expected = model.sem_seg_head.pixel_decoder(model.backbone(padded))
        got = fused.sem_seg_head.pixel_decoder(model.backbone(padded))
    for want, have in zip([expected[0], *expected[1]], [got[0], *got[1]], strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert Predictor(model, precision_mode="fp32").encoder_path == "fused FFN"
    assert Predictor(model, precision_mode="fp32", fuse_backbone=False).encoder_path == "as built"
