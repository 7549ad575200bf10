"""The inference precision: which one runs (`choose_precision`) and how (`prepare_model`, `autocast`).

- `fp32`: the model as built, float32 throughout (the reference's arithmetic);
- `bf16`: `torch.autocast(dtype=torch.bfloat16)` around the network's forward (convolutions and
  linears in bf16, the compiled deformable-attention op takes bf16 values and accumulates in fp32);
  the outputs are turned back to fp32 before the postprocess, which always runs in fp32;
- `int8`: the network's `nn.Linear` layers dynamically quantized (int8 weights, activations
  quantized per call) through PyTorch's x86 quantization engine, everything else fp32;
- `auto` (default): fp32 on every CPU and on CUDA, for now. bf16 where the CPU has it in hardware
  (AMX-BF16, AVX512-BF16: `worker.m2fp.cpu`) was the plan, and int8 on AVX2, but neither met the
  agreement bar against fp32 (label maps >= 99.5 % equal, instance maps >= 99 %) on the diverse
  synthetic checkpoint (tests/diverse_weights.py): bf16 97.5-98.0 % of labels, int8 84-89 %; and
  int8 was no faster than fp32 beyond the noise on the AVX2 machine (docs/BENCHMARKS.md,
  "Precision by CPU features"). `AUTO_CANDIDATES` lists what `auto` may pick; a precision joins it
  only once it agrees (tests/model/test_m2fp_precision.py checks that). bf16 without hardware
  support is emulated and about 10x slower than fp32: asking for it says so in the reason.

The mode comes from `M2FP_PRECISION`, read by `shared.config` and passed to the Predictor (and so
to the worker and the offline CLI).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import nn

from worker.m2fp.cpu import cpu_features, describe_features, has_native_bf16

PRECISIONS = ("fp32", "bf16", "int8")
AUTO_CANDIDATES = ("fp32",)  # what `auto` may pick: only precisions that agree with fp32
INT8_ENGINE = "x86"  # fbgemm + oneDNN; per-tensor dynamic quantization of the linears
ModelT = TypeVar("ModelT", bound=nn.Module)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision that runs and why (`reason` is for the start log and /readyz)."""

    precision: str  # one of PRECISIONS
    reason: str
    features: str  # the CPU's FEATURE_FLAGS present, e.g. "avx2"

    def describe(self) -> str:
        """`int8 (forced by M2FP_PRECISION=int8)`-style one-liner."""
        return f"{self.precision} ({self.reason})"


def _check_mode(mode: str) -> None:
    if mode != "auto" and mode not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}, but got {mode!r}")


def choose_precision(
    mode: str, device: str = "cpu", features: frozenset[str] | None = None
) -> PrecisionChoice:
    """The precision for `mode` (auto|fp32|bf16|int8) on `device`, given the CPU's features.

    Raises ValueError for an unknown mode and for int8 where it cannot run (CUDA, or a torch
    without the x86 quantization engine).
    """
    _check_mode(mode)
    features = cpu_features() if features is None else features
    described = describe_features(features)
    on_cpu = device.startswith("cpu")
    if mode == "int8":
        if not on_cpu:
            raise ValueError("M2FP_PRECISION=int8 runs on the CPU only (dynamic quantization)")
        if INT8_ENGINE not in torch.backends.quantized.supported_engines:
            raise ValueError(f"M2FP_PRECISION=int8 needs torch's {INT8_ENGINE!r} engine")
    if mode != "auto":
        reason = f"forced by M2FP_PRECISION={mode}"
        if mode == "bf16" and on_cpu and not has_native_bf16(features):
            reason += "; this CPU has no AMX-BF16 or AVX512-BF16, bf16 is emulated and slow"
        return PrecisionChoice(mode, reason, described)
    if not on_cpu:
        return PrecisionChoice("fp32", f"auto on {device}", described)
    if has_native_bf16(features):
        reason = "auto: bf16 is in hardware here but missed the agreement bar with fp32"
    else:
        reason = "auto: no bf16 in hardware; int8 missed the agreement bar"
    return PrecisionChoice("fp32", reason, described)


def prepare_model(model: ModelT, precision: str) -> ModelT:
    """The model to run at `precision`: itself for fp32 and bf16, a quantized copy for int8."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, but got {precision!r}")
    if precision != "int8":
        return model
    torch.backends.quantized.engine = INT8_ENGINE
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the eager API still works here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated", category=UserWarning)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return cast(ModelT, quantized)  # a copy of the same class, its linears replaced


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The context the network's forward runs in: bf16 autocast for bf16, else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
