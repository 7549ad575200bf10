"""The C allocator of a CPU inference process: large freed blocks are kept for the next forward.

Owns `configure()`, which the Predictor calls once per process when it runs on the CPU.

glibc's malloc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
fresh `mmap` and returns it to the kernel on `free`. A forward at 640x864 allocates hundreds of
activations of 1 to 46 MB, so each one is faulted in page by page and zero-filled by the kernel
again on every image: on the AMD EPYC KVM guest an encoder ReLU over 11340x1024 floats took
44 ms on one thread, and the forward at 640x853 on 2 threads took 4.66 s instead of 5.53 s with
mmap turned off (docs/BENCHMARKS.md, "The rest of the forward"). `configure()` therefore sets
`M_MMAP_MAX=0` (every block from the heap, reused after free) and `M_TRIM_THRESHOLD` to 256 MiB
(a freed top of the heap larger than that still goes back to the kernel). The cost: the process
keeps the working set of its largest job, which the worker-memory benchmark measures against the
1.5 GB target.

Only glibc on Linux is changed; anything else is left as is and said so. It is not a setting: the
two values are what was measured, and they replace glibc's `MALLOC_MMAP_MAX_` /
`MALLOC_TRIM_THRESHOLD_` environment tunables if those were set.
"""

from __future__ import annotations

import ctypes
import platform
import threading

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

_lock = threading.Lock()
_state: dict[str, str] = {}  # "result": what configure() did, once per process


def _tune_glibc() -> str:
    """Apply the two mallopt settings; the description of what the process now runs."""
    libc = ctypes.CDLL("libc.so.6")
    mmap_off = libc.mallopt(M_MMAP_MAX, 0) == 1
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not (mmap_off and trim_set):
        return "glibc malloc as is: mallopt refused the settings"
    return (
        f"glibc malloc: large blocks reused (mmap off, trim above {TRIM_THRESHOLD_BYTES >> 20} MiB)"
    )


def configure() -> str:
    """Tune the process's malloc for inference once; returns what runs (for the start log)."""
    with _lock:
        if "result" not in _state:
            if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
                _state["result"] = "the C library's malloc as is (not glibc on Linux)"
            else:
                try:
                    _state["result"] = _tune_glibc()
                except OSError as exc:  # no libc.so.6 to load
                    _state["result"] = f"malloc as is ({exc})"
        return _state["result"]
