"""Separable bilinear interpolation taps: what the compiled mask readout resizes with.

Owns the composition of the readout's resize -> crop -> resize (`postprocess.resize_mask_logits`,
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
