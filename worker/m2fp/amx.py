"""float32 products on Intel AMX as three bf16 products ("bf16x3"): whether they run, and how.

Owns whether they can run here (`unavailable_reason()`: the CPU has AMX-BF16, the compiled ops
`m2fp::amx_*` loaded, and Linux granted the process AMX's tile state), the packed weights
(`PackedWeight`) and the calls: `linear` for a (..., K) input and `pointwise_conv` for a 1x1
convolution over a channels-last map, both with bias, ReLU and (the bottlenecks' third
convolution) the residual add in the same pass, `conv3x3` for the 3x3 convolutions that run
direct (stride 1 or 2, channels a multiple of 32) and `products_into` for the Winograd products.
Whether they do run is the precision's: `M2FP_PRECISION=bf16x3`, which `auto` picks where
`unavailable_reason()` is None (worker/m2fp/precision.py).

Each operand is split into hi = bf16(x) and lo = bf16(x - hi), and x . w is computed as
hi . hi + lo . hi + hi . lo with fp32 accumulation on AMX (worker/m2fp/csrc/amx_gemm.cpp):
2.3-4e-6 of the output's largest value against float64, where oneDNN's fp32 is 5-9e-7 and
Winograd F(4x4) 6e-6, at 1.24-2.3x oneDNN's fp32 speed on the network's shapes. Label maps agree
with fp32's far inside the bar (99.99 % on the diverse checkpoint); the golden parity tolerances,
which fp32 is held to, it does not keep (docs/BENCHMARKS.md run K). bf16 (oneDNN's bf16 math,
one bf16 product) is not this.

Where it runs: the Predictor hands the fused CPU model to `fusion.with_amx`, which packs the
weights of the oneDNN linears, the backbone's 1x1 and direct 3x3 convolutions and the F(2x2)
Winograd products once, when the model is prepared; those modules then drop their float32
copy, so each weight is held once (hi and lo, 2 bytes each: the bytes of the float32 weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.m2fp import ops
from worker.m2fp.cpu import cpu_features, has_amx_bf16

OPS = ("amx_available", "amx_pack", "amx_linear", "amx_linear_into", "amx_conv3x3")


def unavailable_reason() -> str | None:
    """Why the AMX products cannot run in this process, or None when they can."""
    if not has_amx_bf16(cpu_features()):
        return "this CPU has no AMX-BF16"
    status = ops.status()
    if not status["loaded"]:
        return f"the compiled ops are not loaded ({status['reason']})"
    if not set(OPS) <= set(status["ops"]):
        return "the compiled ops were built without the AMX products"
    if not torch.ops.m2fp.amx_available():
        return "the kernel refused AMX here (no AMX-TILE or AVX512-BF16, or no tile permission)"
    return None


class PackedWeight:
    """A float32 (N, K) weight of out = x @ w.T as the op's AMX tiles (hi and lo halves)."""

    def __init__(self, weight: torch.Tensor) -> None:
        matrix = weight.detach().float().reshape(weight.shape[0], -1)
        self.out_features, self.in_features = matrix.shape
        self.tiles = torch.ops.m2fp.amx_pack(matrix)


def applies(x: torch.Tensor) -> bool:
    """Whether `x` may go through the op: a float32 CPU tensor, no autograd."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def require(x: torch.Tensor, what: str) -> None:
    """Raise for an input a module whose weights are AMX tiles only cannot take (`applies`)."""
    if not applies(x):
        raise RuntimeError(f"a bf16x3 {what} runs float32 CPU inference only (no autograd)")


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """(..., K) as the (rows, K) matrix the op reads: a view where its columns are contiguous
    (any row stride), else a copy."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def linear(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ w.T [+ bias] [+ residual] [-> ReLU] for x (..., K): out (..., N)."""
    rows, extra = _unit_columns(x), None if residual is None else _unit_columns(residual)
    out = torch.ops.m2fp.amx_linear(rows, packed.tiles, packed.out_features, bias, extra, relu)
    return out.view(*x.shape[:-1], packed.out_features)


def pointwise_conv(
    features: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None,
    relu: bool,
    stride: int = 1,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 1x1 convolution (no padding) of an (N, C, H, W) map, answered channels-last, as the
    fused backbone's convolutions are; `residual` (the output's shape) is added before the ReLU."""
    if stride != 1:
        features = features[:, :, ::stride, ::stride]
    pixels = features.permute(0, 2, 3, 1)  # a view when the map is channels-last
    extra = None if residual is None else residual.permute(0, 2, 3, 1)
    out = linear(pixels, packed, bias, relu, extra)  # (N, H, W, K)
    return out.permute(0, 3, 1, 2)  # (N, K, H, W), channels-last in memory


def conv3x3_weight(weight: torch.Tensor) -> PackedWeight:
    """A (K, C, 3, 3) convolution weight packed as the (K, 9 C) matrix `conv3x3` multiplies by
    (tap-major columns: t * C + c, t = 3 * dy + dx)."""
    return PackedWeight(weight.detach().float().permute(0, 2, 3, 1).reshape(weight.shape[0], -1))


def conv3x3(
    features: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, relu: bool, stride: int
) -> torch.Tensor:
    """A 3x3 convolution with padding 1 (stride 1 or 2) of an (N, C, H, W) map, C a multiple of
    32, answered channels-last: one product with K = 9 C whose rows the op gathers from the
    zero-padded NHWC map (one padded copy of the input, no im2col)."""
    batch = features.shape[0]
    padded = F.pad(features.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()
    out = torch.ops.m2fp.amx_conv3x3(padded, packed.tiles, packed.out_features, stride, bias, relu)
    height = (padded.shape[1] - 3) // stride + 1
    width = (padded.shape[2] - 3) // stride + 1
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def products_into(
    tiles: torch.Tensor, packed: list[PackedWeight], in_channels: int, out: torch.Tensor
) -> None:
    """The Winograd products: for each position t, out[:, t*K:(t+1)*K] = tiles[:, t*C:(t+1)*C] @
    w_t.T, from (count, T * C) transformed tiles into (count, T * K) row-major products."""
    for position, weight in enumerate(packed):
        k = weight.out_features
        torch.ops.m2fp.amx_linear_into(
            tiles[:, position * in_channels : (position + 1) * in_channels],
            weight.tiles,
            k,
            None,
            False,
            out[:, position * k : (position + 1) * k],
        )
