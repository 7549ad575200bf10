"""The inference precision: which one runs (`choose_precision`) and how (`prepare_model`, `arithmetic`).

- `fp32`: the model as built, float32 throughout (the reference's arithmetic);
- `bf16` on the CPU: the fp32 network as the Predictor runs it (fused backbone, Winograd, oneDNN
  linears) with oneDNN's floating-point math mode set to bf16 around the forward
  (`torch.backends.mkldnn.{matmul,conv}.fp32_precision`): oneDNN may then compute a convolution's
  or product's multiplies in bf16, accumulating in fp32 into fp32 outputs; every other op (norms,
  softmaxes, the deformable sampling, adds) stays fp32, and no tensor is ever rounded to bf16. oneDNN
  takes that liberty only on AMX-BF16: without it (AVX512-BF16 alone, AVX2) it keeps the products
  in fp32 and the results are fp32's (bit for bit at AVX2, within 1.2e-6 at AVX512-BF16, where it
  picks other fp32 kernels; measured with ONEDNN_MAX_CPU_ISA on an AMX CPU, docs/BENCHMARKS.md
  run K). On AMX this runs the 640x853 forward 1.48x faster than fp32 and 1.38x
  faster than the `torch.autocast` bf16 it replaced, which rounded every activation and could not
  run the fused ops. On CUDA `bf16` is `torch.autocast(dtype=torch.bfloat16)`;
- `bf16x3` (CPUs with AMX-BF16 only): the fp32 network as fp32 runs it, with its linears, the
  backbone's 1x1 and direct 3x3 convolutions and the F(2x2) Winograd products computed as three
  bf16 products on AMX (hi.hi + lo.hi + hi.lo, fp32 accumulation: `worker.m2fp.amx`): 2.3-4e-6 of
  the output's largest value per product against float64 (oneDNN's fp32: 5-9e-7, Winograd
  F(4x4): 6e-6), 1.24-2.3x oneDNN's fp32 speed; the 640x853 forward 1.02-1.08 vs 1.35-1.41 s
  (docs/BENCHMARKS.md run K). It agrees with fp32 far inside the
  bar (diverse checkpoint: 99.99 % of labels, 99.999 % of instances), so `auto` picks it where
  it can run; it does not stay within the golden parity suite's tolerances, which fp32 is held
  to (tests/model/test_m2fp_pipeline_golden.py runs fp32);
- `int8`: the network's `nn.Linear` layers dynamically quantized (int8 weights, activations
  quantized per call) through PyTorch's x86 quantization engine, everything else fp32;
- `auto` (default): bf16x3 on a CPU with AMX-BF16 where the compiled op runs, fp32 on every other
  CPU and on CUDA. bf16 where the CPU has it in hardware (`worker.m2fp.cpu`) was the plan, and
  int8 on AVX2, but neither met the agreement bar against fp32 (label maps >= 99.5 % equal,
  instance maps >= 99 %) on the diverse synthetic checkpoint (tests/diverse_weights.py): bf16
  96.7-98.0 % of labels (any one stage of the network in bf16 alone already moves 0.25-0.66 % of
  them on AMX), int8 84-89 %; and int8 was no faster than fp32 beyond the noise on the AVX2
  machine (docs/BENCHMARKS.md, "Precision by CPU features").
  `AUTO_CANDIDATES` lists what `auto` may pick; a precision joins it only once it agrees
  (tests/model/test_m2fp_precision.py checks that).

The math mode is process-wide (PyTorch's global context, like the thread count): a process runs one
forward at a time (a pool child, the CLI), and `arithmetic` restores the previous mode on the way out.
The mode comes from `M2FP_PRECISION`, read by `shared.config` and passed to the Predictor (and so
to the worker and the offline CLI).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import nn

from worker.m2fp import amx
from worker.m2fp.cpu import cpu_features, describe_features, has_amx_bf16, has_native_bf16

PRECISIONS = ("fp32", "bf16x3", "bf16", "int8")
AUTO_CANDIDATES = ("fp32", "bf16x3")  # what `auto` may pick: only precisions that agree with fp32
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


def _check_runnable(mode: str, device: str, amx_missing: str | None) -> None:
    """Raise ValueError for a forced precision this device cannot run."""
    on_cpu = device.startswith("cpu")
    if mode == "bf16x3" and not on_cpu:
        raise ValueError(f"M2FP_PRECISION=bf16x3 runs on the CPU only (AMX), not on {device}")
    if mode == "bf16x3" and amx_missing is not None:
        raise ValueError(f"M2FP_PRECISION=bf16x3 needs AMX: {amx_missing}")
    if mode == "int8":
        if not on_cpu:
            raise ValueError("M2FP_PRECISION=int8 runs on the CPU only (dynamic quantization)")
        if INT8_ENGINE not in torch.backends.quantized.supported_engines:
            raise ValueError(f"M2FP_PRECISION=int8 needs torch's {INT8_ENGINE!r} engine")


def choose_precision(
    mode: str,
    device: str = "cpu",
    features: frozenset[str] | None = None,
    amx_missing: str | None = None,
) -> PrecisionChoice:
    """The precision for `mode` (auto|fp32|bf16x3|bf16|int8) on `device`, given the CPU's
    features; `amx_missing` is why the AMX op cannot run in this process (None: it can), asked
    of `worker.m2fp.amx` when `features` are this CPU's own, else read from `features`.

    Raises ValueError for an unknown mode, for int8 where it cannot run (CUDA, or a torch
    without the x86 quantization engine) and for bf16x3 where AMX cannot.
    """
    _check_mode(mode)
    if features is None:
        features = cpu_features()
        amx_missing = amx.unavailable_reason()
    elif not has_amx_bf16(features):
        amx_missing = "this CPU has no AMX-BF16"
    described = describe_features(features)
    on_cpu = device.startswith("cpu")
    _check_runnable(mode, device, amx_missing)
    if mode != "auto":
        reason = f"forced by M2FP_PRECISION={mode}"
        if mode == "bf16" and on_cpu:
            reason += (
                "; oneDNN computes the products in bf16 on AMX (fp32 accumulation and outputs)"
                if has_amx_bf16(features)
                else "; this CPU has no AMX-BF16, so oneDNN keeps the products in fp32: "
                "the results (to fp32 rounding) and the speed are fp32's"
            )
        return PrecisionChoice(mode, reason, described)
    if not on_cpu:
        return PrecisionChoice("fp32", f"auto on {device}", described)
    if amx_missing is None:
        reason = "auto: AMX-BF16 here, and bf16x3 agrees with fp32 (bf16 alone does not)"
        return PrecisionChoice("bf16x3", reason, described)
    if has_native_bf16(features):
        reason = (
            "auto: bf16 is in hardware here but missed the agreement bar with fp32; "
            f"no bf16x3: {amx_missing}"
        )
    else:
        reason = "auto: no bf16 in hardware; int8 missed the agreement bar"
    return PrecisionChoice("fp32", reason, described)


def prepare_model(model: ModelT, precision: str) -> ModelT:
    """The model to run at `precision`: itself for fp32, bf16x3 and bf16, a quantized copy for int8."""
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


@contextlib.contextmanager
def onednn_bf16_math() -> Iterator[None]:
    """Within: oneDNN may compute fp32 convolutions and products with bf16 multiplies (on AMX)."""
    knobs = (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv)  # type: ignore[attr-defined]
    previous = [knob.fp32_precision for knob in knobs]
    try:
        for knob in knobs:
            knob.fp32_precision = "bf16"
        yield
    finally:
        for knob, mode in zip(knobs, previous, strict=True):
            knob.fp32_precision = mode


def arithmetic(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The context the network's forward runs in: for bf16 oneDNN's bf16 math on the CPU and
    autocast on CUDA; nothing for fp32, bf16x3 (the Predictor's packed weights) and int8."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if torch.device(device).type == "cpu":
        return onednn_bf16_math()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
