"""Separable bilinear interpolation: the compiled mask readout's taps, and exact integer downscales.

Owns `downscale_bilinear`, the decoder's resize of its mask features to each attention level:
`F.interpolate(..., mode="bilinear", align_corners=False)` by an exact integer factor s per axis
(the levels are H/32, H/16, H/8 of a map at H/4, and padded sizes are multiples of 32: s = 8, 4,
2) samples every output at s * d + (s - 1) / 2, i.e. the mean of the two middle inputs of each
block of s (s even) or its middle input (s odd): strided reads from offset (s - 1) // 2, one axis
after the other. PyTorch's CPU bilinear kernel copies a 256-channel NCHW map to channels-last
before shrinking it to the two small levels (35 MB per copy at 640x864), where these read 4 values
per output in place: 5.27 + 6.13 -> 0.68 + 1.18 ms. Other sizes go to F.interpolate.

And the composition of the readout's resize -> crop -> resize (`postprocess.resize_mask_logits`,
multi-human: no crop box) into one set of taps per axis, so that the resized maps are
`out = Ay . M . Ax^T` with Ay (H x h) and Ax (W x w) holding at most 4 nonzeros per row. Each
stage follows PyTorch's CPU rule for `F.interpolate(size=..., mode="bilinear", align_corners=False)`
with no scale factor: scale = in / out (float32), src = scale * (dst + 0.5) - 0.5 clamped at 0,
i0 = min(floor(src), in - 1), i1 = min(i0 + 1, in - 1), lambda = clamp(src - i0, 0, 1), weights
(1 - lambda, lambda); an output as large as its input is the identity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TAPS = 4


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One bilinear stage: (out, 2) int64 source indices and (out, 2) float32 weights."""
    if in_size == out_size:
        index = np.arange(out_size, dtype=np.int64)
        weights = np.zeros((out_size, 2), dtype=np.float32)
        weights[:, 0] = 1.0
        return np.stack([index, index], axis=1), weights
    scale = np.float32(in_size) / np.float32(out_size)
    destination = np.arange(out_size, dtype=np.float32)
    # One rounding of scale * (dst + 0.5) - 0.5, as PyTorch's kernel gets it from a fused multiply-add
    # (the product is exact in float64).
    product = np.float64(scale) * (destination + np.float32(0.5)).astype(np.float64)
    source = np.maximum((product - 0.5).astype(np.float32), np.float32(0))
    first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    lam = np.clip(source - first.astype(np.float32), np.float32(0), np.float32(1))
    second = np.minimum(first + 1, in_size - 1)
    weights = np.stack([np.float32(1) - lam, lam], axis=1).astype(np.float32)
    return np.stack([first, second], axis=1), weights


def readout_taps(
    low_size: int, padded_size: int, image_size: int, output_size: int, resize_again: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps of one axis, (output_size, 4) int64 indices into the low-res axis and float32 weights.

    Stage 1 resizes `low_size` to `padded_size`, the crop keeps its first `image_size` entries, and
    stage 2 (when `resize_again`, i.e. the cropped maps are not already at the output size)
    resizes those to `output_size`.
    """
    first_index, first_weight = linear_taps(low_size, padded_size)
    if resize_again:
        second_index, second_weight = linear_taps(image_size, output_size)
    else:
        second_index, second_weight = linear_taps(output_size, output_size)
    index = first_index[second_index]  # (out, 2, 2): stage-2 tap, then stage-1 tap
    weight = second_weight.astype(np.float64)[:, :, None] * first_weight[second_index]
    return (
        torch.from_numpy(np.ascontiguousarray(index.reshape(-1, TAPS))),
        torch.from_numpy(np.ascontiguousarray(weight.reshape(-1, TAPS).astype(np.float32))),
    )


def mask_taps(
    low_size: tuple[int, int],
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_index, y_weight, x_index, x_weight) of `resize_mask_logits` without a crop box."""
    if min(image_size[0], image_size[1]) < 1 or any(
        image > padded for image, padded in zip(image_size, padded_size, strict=True)
    ):
        raise ValueError(f"image_size {image_size} must lie inside padded_size {padded_size}")
    resize_again = tuple(image_size) != tuple(output_size)
    y_index, y_weight = readout_taps(
        low_size[0], padded_size[0], image_size[0], output_size[0], resize_again
    )
    x_index, x_weight = readout_taps(
        low_size[1], padded_size[1], image_size[1], output_size[1], resize_again
    )
    return y_index, y_weight, x_index, x_weight


def _exact_factor(in_size: int, out_size: int) -> int | None:
    """The integer factor in / out, or None when out does not divide in."""
    if out_size < 1 or in_size % out_size:
        return None
    return in_size // out_size


def downscale_bilinear(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(features, size, mode="bilinear", align_corners=False)` of a (B, C, H, W) map.

    Equal to it up to float32 summation order (~1e-7 relative) where H / h and W / w are integers;
    computed by F.interpolate itself otherwise.
    """
    (height, width), (out_height, out_width) = features.shape[-2:], size
    factor_y, factor_x = _exact_factor(height, out_height), _exact_factor(width, out_width)
    if factor_y is None or factor_x is None or factor_y == factor_x == 1:
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    rows = _middle(features, -2, factor_y)  # (B, C, h, W): rows of the blocks' middles
    return _middle(rows, -1, factor_x)


def _middle(features: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """Along `axis`, each block of `factor` inputs as bilinear sampling at its centre reads it: the
    mean of its two middle inputs (even factor) or its middle input (odd factor)."""
    offset = (factor - 1) // 2
    first = features.narrow(axis, offset, features.shape[axis] - offset)
    picked = first[..., ::factor, :] if axis == -2 else first[..., ::factor]
    if factor % 2:
        return picked
    second = features.narrow(axis, offset + 1, features.shape[axis] - offset - 1)
    neighbour = second[..., ::factor, :] if axis == -2 else second[..., ::factor]
    return (picked + neighbour) * 0.5
