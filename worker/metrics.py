"""Worker metrics for Prometheus: inference seconds, job seconds, outcomes, attempts, batch sizes.

Pool children record; the worker's parent process (torch-free) serves them on
`M2FP_WORKER_METRICS_HOST:M2FP_WORKER_METRICS_PORT` (0 disables) by aggregating every child's
samples through prometheus_client's multiprocess mode, so a scrape sees the whole worker
whichever child ran the job, and children replaced by Celery keep their counts.
`PROMETHEUS_MULTIPROC_DIR` must be set before the first import of prometheus_client in the
process tree: `serve_metrics` does it in the parent, before forking.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from shared.config import PROMETHEUS_MULTIPROC_VARIABLE, prometheus_multiproc_dir

JOB_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 55, 90, 150, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

_metrics = None


def serve_metrics(host: str, port: int) -> str | None:
    """In the parent: set up the multiprocess directory and serve /metrics; returns its path."""
    # Never an inherited directory: a gateway's on the same host would mix into this one's.
    os.environ.pop(PROMETHEUS_MULTIPROC_VARIABLE, None)
    if not port:
        return None
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = tempfile.mkdtemp(prefix="m2fp-worker-metrics-", dir=base)
    os.environ[PROMETHEUS_MULTIPROC_VARIABLE] = directory  # inherited by the pool children
    atexit.register(shutil.rmtree, directory, True)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
    return directory


def metrics():
    """The children's metric objects (created once per process, lazily)."""
    global _metrics  # noqa: PLW0603 (one set of metric objects per process, made lazily)
    if _metrics is None:
        from prometheus_client import Counter, Histogram

        _metrics = {
            "inference": Histogram(
                "m2fp_worker_inference_seconds",
                "Model time per job (preprocess, forward, postprocess)",
                buckets=JOB_BUCKETS,
            ),
            "job": Histogram(
                "m2fp_worker_job_seconds",
                "Whole job time in the worker (claim to stored)",
                buckets=JOB_BUCKETS,
            ),
            "outcomes": Counter("m2fp_worker_jobs", "Jobs handled, by outcome", ["outcome"]),
            "attempts": Histogram(
                "m2fp_worker_job_attempt",
                "Delivery attempt number of started jobs",
                buckets=(1, 2, 3, 4, 5),
            ),
            "batch_size": Histogram(
                "m2fp_worker_batch_size",
                "Jobs per model forward (batching mode; per-job workers record none)",
                buckets=BATCH_BUCKETS,
            ),
            "batch": Histogram(
                "m2fp_worker_batch_seconds",
                "Model time per batch (preprocess, forward, postprocess of all its images)",
                buckets=JOB_BUCKETS,
            ),
        }
    return _metrics


def record_job(
    outcome: str,
    seconds: float | None = None,
    inference: float | None = None,
    attempt: int | None = None,
) -> None:
    """Record one job's outcome and timings (no-op unless metrics are enabled)."""
    if not prometheus_multiproc_dir():
        return
    m = metrics()
    m["outcomes"].labels(outcome).inc()
    if seconds is not None:
        m["job"].observe(seconds)
    if inference is not None:
        m["inference"].observe(inference)
    if attempt is not None:
        m["attempts"].observe(attempt)


def record_batch(size: int, seconds: float) -> None:
    """Record one batched forward: how many jobs it held and its model time."""
    if not prometheus_multiproc_dir():
        return
    m = metrics()
    m["batch_size"].observe(size)
    m["batch"].observe(seconds)


def child_exited(pid: int) -> None:
    """Clean up a dead child's live-gauge files."""
    if prometheus_multiproc_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
