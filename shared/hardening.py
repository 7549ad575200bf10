"""Process hardening: no core dumps of plaintext, and an optional per-process memory limit.

A gateway or worker process holds decrypted photos and results in memory. A crash that writes a
core file (or a ptrace/`/proc/PID/mem` reader of the same user) would put them on disk or in
another process. `disable_core_dumps()` sets `RLIMIT_CORE` to 0 (soft and hard, so the process
cannot raise it again) and marks the process not dumpable with `prctl(PR_SET_DUMPABLE, 0)`,
which also keeps same-user processes from attaching to it. Both are inherited across fork, but
`execve` of a set-uid binary resets dumpability, so every entry point calls it itself: the
worker's parent and each pool child, the gateway (api/wsgi.py).

`limit_memory(mb)` caps a pool child's heap with `RLIMIT_DATA` (not `RLIMIT_AS`: torch and its
OpenMP/BLAS libraries reserve gigabytes of address space they never touch, so an address-space
cap of a few GB fails at import, while `RLIMIT_DATA` counts private writable mappings, i.e.
what a decode or a tensor actually allocates: see docs/OPERATIONS.md for the measurements). An
allocation past the limit raises `MemoryError` in that one child instead of waking the kernel's
OOM killer, which may pick Redis. It also fixes glibc's mmap threshold, so that the memory of
an outlier job counts against the limit only while that job runs; a CPU child's Predictor later
turns mmap off for speed (worker/m2fp/allocator.py), after which freed blocks stay in the heap
and only a freed top above 256 MiB is returned; a child that ran out therefore leaves the pool
after that job (worker/retirement.py).

Neither flask nor torch is imported here; this runs on Linux and is a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
M_MMAP_THRESHOLD = -3


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def disable_core_dumps() -> None:
    """RLIMIT_CORE = 0 (soft and hard) and PR_SET_DUMPABLE 0; raises OSError if prctl fails."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "prctl(PR_SET_DUMPABLE, 0) failed")


def is_dumpable() -> bool:
    """This process's PR_GET_DUMPABLE flag (False where prctl does not exist)."""
    if not sys.platform.startswith("linux"):
        return False
    return _libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


def limit_memory(megabytes: int | None) -> None:
    """Cap this process's data segment (RLIMIT_DATA) at `megabytes`; None or 0 leaves it alone.

    Only the soft limit is lowered below the hard one, so a limit above an inherited hard limit
    is refused with ValueError rather than silently ignored.
    """
    if not megabytes:
        return
    limit = megabytes * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY and limit > hard:
        raise ValueError(f"memory limit {megabytes} MB is above the inherited hard limit")
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    if sys.platform.startswith("linux"):
        # A fixed mmap threshold (glibc's default one grows after each big free) keeps big blocks
        # as their own mappings, so freeing them gives the budget back: without it, an outlier
        # job leaves the heap grown and every later job of the child fails too (measured).
        _libc().mallopt(M_MMAP_THRESHOLD, 128 * 1024)
