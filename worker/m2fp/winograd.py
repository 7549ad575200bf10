"""Winograd convolution, F(4x4, 3x3) and F(2x2, 3x3), for the CPU inference path's 3x3,
stride-1 convolutions (float32).

Owns `WinogradConv` (a folded 3x3 convolution with its bias and ReLU, computed as (m+2)^2 matrix
products between two transforms), `transformed_weight` (the weight transform, in float64),
`shape_applies` (which convolutions have the route's geometry), `Plan` / `plan_for` (where each
variant runs on a CPU with given flags), `unavailable_reason` (whether this process can run it)
and `describe` (what the Predictor reports). The two transforms are the compiled ops
`m2fp::winograd_input` / `m2fp::winograd_output` (csrc/winograd.cpp, which states the algorithm
and its layout); the
products are one grouped 1x1 convolution through oneDNN (`groups=(m+2)^2`), so they run at the
library's GEMM speed on every CPU it supports, their weight held in oneDNN's own layout
(`products_weight`).

A direct 3x3 convolution performs 9 multiply-adds per output and channel pair; F(4x4, 3x3) 36
per 16 outputs (2.25), F(2x2, 3x3) 16 per 4 (4), plus the transforms' additions. The cost is
memory: the transformed weights take 36/9 = 4x (F(4x4)) or 16/9 = 1.8x (F(2x2)) the direct
ones, and the inference process keeps them. And the route is numerically a different summation:
F(4x4) about 25x a direct float32 convolution's rounding (6e-6 of the output's largest value at
256 channels), which the golden suites and tests/model/test_winograd.py hold it to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from worker.m2fp import amx, dense, ops

# Lavin and Gray's weight transforms G (interpolation points 0, +-1, +-2, infinity for 4x4 tiles,
# 0, +-1, infinity for 2x2), per output tile size
G = {
    4: torch.tensor(
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        dtype=torch.float64,
    ),
    2: torch.tensor(
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], dtype=torch.float64
    ),
}


@dataclass(frozen=True)
class Plan:
    """Where the route runs on one kind of CPU: the tile per backbone stage (the stem counts as
    one; a stage not named stays direct), the pixel decoder's `layer_1` tile, and the least
    C * K / (C + K) of a convolution that takes it (the products saved grow with C * K per pixel,
    the transforms' memory traffic with C + K)."""

    isa: str
    backbone_tiles: dict[str, int]
    fpn_tile: int
    min_channel_ratio: int

    def applies(self, conv: nn.Conv2d) -> bool:
        """Whether `conv` takes the route under this plan (`shape_applies` and wide enough)."""
        channels_in, channels_out = conv.in_channels, conv.out_channels
        ratio = channels_in * channels_out / (channels_in + channels_out)
        return shape_applies(conv) and ratio >= self.min_channel_ratio

    def tile_for(self, conv: nn.Conv2d, stage: str) -> int | None:
        """The tile `conv` of `stage` (a backbone stage, or `FPN_STAGE`) runs with, None: direct."""
        tile = self.fpn_tile if stage == FPN_STAGE else self.backbone_tiles.get(stage)
        return tile if tile is not None and self.applies(conv) else None


FPN_STAGE = "fpn"  # the pixel decoder's layer_1, as a stage name for `Plan.tile_for`


# Measured at 640x864, per convolution, direct vs F(4x4) vs F(2x2) (docs/BENCHMARKS.md, runs H-L):
# - AVX-512 (Zen 5): F(4x4) wherever its weights are small: the stem's 64 -> 128 convolution
#   (44.0 -> 34.1 ms), res3's 128-channel ones (5.6 -> 3.5 ms each); res4's 22 convolutions of 256
#   channels take F(2x2) (5.9 -> 4.0 ms): with F(4x4) (3.6 ms) their weights took 155 MB more
#   than direct (9.4 instead of 2.4 MB each), past the worker's 1.5 GB; F(2x2) takes 4.2 MB each;
#   res5 stays direct (6.4 -> 5.1 ms for 7 MB more weights each, within the noise of the
#   forward). The 64 -> 64 ones (C * K / (C + K) = 32) take F(4x4) since run L: on Zen 4, whose
#   512-bit multiply-adds take two cycles, stem conv2 45.4 -> 31.0 ms and res2's 11.3 -> 6.9 ms
#   (the whole forward 0.982x, interleaved, labels 99.9998 % equal); on Zen 5 20.4 vs 22.6 and
#   4.7 vs 5.6 ms (run H; an earlier run 24.0 vs 22.9), on the Xeon 32.8 vs 34.6, 8.5 vs 8.3 ms.
# - AVX2 only (Zen 3), where a direct convolution is bound by the fp32 multiply-adds (115 GFLOP/s
#   on 2 cores) and every one saved shows: the 64 -> 64 ones pay too (stem conv2 72.6 -> 62.9 ms,
#   res2's 15.6 -> 14.6 ms), res3's 18.1 -> 11.0 ms, the FPN's layer_1 239.4 -> 127.2 ms (medians).
#   res4 and res5 stay direct here: F(2x2) would save 3.6 ms on each of res4's 22 (18.4 -> 14.8)
#   and 5.6 on res5's 2, for 55 MB more weights, and with them the real-size worker bench peaked
#   at 1511 MiB, past the worker's 1.5 GB (1427 MiB without them; direct convolution 1448).
# - AMX (the Xeon of run K): AVX-512's plan as it was there, the 64 -> 64 convolutions direct. In
#   bf16x3 they run on the AMX kernel (one product with K = 9 C), which ran the stem's 64 -> 128 one
#   in 46.0 ms against F(4x4)'s 49.2 on oneDNN fp32; F(4x4) for the 64 -> 64 ones was not measured
#   there, so that CPU keeps what was.
PLANS = {
    "amx": Plan("amx", {"stem": 4, "res2": 4, "res3": 4, "res4": 2}, 4, 40),
    "avx512": Plan("avx512", {"stem": 4, "res2": 4, "res3": 4, "res4": 2}, 4, 32),
    "avx2": Plan("avx2", {"stem": 4, "res2": 4, "res3": 4}, 4, 32),
}


def plan_for(features: frozenset[str]) -> Plan:
    """The plan for a CPU with these flags (`worker.m2fp.cpu.cpu_features()`): AMX's where
    `amx_bf16` is there, AVX-512's where `avx512f` is, else AVX2's (the compiled transforms'
    baseline, x86-64-v3)."""
    if "amx_bf16" in features:
        return PLANS["amx"]
    return PLANS["avx512" if "avx512f" in features else "avx2"]


# A convolution runs in bands of tiles whose transformed tiles and products take at most this:
# the whole map at once needed up to 240 MB of temporaries (the stem's), which the tuned malloc
# then returned to the kernel and faulted in again on every image (160,000 faults per predict).
# Smaller bands make the products smaller matrices: the FPN's layer_1 took 48.6 ms in bands of
# 24 MB, 42.8 in 40 MB, 41.5 ms in 64 MB, 38.4 ms whole (medians of 11, interleaved; direct:
# 93.5 ms); larger bands leave a larger heap (RSS after four predicts of varied sizes: 1289 MiB
# at 32 MB, 1513 MiB at 64 MB, 1349 MiB with direct convolution in the same sequence).
BAND_BYTES = 32 << 20
TRANSFORM_CHUNK = 32  # output channels per step of the weight transform


def positions(tile: int) -> int:
    """The (tile + 2)^2 positions of a transformed input patch."""
    return (tile + 2) ** 2


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


def shape_applies(conv: nn.Conv2d) -> bool:
    """Whether `conv` has the route's geometry: 3x3, stride 1, padding 1, dilation 1, ungrouped."""
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
    )


