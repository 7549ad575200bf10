"""`interpolation.downscale_bilinear` equals `F.interpolate(..., "bilinear", align_corners=False)`.

Exact integer factors per axis (what the decoder's attention levels are: 2, 4, 8) are computed by
strided reads of each block's middle inputs; any other size falls through to F.interpolate itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.m2fp.interpolation import downscale_bilinear


def reference(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 256, 160, 216), (20, 27)),  # the decoder's levels at 640x864: factors 8, 4, 2
        ((1, 256, 160, 216), (40, 54)),
        ((1, 256, 160, 216), (80, 108)),
        ((2, 7, 24, 36), (8, 12)),  # odd factor 3: the middle input
        ((1, 5, 24, 36), (24, 9)),  # one axis kept, the other by 4
        ((1, 5, 48, 40), (6, 20)),  # different factors per axis: 8 and 2
        ((1, 3, 30, 30), (5, 6)),  # factors 6 and 5
    ],
)
def test_exact_factors_equal_interpolate(shape, size) -> None:
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(downscale_bilinear(features, size), reference(features, size))


def test_channels_last_input_and_inference_mode() -> None:
    features = torch.randn(1, 16, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        result = downscale_bilinear(features, (16, 24))
    torch.testing.assert_close(result, reference(features, (16, 24)))


@pytest.mark.parametrize("size", [(53, 72), (160, 216), (7, 9)])
def test_other_sizes_are_interpolate_itself(size) -> None:
    features = torch.randn(1, 4, 160, 216)
    assert torch.equal(downscale_bilinear(features, size), reference(features, size))
