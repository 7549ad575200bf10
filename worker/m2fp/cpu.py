"""What the CPU can do, for choosing the inference precision (`worker.m2fp.precision`).

`cpu_features()` is the one detector: the instruction-set flags that matter for this model's
arithmetic, read from the kernel's `/proc/cpuinfo` (Linux), else inferred from
`torch.backends.cpu.get_cpu_capability()` (which names only the widest vector ISA torch
dispatches to: `AVX2`, `AVX512`, ...; it says nothing about BF16 or VNNI, so they read as absent).
`cpu_summary()` is what every benchmark prints beside its figures (model name, cores, flags).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags as Linux names them: AVX2 (the baseline of x86-64-v3), AVX-512 Foundation, native
# bf16 dot products (AVX512-BF16, and the AMX tiles), int8 dot products (VNNI, 512- and 256-bit).
FEATURE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # bf16 arithmetic in hardware, not emulated
REPORTED_FLAGS = ("avx2", "fma", *FEATURE_FLAGS[1:])  # what a benchmark figure names
CPUINFO = Path("/proc/cpuinfo")
CAPABILITY_FLAGS = {  # torch's capability name -> what it implies
    "AVX2": ("avx2",),
    "AVX512": ("avx2", "avx512f"),
}


def cpuinfo_field(text: str, field: str) -> str | None:
    """The value of the first `field : value` line of a /proc/cpuinfo text, or None."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def flags_from_cpuinfo(text: str, wanted: tuple[str, ...] = FEATURE_FLAGS) -> frozenset[str] | None:
    """The `wanted` flags on the first `flags` line of a /proc/cpuinfo text, or None if it has none."""
    value = cpuinfo_field(text, "flags")
    if value is None:
        return None
    present = set(value.split())
    return frozenset(flag for flag in wanted if flag in present)


def flags_from_torch() -> frozenset[str]:
    """The FEATURE_FLAGS torch's own CPU capability implies (a lower bound: no bf16, no VNNI)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability().upper()
    for name, flags in sorted(CAPABILITY_FLAGS.items(), reverse=True):
        if capability.startswith(name):
            return frozenset(flags)
    return frozenset()


def cpu_features(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The FEATURE_FLAGS this CPU has: /proc/cpuinfo's flags, else torch's capability."""
    try:
        found = flags_from_cpuinfo(cpuinfo.read_text(encoding="ascii", errors="replace"))
    except OSError:
        found = None
    return found if found is not None else flags_from_torch()


def describe_features(features: frozenset[str]) -> str:
    """`avx2 fma-class flags in FEATURE_FLAGS order`, e.g. "avx2", or "none"."""
    return " ".join(flag for flag in FEATURE_FLAGS if flag in features) or "none"


def has_native_bf16(features: frozenset[str]) -> bool:
    """Whether bf16 matrix arithmetic runs in hardware (AMX-BF16 or AVX512-BF16)."""
    return any(flag in features for flag in BF16_FLAGS)


def has_amx_bf16(features: frozenset[str]) -> bool:
    """Whether the CPU has AMX-BF16, the one place oneDNN's bf16 math mode computes in bf16."""
    return "amx_bf16" in features


def cpu_summary(cpuinfo: Path = CPUINFO) -> dict[str, object]:
    """{"model", "cores", "flags"}: the CPU a benchmark ran on, its REPORTED_FLAGS in order."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        text = ""
    model = cpuinfo_field(text, "model name") or platform.processor() or "unknown"
    flags = flags_from_cpuinfo(text, REPORTED_FLAGS) or frozenset()
    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": [flag for flag in REPORTED_FLAGS if flag in flags],
    }
