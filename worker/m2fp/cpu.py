"""What the CPU can do, for choosing the inference precision (`worker.m2fp.precision`).

`cpu_features()` is the one detector: the instruction-set flags that matter for this model's
arithmetic, read from the kernel's `/proc/cpuinfo` (Linux), else inferred from
`torch.backends.cpu.get_cpu_capability()` (which names only the widest vector ISA torch
dispatches to: `AVX2`, `AVX512`, ...; it says nothing about BF16 or VNNI, so they read as absent).
"""

from __future__ import annotations

from pathlib import Path

# The flags as Linux names them: AVX2 (the baseline of x86-64-v3), AVX-512 Foundation, native
# bf16 dot products (AVX512-BF16, and the AMX tiles), int8 dot products (VNNI, 512- and 256-bit).
FEATURE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # bf16 arithmetic in hardware, not emulated
CPUINFO = Path("/proc/cpuinfo")
CAPABILITY_FLAGS = {  # torch's capability name -> what it implies
    "AVX2": ("avx2",),
    "AVX512": ("avx2", "avx512f"),
}


def flags_from_cpuinfo(text: str) -> frozenset[str] | None:
    """The FEATURE_FLAGS on the first `flags` line of a /proc/cpuinfo text, or None if it has none."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            present = set(value.split())
            return frozenset(flag for flag in FEATURE_FLAGS if flag in present)
    return None


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
