"""The compiled ops (deformable attention, mask readout): where they are built, loading them, when they are used.

Owns the C++ library of `torch.ops.m2fp.ms_deform_attn` and `torch.ops.m2fp.mask_readout` (sources
`worker/m2fp/csrc/`, built on the machine that runs it by `make install` through
`python -m worker.m2fp.ops_build` into `build/m2fp_ops/`), its load status (`status()["ops"]`
names the ops it holds), and the process-wide choice between the ops and their pure-PyTorch
references (`deformable_attention.multi_scale_deformable_attention_reference`; the chunked
readout of `postprocess.parse_multi_human`), which stay the fallback. One switch covers both:

- `auto` (default): the op when it loaded, else the reference (the reason is in `status()`);
- `op`: the op, and `configure` raises when it cannot be loaded;
- `reference`: always the reference.

The ops are CPU-only and forward-only: CUDA tensors, and calls that need gradients, always take the
reference. The mode comes from `M2FP_DEFORM_ATTN`, read by `shared.config` and passed to
`configure` by the Predictor (and so by the worker and the offline CLI). `describe()` (the
worker's `deform_op` report) stays "op" or "reference: <reason>"; `status()["ops"]` says which ops
the loaded library has.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

from shared.config import DEFORM_ATTN_MODES

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SOURCES = tuple(
    Path(__file__).resolve().parent / "csrc" / name
    for name in ("ms_deform_attn.cpp", "mask_readout.cpp", "winograd.cpp", "amx_gemm.cpp")
)
OP_NAMES = (
    "ms_deform_attn",
    "mask_readout",
    "mask_bits",
    "winograd_input",
    "winograd_output",
    "amx_available",
    "amx_pack",
    "amx_linear",
    "amx_linear_into",
    "amx_conv3x3",
)
READOUT_OPS = {"mask_readout", "mask_bits"}  # what the compiled multi-human readout needs
READOUT_MAX_CLASSES = 32  # the mask readout op's class limit (csrc/mask_readout.cpp)
BUILD_DIR = REPO / "build" / "m2fp_ops"
LIBRARY_NAME = "m2fp_ops"
LIBRARY_PATH = BUILD_DIR / f"{LIBRARY_NAME}.so"
BUILD_KEY_PATH = BUILD_DIR / "build-key.txt"
# Generic x86-64 baseline; the kernels carry their own AVX2/AVX-512 clones (see the .cpp header), so
# no -march=native: a build runs on any x86-64 CPU. -fopenmp only compiles at::parallel_for's
# `#pragma omp parallel`; the OpenMP runtime is the one torch already loaded (not linked again).
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-Wall")
OP_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_status: dict | None = None
_mode = "auto"


def build_key() -> str:
    """What a build depends on: the sources, the flags and the torch it links against."""
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    digest.update(" ".join(CXX_FLAGS).encode() + b"\0" + torch.__version__.encode())
    return digest.hexdigest()


def _load() -> dict:
    """Load the built library once; the status says whether it is usable and, if not, why."""
    status = {
        "loaded": False,
        "path": str(LIBRARY_PATH),
        "reason": None,
        "build_info": None,
        "ops": [],
    }
    if not LIBRARY_PATH.is_file():
        status["reason"] = f"not built ({LIBRARY_PATH} missing; `make install` builds it)"
        return status
    try:
        built_for = BUILD_KEY_PATH.read_text().strip()
    except OSError:
        built_for = ""
    if built_for != build_key():
        status["reason"] = (
            "stale build (sources, flags or torch changed since; `make install` rebuilds it)"
        )
        return status
    try:
        torch.ops.load_library(str(LIBRARY_PATH))
        status["build_info"] = torch.ops.m2fp.build_info()
        status["ops"] = [name for name in OP_NAMES if hasattr(torch.ops.m2fp, name)]
        _register_fake()
    except (OSError, RuntimeError, AttributeError) as exc:
        status["reason"] = (
            f"cannot load {LIBRARY_PATH.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        )
        return status
    status["loaded"] = True
    return status


def _register_fake() -> None:
    """Shape function for fake tensors (torch.compile / export) once the op is defined."""

    def fake(value, spatial_shapes, sampling_locations, attention_weights):
        batch, _, heads, head_dim = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * head_dim))

    try:
        torch.library.register_fake("m2fp::ms_deform_attn", fake)
    except RuntimeError:  # already registered (the library was loaded by another path)
        pass


def status() -> dict:
    """`{"loaded", "path", "reason", "build_info", "ops", "mode", "active"}`; loads the library on first use."""
    global _status  # noqa: PLW0603 (process-wide load state, guarded by _lock)
    with _lock:
        if _status is None:
            _status = _load()
        return {**_status, "mode": _mode, "active": _describe_locked()}


def available() -> bool:
    """Whether the compiled op is loaded and usable."""
    return bool(status()["loaded"])


def _describe_locked() -> str:
    """The CPU path in use, as the worker reports it: "op" or "reference: <reason>"."""
    if _mode == "reference":
        return "reference: forced by M2FP_DEFORM_ATTN=reference"
    if _status is not None and _status["loaded"]:
        return "op"
    return f"reference: {_status['reason'] if _status else 'op not loaded yet'}"


def describe() -> str:
    """The CPU path in use: "op" or "reference: <reason>" (loads the library on first use)."""
    return status()["active"]


def configure(mode: str) -> str:
    """Set the process-wide mode (auto|op|reference); returns `describe()`.

    Raises RuntimeError for `op` when the op cannot be loaded, ValueError for an unknown mode.
    """
    global _mode  # noqa: PLW0603 (process-wide mode, like torch.set_num_threads)
    if mode not in DEFORM_ATTN_MODES:
        raise ValueError(
            f"deformable-attention mode must be one of {DEFORM_ATTN_MODES}, but got {mode!r}"
        )
    current = status()
    if mode == "op" and not current["loaded"]:
        raise RuntimeError(
            f"M2FP_DEFORM_ATTN=op but the compiled op is unavailable: {current['reason']}"
        )
    with _lock:
        _mode = mode
    return describe()


def mode() -> str:
    """The configured mode."""
    return _mode


def use_op(value: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a call with these tensors goes to the compiled op (else to the reference)."""
    if _mode == "reference" or value.device.type != "cpu" or value.dtype not in OP_DTYPES:
        return False
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (value, *tensors)):
        return False  # forward-only op
    return available()


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Call the compiled op (loading it first); arguments and result as `multi_scale_deformable_attention`."""
    if _status is None or not _status["loaded"]:
        current = status()
        if not current["loaded"]:
            raise RuntimeError(
                f"the compiled deformable-attention op is unavailable: {current['reason']}"
            )
    flat_shapes = [int(size) for shape in spatial_shapes for size in shape]
    return torch.ops.m2fp.ms_deform_attn(value, flat_shapes, sampling_locations, attention_weights)


def use_mask_readout(mask_logits: torch.Tensor, num_classes: int) -> bool:
    """Whether `postprocess.parse_multi_human` reads these mask logits with the compiled readout op."""
    if (
        _mode == "reference"
        or mask_logits.device.type != "cpu"
        or num_classes > READOUT_MAX_CLASSES
    ):
        return False
    if torch.is_grad_enabled() and mask_logits.requires_grad:
        return False  # forward-only op
    return set(status().get("ops", ())) >= READOUT_OPS


def mask_readout(
    mask_logits: torch.Tensor,
    class_probabilities: torch.Tensor,
    taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    keep_semantic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Call the compiled readout: (labels (H, W) uint8, semantic (C, H, W) or empty, score sums, counts).

    `taps` are `interpolation.mask_taps`' (y_index, y_weight, x_index, x_weight); see
    csrc/mask_readout.cpp for the contract.
    """
    check_readout_ops()
    return torch.ops.m2fp.mask_readout(
        mask_logits.float().contiguous(),
        class_probabilities.float().contiguous(),
        *taps,
        keep_semantic,
    )


def mask_bits(mask_logits: torch.Tensor, taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`logit > 0` of (K, h, w) mask logits at the taps' output size, each as np.packbits of its
    flat (H, W) mask: (K, ceil(H * W / 8)) uint8 (csrc/mask_readout.cpp)."""
    check_readout_ops()
    return torch.ops.m2fp.mask_bits(mask_logits.float().contiguous(), *taps)


def check_readout_ops() -> None:
    """Raise RuntimeError unless the loaded library has the readout ops."""
    current = status()
    if not set(current.get("ops", ())) >= READOUT_OPS:
        raise RuntimeError(f"the compiled mask readout is unavailable: {current['reason']}")
