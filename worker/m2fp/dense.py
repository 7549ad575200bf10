"""Dense products on the CPU through oneDNN: linears and "matrix x feature map" products.

Owns the choice between MKL (what `nn.Linear`, `bmm` and `einsum` run on the CPU) and oneDNN's
`mkldnn._linear_pointwise` for the network's float32 dense products. MKL picks its kernels by
vendor: on AMD CPUs it runs its AVX2 code even where AVX-512 is there, while oneDNN JITs for the
CPU it finds. Measured on an AMD EPYC (Zen 5, avx512f, 2 threads): MKL sgemm 120-180 GFLOP/s,
oneDNN 350-415 GFLOP/s on the same shapes (docs/BENCHMARKS.md, "Run F"); on the
AVX2-only EPYC of an earlier session, the encoder FFN ran 12 % faster through oneDNN.

- `available()`: this torch has oneDNN's linear;
- `applies(*tensors)`: the oneDNN path may run for these operands (CPU, float32, no autograd,
  no autocast: `_linear_pointwise` has no backward and autocast does not cover it);
- `matrix_times_map(matrix, features)`: (O, C) x (B, C, H, W) -> (B, O, H, W), NCHW out from an
  NCHW or channels-last map, read in place (oneDNN takes the map as its "weight" operand, strided
  as it is), the 1x1 convolutions' and the mask heads' product;
- `linear(x, weight, bias, post)`: `F.linear`, optionally with a ReLU post-op;
- `as_built()`: a context in which nothing here takes the oneDNN path (the FLOP counter of
  bench/gemm_efficiency.py does not know oneDNN's op; tests compare the two paths);
- `amx_products(packs)`: a context in which `linear` computes with a weight found in `packs`
  (`weight_key` -> `amx.PackedWeight`, made by `fusion.with_amx` for one Predictor) on AMX as
  three bf16 products (worker/m2fp/amx.py); the Predictor enters it around its forward;
- `convolution_available()`: this torch has oneDNN's convolution with post-ops (what the fused
  backbone and the Winograd products run);
- `packed_conv_weight`: a float32 convolution weight reordered once into oneDNN's own blocked
  layout (an opaque mkldnn tensor, which `mkldnn._convolution_pointwise` takes as it is; given a
  plain weight it reorders it on every call), for inputs of a given shape: that layout depends
  on the input's size (worker/m2fp/winograd.py packs its products' weights, whose inputs keep
  their shape from image to image; docs/BENCHMARKS.md run L says why the other convolutions and
  the linears do not).

Results equal MKL's up to float32 summation order (about 1e-7 relative; tests/model/test_m2fp_dense.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from worker.m2fp import amx


def available() -> bool:
    """Whether this torch has oneDNN's linear with post-ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def convolution_available() -> bool:
    """Whether this torch has oneDNN's CPU convolution with post-ops."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


_AVAILABLE = available()
# Process-wide switches, like torch.set_num_threads: "as_built" set only by `as_built()`,
# "amx_packs" only by `amx_products()`.
_switches: dict = {"as_built": False, "amx_packs": None}


@contextlib.contextmanager
def _switched(name: str, value: object) -> Iterator[None]:
    previous, _switches[name] = _switches[name], value
    try:
        yield
    finally:
        _switches[name] = previous


def weight_key(weight: torch.Tensor) -> tuple:
    """What identifies a weight, or the same view of it made again (the attention's in-projection
    chunks are new tensors on every call): storage address, shape and strides."""
    return (weight.data_ptr(), tuple(weight.shape), weight.stride())


def amx_products(packs: dict) -> contextlib.AbstractContextManager:
    """Within: `linear` takes the AMX path for every weight `packs` holds (`weight_key` keys)."""
    return _switched("amx_packs", packs)


def as_built() -> contextlib.AbstractContextManager:
    """Within: `linear` is `F.linear` and `matrix_times_map` is `bmm` (MKL)."""
    return _switched("as_built", True)


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the oneDNN path may compute a product of `tensors`."""
    if (
        not _AVAILABLE
        or _switches["as_built"]
        or torch.is_grad_enabled()
        or torch.is_autocast_enabled("cpu")
    ):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def packed_conv_weight(
    weight: torch.Tensor, geometry: tuple[list[int], list[int], list[int], int], input_shape: list
) -> torch.Tensor:
    """`weight` (K, C / groups, kh, kw), float32, in oneDNN's blocked layout for a convolution of
    `geometry` (padding, stride, dilation, groups) over inputs of `input_shape` (N, C, H, W).
    `.to_dense()` gives the weight back, bit for bit."""
    padding, stride, dilation, groups = geometry
    plain = weight.detach().float().contiguous().to_mkldnn()
    reorder = torch._C._nn.mkldnn_reorder_conv2d_weight  # its stub lacks the input size
    return reorder(plain, padding, stride, dilation, groups, input_shape)  # type: ignore[call-arg]


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as oneDNN takes it at speed: row- or column-major (a transposed contiguous matrix
    is fine); any other strides (a head's slice of interleaved heads) take oneDNN's slow path,
    3 s instead of 11 ms for the decoder's (32, 8640) values, so those are copied first."""
    if weight.is_contiguous() or weight.t().is_contiguous():
        return weight
    return weight.contiguous()


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none"
) -> torch.Tensor:
    """x @ weight.T + bias, then ReLU when `post` is "relu"; AMX where `amx_products` holds the
    weight, else oneDNN where it `applies`."""
    if applies(x, weight):
        packs = _switches["amx_packs"]
        packed = packs.get(weight_key(weight)) if packs else None
        if packed is not None:
            return amx.linear(x, packed, bias, relu=post == "relu")
        return torch.ops.mkldnn._linear_pointwise(x, _dense(weight), bias, post, [], "")
    output = F.linear(x, weight, bias)
    return F.relu(output, inplace=True) if post == "relu" else output


def matrix_times_map(matrix: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(O, C) or (B, O, C) `matrix` times (B, C, H, W) `features`: (B, O, H, W), contiguous NCHW.

    `bmm` would do it too (and does where oneDNN does not apply), at MKL's rate; here each image's
    map is oneDNN's weight operand, (H*W, C) with the map's own strides: out = matrix @ map.
    """
    batch, _, height, width = features.shape
    tokens = features.flatten(2)  # (B, C, H*W), a view in either layout
    if matrix.dim() == 2:
        matrix = matrix.expand(batch, -1, -1)
    if not applies(matrix, features):
        return torch.bmm(matrix, tokens).view(batch, -1, height, width)
    product = torch.ops.mkldnn._linear_pointwise
    outputs = [
        product(matrix[i], _dense(tokens[i].t()), None, "none", [], "") for i in range(batch)
    ]
    output = outputs[0].unsqueeze(0) if batch == 1 else torch.stack(outputs)
    return output.view(batch, -1, height, width)
