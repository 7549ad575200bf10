"""worker.m2fp.dense: oneDNN's products equal MKL's, and fall back where they must not run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.m2fp import dense, fusion
from worker.m2fp.config import get_config
from worker.m2fp.model import M2FP
from worker.m2fp.predictor import Predictor

pytestmark = pytest.mark.skipif(not dense.available(), reason="this torch has no oneDNN linear")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "shape",
    [(37, 64), (2, 37, 64), "transposed", "sliced"],
    ids=["2d", "3d", "transposed", "sliced"],
)
@pytest.mark.parametrize("post", ["none", "relu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_f_linear(shape, post: str, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    if shape == "transposed":  # (Q, B, C) from a (B, Q, C) tensor, as the decoder has it
        x = torch.randn(2, 37, 64, generator=generator).transpose(0, 1)
    elif shape == "sliced":
        x = torch.randn(74, 64, generator=generator)[::2]
    else:
        x = torch.randn(*shape, generator=generator)
    weight = torch.randn(96, 64, generator=generator)
    bias = torch.randn(96, generator=generator) if with_bias else None
    expected = F.linear(x, weight, bias)
    if post == "relu":
        expected = expected.relu()
    with torch.inference_mode():
        got = dense.linear(x, weight, bias, post)
    assert got.shape == expected.shape
    assert relative(got, expected) <= 1e-5


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("batched_matrix", [False, True])
def test_matrix_times_map_equals_bmm(layout: str, batch: int, batched_matrix: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(batch, 48, 13, 17, generator=generator)  # odd sizes
    if layout == "channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    matrix = torch.randn(*((batch,) if batched_matrix else ()), 20, 48, generator=generator)
    expected = torch.einsum(
        "bqc,bchw->bqhw", matrix.expand(batch, -1, -1) if not batched_matrix else matrix, features
    )
    with torch.inference_mode():
        got = dense.matrix_times_map(matrix, features)
    assert got.shape == (batch, 20, 13, 17)
    assert got.is_contiguous()  # NCHW whatever the input's layout
    assert relative(got, expected) <= 1e-5


def test_falls_back_where_onednn_must_not_run() -> None:
    """With autograd on (no backward for oneDNN's op), under autocast and inside `as_built()`
    the products are MKL's; float64 too."""
    x, weight = torch.randn(5, 8, requires_grad=True), torch.randn(3, 8)
    dense.linear(x, weight, None).sum().backward()  # would raise without a backward
    assert x.grad is not None
    with torch.inference_mode():
        assert dense.applies(x.detach(), weight)
        assert not dense.applies(x.detach().double(), weight.double())
        with dense.as_built():
            assert not dense.applies(x.detach(), weight)
        assert dense.applies(x.detach(), weight)  # restored
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not dense.applies(x.detach(), weight)


def test_with_onednn_linears_shares_weights_and_keys() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Sequential(nn.Linear(16, 4, bias=False)),
        nn.MultiheadAttention(4, 2),
    ).eval()
    converted = fusion.with_onednn_linears(model)
    linears = [m for m in converted.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(isinstance(m, fusion.OneDNNLinear) for m in linears)
    assert not any(isinstance(m, fusion.OneDNNLinear) for m in model.modules())  # unchanged
    assert list(converted.state_dict()) == list(model.state_dict())
    for (_, a), (_, b) in zip(converted.named_parameters(), model.named_parameters(), strict=True):
        assert a is b
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model[2](model[1](model[0](x)))
        got = converted[2](converted[1](converted[0](x)))
        tokens = torch.randn(5, 1, 4)
        attended, _ = converted[3](tokens, tokens, tokens)
        reference, _ = model[3](tokens, tokens, tokens)
    assert relative(got, expected) <= 1e-5
    assert relative(attended, reference) <= 1e-5


def test_the_network_through_onednn_equals_it_as_built() -> None:
    """A small CIHP network with every dense product through oneDNN (the Predictor's fp32 CPU
    path) gives the logits it gives through MKL, and the Predictor says which path runs.

    Seeded: the decoder's attention masks are `sigmoid(mask logit) < 0.5`, so a draw of random
    weights that puts a logit within rounding of 0 flips a mask pixel between the two paths and
    moves the outputs by ~1e-3. Drawn from whatever state the suite had left, that happened once
    on an Intel Xeon (run J); seeds 0-15 all gave 1-3e-6 there."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = dataclasses.replace(get_config("cihp"), backbone_stage_blocks=(1, 1, 1, 1))
        model = M2FP(config).eval()
    converted = fusion.with_onednn_linears(model)
    images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(3)) * 255
    with torch.inference_mode():
        padded, _ = model.normalize_and_pad(images)
        with dense.as_built():
            expected = model(padded)
        got = converted(padded)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(getattr(got, key), getattr(expected, key), rtol=1e-4, atol=1e-4)
    assert Predictor(model, precision_mode="fp32").dense_path == "oneDNN"
    assert Predictor(model, precision_mode="int8").dense_path == "as built"


def test_strided_weights_are_copied_to_a_dense_layout() -> None:
    """oneDNN takes a row- or column-major weight in place; one with other strides (a head of
    interleaved heads) would take its slow path, so `linear` makes it contiguous first."""
    generator = torch.Generator().manual_seed(4)
    interleaved = torch.randn(300, 1, 8, 32, generator=generator)  # (S, B, heads, D)
    head = interleaved[:, 0, 3]  # (300, 32), row stride 256
    transposed = head.t()  # (32, 300): neither row- nor column-major
    x = torch.randn(10, 300, generator=generator)
    assert not (transposed.is_contiguous() or transposed.t().is_contiguous())
    with torch.inference_mode():
        got = dense.linear(x, transposed, None)
        got_rows = dense.linear(torch.randn(10, 32, generator=generator), head, None)
    assert relative(got, F.linear(x, transposed)) <= 1e-5
    assert got_rows.shape == (10, 300)
