"""Retiring a prefork pool child between two jobs, after a job that ran out of its memory limit.

Owns `request()` (the pipeline calls it when a job ends `failed/out_of_memory`), `requested()`,
and `install()` (a pool child calls it right after fork), which makes billiard's own check
between jobs see the request.

Why: a job that fails `out_of_memory` has grown the child's heap to its `RLIMIT_DATA` and left it
fragmented. The freed activations sit between small blocks made during that job (oneDNN caches a
primitive per new shape) and the CPU Predictor keeps freed blocks in the heap for speed
(worker/m2fp/allocator.py). Measured with a child at 1500 MB (the integration test's setting then),
after a 40 MP RGBA job failed: 564 MB free inside the heap, in 759 pieces, and the next 96x64
photo failed for want of one 39 MB block. Which next job still fits depends on how the pieces
fall, so the child does not gamble: it reports the failed job, then exits, and the pool forks a
fresh one (one model load, seconds) for the next job. No job is lost: the child takes no new job
before it exits, and its own job was already ended and acknowledged.

How: billiard's pool loop, after each job's result is sent and before it takes the next one,
compares `billiard.pool.mem_rss()` with the pool's `max_memory_per_child` and exits with
`EX_RECYCLE` above it (Celery's `worker_max_memory_per_child`). `install()` wraps that reading so
that a pending request reads as above every limit; without a request it is billiard's own RSS
reading. `shared.queue.make_celery` always sets the limit (`M2FP_MAX_MEMORY_PER_CHILD_MB`, or
`shared.queue.NO_RSS_LIMIT_KB`, which no real RSS reaches), so the check always runs. In batching mode (Celery's threads pool, no child to replace) nothing reads the
request; a batch there that runs out of memory is retried one job at a time (worker/batching.py).

Neither torch nor flask is imported here; billiard only inside `install()`.
"""

from __future__ import annotations

import logging
import threading

from shared.logging import event

log = logging.getLogger(__name__)

ABOVE_EVERY_LIMIT_KB = 1 << 62  # what the RSS reading says once retirement is requested
_state: dict[str, str] = {"requested": "", "installed": ""}  # "installed": "yes" once hooked
_lock = threading.Lock()


def request(reason: str) -> None:
    """Ask for this process to leave its pool after the current job (idempotent); a process
    without the hook (`install()` not called: batching mode, tests, the CLI) is left as it is."""
    with _lock:
        if _state["installed"] and not _state["requested"]:
            _state["requested"] = reason
            event(log, "child_retiring", logging.WARNING, reason=reason)


def requested() -> str:
    """The reason retirement was requested for, or "" when it was not."""
    return _state["requested"]


def install() -> bool:
    """Make billiard's between-jobs memory check honour `request()`; True if it now does."""
    try:
        from billiard import pool
    except ImportError:  # not a prefork child: nothing to hook
        return False
    with _lock:
        if _state["installed"]:
            return True
        measured = pool.mem_rss

        def reading() -> int:
            return ABOVE_EVERY_LIMIT_KB if _state["requested"] else measured()

        pool.mem_rss = reading
        _state["installed"] = "yes"
    return True