def transformed_weight(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """G g G^T of a (K, C, 3, 3) weight, as oneDNN's grouped 1x1 weight (T * K, C, 1, 1), T the
    tile's positions: group t = (tile + 2) * i + j holds position (i, j) of every output
    channel's transformed tile.

    Computed in float64 a few output channels at a time: the inference process's heap keeps
    what it frees (worker/m2fp/allocator.py), and float64 temporaries of whole weights left
    900 MB of it resident after the CIHP network's 29 transforms.
    """
    out_channels, in_channels = weight.shape[:2]
    side, matrix = tile + 2, G[tile]
    transformed = torch.empty((side, side, out_channels, in_channels), dtype=torch.float32)
    for first in range(0, out_channels, TRANSFORM_CHUNK):
        kernels = weight.detach()[first : first + TRANSFORM_CHUNK].to(torch.float64)
        chunk = torch.einsum("ai,kcij,bj->abkc", matrix, kernels, matrix)
        transformed[:, :, first : first + TRANSFORM_CHUNK] = chunk
    return transformed.reshape(side * side * out_channels, in_channels, 1, 1)


def products_weight(transformed: torch.Tensor, tile: int) -> torch.Tensor:
    """The (T * K, C, 1, 1) transformed weight in oneDNN's blocked layout for the products'
    grouped 1x1 convolution (`dense.packed_conv_weight`), packed for a full band of tiles: its
    input, (1, T * C, tiles, 1), keeps that shape from image to image (a band, or all tiles of a
    smaller map). Packed once here instead of reordered by oneDNN on every call: per call 5.8 ->
    5.3 ms (res4's F(2x2)), 25.0 -> 23.7 (FPN layer_1's F(4x4) bands), 3.4 -> 3.0 (res3), at
    band sizes from a third to 1.25x the one packed for (Zen 4, run L). Plain where oneDNN's
    convolution is not there (the route does not run then)."""
    if not dense.convolution_available():
        return transformed
    count_positions = positions(tile)
    out_channels, channels = transformed.shape[0] // count_positions, int(transformed.shape[1])
    tiles = most_band_tiles(count_positions * (channels + out_channels))
    geometry = ([0, 0], [1, 1], [1, 1], count_positions)
    return dense.packed_conv_weight(
        transformed, geometry, [1, count_positions * channels, tiles, 1]
    )


class WinogradConv(nn.Module):
    """A 3x3, stride-1, padding-1 convolution with bias and optional ReLU, F(tile x tile, 3x3)
    on CPU (`tile` 4 or 2).

    Takes any (N, C, H, W) float32 map and returns a channels-last one, like the fused
    backbone's convolutions.
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, relu: bool, tile: int = 4) -> None:
        super().__init__()
        if tile not in G:
            raise ValueError(f"tile must be one of {sorted(G)}, but got {tile}")
        self.tile, self.out_channels = tile, int(weight.shape[0])
        self.register_buffer("weight", products_weight(transformed_weight(weight, tile), tile))
        self.register_buffer("bias", bias.detach().float().contiguous())
        self.relu = relu
        self.packed: list | None = None  # per position, `amx.PackedWeight`s (fusion.with_amx)

    def __deepcopy__(self, memo: dict) -> WinogradConv:
        """A copy of the module that shares the packed weight (an opaque mkldnn tensor cannot be
        deep-copied; torch.ao's quantize_dynamic copies the whole model for int8). The weight is
        never written after packing, so sharing it is safe; everything else is copied."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        state = dict(self.__dict__)
        state["_buffers"] = {name: b for name, b in self._buffers.items() if name != "weight"}
        copied.__dict__.update(copy.deepcopy(state, memo))
        copied._buffers["weight"] = self.weight
        return copied

    def position_weights(self) -> list[torch.Tensor]:
        """The transformed weight per tile position: T (K, C) matrices."""
        plain = self.weight.to_dense() if self.weight.is_mkldnn else self.weight
        return list(plain.view(positions(self.tile), self.out_channels, -1).unbind(0))

    def pack_for_amx(self) -> None:
        """The products on AMX (`amx.products_into`), the weight held as AMX tiles only."""
        self.packed = [amx.PackedWeight(position) for position in self.position_weights()]
        self.weight = torch.empty(0)  # the tiles are the same bytes again: not held twice

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Transform the 6x6 patches, multiply per position, transform back, + bias, ReLU;
        in bands of tiles (`band_tiles`)."""
        batch, channels, height, width = features.shape
        features = features.contiguous(memory_format=torch.channels_last)
        tile, count_positions = self.tile, positions(self.tile)
        tiles_h, tiles_w = -(-height // tile), -(-width // tile)
        out = torch.empty(
            (batch, self.out_channels, height, width), memory_format=torch.channels_last
        )
        total = batch * tiles_h * tiles_w
        band = band_tiles(total, count_positions * (channels + self.out_channels))
        for first in range(0, total, band):
            count = min(band, total - first)
            tiles = torch.ops.m2fp.winograd_input(features, tile, tiles_h, tiles_w, first, count)
            products = self._products(tiles, count, channels)
            torch.ops.m2fp.winograd_output(products, out, tile, first, self.bias, self.relu)
        return out

    def _products(self, tiles: torch.Tensor, count: int, channels: int) -> torch.Tensor:
        """(count, T * C) transformed tiles -> (count, T * K) products, row-major: on AMX
        (`amx.products_into`) where `with_amx` packed the weights, else one oneDNN call."""
        count_positions = positions(self.tile)
        if self.packed is not None:
            amx.require(tiles, "Winograd convolution")
            products = tiles.new_empty((count, count_positions * self.out_channels))
            amx.products_into(tiles, self.packed, channels, products)
            return products
        # (count, T * C) row-major is a channels-last (1, T * C, count, 1) map: the products
        # are a grouped 1x1 convolution over it, which answers channels-last (count, T * K).
        grouped = tiles.view(1, count, 1, count_positions * channels).permute(0, 3, 1, 2)
        products = torch.ops.mkldnn._convolution_pointwise(
            grouped, self.weight, None, [0, 0], [1, 1], [1, 1], count_positions, "none", [], ""
        )
        return products.permute(0, 2, 3, 1).reshape(count, -1).contiguous()


def most_band_tiles(floats_per_tile: int) -> int:
    """The most tiles a band holds within `BAND_BYTES` of transformed tiles and products."""
    return max(1, BAND_BYTES // (floats_per_tile * 4))


def band_tiles(total: int, floats_per_tile: int) -> int:
    """Tiles per band of `total`: as few bands as keep each within `BAND_BYTES` of transformed
    tiles and products (`floats_per_tile`), all of one size (the last one may be smaller)."""
    most = most_band_tiles(floats_per_tile)
    bands = -(-total // most)
    return -(-total // bands)


def describe(model: nn.Module, plan: Plan) -> str:
    """What runs in `model`: "F(4x4, 3x3) for N, F(2x2, 3x3) for M convolutions (avx2 plan)"."""
    tiles = [module.tile for module in model.modules() if isinstance(module, WinogradConv)]
    counts = [f"F({tile}x{tile}, 3x3) for {tiles.count(tile)}" for tile in sorted(G, reverse=True)]
    return ", ".join(counts) + f" convolutions ({plan.isa} plan)"
