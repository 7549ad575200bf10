"""Winograd F(4x4, 3x3) for the CPU inference path's 3x3, stride-1 convolutions (float32).

Owns `WinogradConv` (a folded 3x3 convolution with its bias and ReLU, computed as 36 matrix
products between two transforms), `transformed_weight` (the weight transform, in float64),
`applies` (which convolutions take this route), `unavailable_reason` (whether this process can
run it) and `describe` (what the Predictor reports). The two transforms are the compiled ops
`m2fp::winograd_input` / `m2fp::winograd_output` (csrc/winograd.cpp, which states the algorithm
and its layout); the 36 products are one grouped 1x1 convolution through oneDNN (`groups=36`), so
they run at the library's GEMM speed on every CPU it supports.

A direct 3x3 convolution performs 144 multiply-adds per 4x4 outputs and channel pair, this route
36 plus the transforms' additions. The route is numerically a different summation: about 25x
a direct float32 convolution's rounding (6e-6 of the output's largest value at 256 channels),
which the golden suites and tests/model/test_winograd.py hold it to.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.m2fp import ops

POSITIONS = 36  # a transformed 6x6 tile
# Lavin and Gray's F(4x4, 3x3) matrices (interpolation points 0, +-1, +-2, infinity)
G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
# The products saved grow with C * K per pixel, the transforms' memory traffic with C + K: below
# C * K / (C + K) = 40 the route does not pay (64 -> 64 channels: 22.2 vs 22.6 ms at 320x432, 5.65
# vs 5.89 ms at 160x216; 64 -> 128: 31.3 vs 44.7 ms; docs/BENCHMARKS.md, "Winograd").
MIN_CHANNEL_RATIO = 40
# A convolution runs in bands of tiles whose transformed tiles and products take at most this:
# the whole map at once needed up to 240 MB of temporaries (the stem's), which the tuned malloc
# then returned to the kernel and faulted in again on every image (160,000 faults per predict).
# Smaller bands make the products smaller matrices: the FPN's layer_1 took 48.6 ms in bands of
# 24 MB, 41.5 ms in 64 MB, 38.4 ms whole (medians of 11, interleaved; direct: 93.5 ms).
BAND_BYTES = 64 << 20


def unavailable_reason() -> str | None:
    """Why the route cannot run in this process (None: it can): the compiled transforms must be
    loaded and allowed (`M2FP_DEFORM_ATTN` other than `reference` switches every op off), and this
    torch must have oneDNN's convolution for the products."""
    if ops.mode() == "reference":
        return "M2FP_DEFORM_ATTN=reference switches the compiled ops off"
    status = ops.status()
    if not {"winograd_input", "winograd_output"} <= set(status["ops"]):
        return status["reason"] or "the compiled library has no Winograd transforms"
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return "this torch has no oneDNN convolution"
    return None


def applies(conv: nn.Conv2d) -> bool:
    """Whether `conv` takes the Winograd route: 3x3, stride 1, padding 1, dilation 1, ungrouped,
    and wide enough to pay (`MIN_CHANNEL_RATIO`)."""
    channels_in, channels_out = conv.in_channels, conv.out_channels
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and channels_in * channels_out >= MIN_CHANNEL_RATIO * (channels_in + channels_out)
    )


def transformed_weight(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T of a (K, C, 3, 3) weight, as oneDNN's grouped 1x1 weight (36 * K, C, 1, 1):
    group t = 6 * i + j holds position (i, j) of every output channel's transformed tile."""
    kernels = weight.detach().to(torch.float64)
    transformed = torch.einsum("ai,kcij,bj->abkc", G, kernels, G)  # (6, 6, K, C)
    out_channels, in_channels = weight.shape[:2]
    return (
        transformed.reshape(POSITIONS * out_channels, in_channels, 1, 1)
        .to(torch.float32)
        .contiguous()
    )


class WinogradConv(nn.Module):
    """A 3x3, stride-1, padding-1 convolution with bias and optional ReLU, F(4x4, 3x3) on CPU.

    Takes and returns channels-last (N, C, H, W) float32 maps, like the fused backbone's
    convolutions.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> None:
        super().__init__()
        self.out_channels = int(weight.shape[0])
        self.register_buffer("weight", transformed_weight(weight))
        self.register_buffer("bias", bias.detach().float().contiguous())
        self.relu = relu

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Transform the 6x6 patches, multiply per position, transform back, + bias, ReLU;
        in bands of tiles (`band_tiles`)."""
        batch, channels, height, width = features.shape
        features = features.contiguous(memory_format=torch.channels_last)
        tiles_h, tiles_w = (height + 3) // 4, (width + 3) // 4
        out = torch.empty(
            (batch, self.out_channels, height, width), memory_format=torch.channels_last
        )
        total = batch * tiles_h * tiles_w
        band = band_tiles(total, channels, self.out_channels)
        for first in range(0, total, band):
            count = min(band, total - first)
            tiles = torch.ops.m2fp.winograd_input(features, tiles_h, tiles_w, first, count)
            # (count, 36 * C) row-major is a channels-last (1, 36 * C, count, 1) map: the products
            # are a grouped 1x1 convolution over it, which answers channels-last (count, 36 * K).
            grouped = tiles.view(1, count, 1, POSITIONS * channels).permute(0, 3, 1, 2)
            products = torch.ops.mkldnn._convolution_pointwise(
                grouped, self.weight, None, [0, 0], [1, 1], [1, 1], POSITIONS, "none", [], ""
            )
            products = products.permute(0, 2, 3, 1).reshape(count, POSITIONS * self.out_channels)
            torch.ops.m2fp.winograd_output(products.contiguous(), out, first, self.bias, self.relu)
        return out


def band_tiles(total: int, channels: int, out_channels: int) -> int:
    """Tiles per band of `total`: as few bands as keep each within `BAND_BYTES` of transformed
    tiles and products, all of one size (the last one may be smaller)."""
    most = max(1, BAND_BYTES // (POSITIONS * (channels + out_channels) * 4))
    bands = -(-total // most)
    return -(-total // bands)


def describe(model: nn.Module) -> str:
    """What runs in `model`: "F(4x4, 3x3) for N convolutions"."""
    count = sum(isinstance(module, WinogradConv) for module in model.modules())
    return f"F(4x4, 3x3) for {count} convolutions"
