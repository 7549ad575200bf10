"""`python -m worker`: start a Celery worker for the parse queue, safely.

Before Celery starts: read the settings (fail fast), resolve the checkpoint, cap the BLAS/OpenMP
thread pools through the environment (inherited by pool children, read when torch loads there),
and, unless `--no-preflight`, load the model once in a throw-away subprocess so that a missing,
corrupt or mismatched checkpoint stops the worker at start with a clear message, instead of
failing every job. The parent process itself never imports torch; in batching mode
(`M2FP_BATCHING`, worker/batching.py) there is no pool child and this process loads the model
(Celery's threads pool: nothing forks after it).

Extra arguments after `--` go to `celery worker` (e.g. `-- --hostname w2@%h`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

from shared.config import ConfigError, Settings, load_settings, resolve_weights
from shared.constants import QUEUE, RANDOM_WEIGHTS, UNTRAINED_WARNING
from shared.hardening import disable_core_dumps
from shared.logging import configure_logging
from worker.metrics import serve_metrics


def _prepare_children(settings: Settings, weights: str) -> None:
    """Cap the BLAS/OpenMP pools for the pool children (they read it when torch loads there)."""
    threads = str(settings.torch_threads_per_child())
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = threads
    if weights == RANDOM_WEIGHTS:
        banner = "!" * 78
        print(f"\n{banner}\n!! {UNTRAINED_WARNING}\n{banner}\n", file=sys.stderr, flush=True)


CUDA_PROBE = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"


GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's and ROCm's (torch.cuda on both)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device, asked in a subprocess (this process never imports torch);
    not asked at all on a host without a GPU driver's device node (the usual CPU-only host)."""
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return False
    probe = subprocess.run([sys.executable, "-c", CUDA_PROBE], check=False, capture_output=True)
    return probe.returncode == 0


def resolve_batching(settings: Settings, probe=cuda_available) -> Settings:
    """Settings with M2FP_BATCHING decided: `auto` is on where the worker's device is CUDA.

    Batching mode runs one process (Celery's threads pool, no fork, which CUDA needs anyway):
    its torch threads are not shared out among pool processes, and on CUDA the data-segment
    limit of a pool child is not applied (the GPU's memory bounds a batch; a CUDA
    out-of-memory error fails the jobs `out_of_memory` like the limit does on CPU).
    """
    device = settings.device
    on_cuda = device.startswith("cuda") or (device == "auto" and probe())
    batching = settings.batching
    if batching == "auto":
        batching = "on" if on_cuda else "off"
    if batching == "off":
        return dataclasses.replace(settings, batching="off")
    return dataclasses.replace(
        settings,
        batching="on",
        worker_concurrency=1,  # one model process; the job threads are `batch_threads`
        child_memory_limit_mb=None if on_cuda else settings.child_memory_limit_mb,
    )


def batch_threads(settings: Settings) -> int:
    """Job threads of a batching worker: two batches' worth, one in the forward, the next
    being claimed, decrypted and decoded meanwhile (prefetch 1 reserves as many messages)."""
    return 2 * settings.gpu_batch


def _celery_argv(settings: Settings, extra: list[str]) -> list[str]:
    """`celery worker` arguments: prefork pool (threads when batching), the parse queue, task
    events, no gossip."""
    batching = settings.batching == "on"
    return [
        "worker",
        "--loglevel",
        settings.log_level,
        "--pool",
        "threads" if batching else "prefork",
        "--concurrency",
        str(batch_threads(settings) if batching else settings.worker_concurrency),
        "--queues",
        QUEUE,
        "--task-events",
        "--without-gossip",
        # Mingle (start-up sync of revoked ids) needs reply keys the worker's Redis ACL refuses;
        # the service revokes nothing, so there is nothing to sync.
        "--without-mingle",
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, check configuration and the model, then run the Celery worker."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--no-preflight", action="store_true", help="skip the model load check")
    parser.add_argument("celery_args", nargs="*", help="extra arguments for celery worker")
    args = parser.parse_args(argv)
    disable_core_dumps()  # before any secret is read; pool children inherit it and repeat it
    try:
        settings = load_settings()
        weights = resolve_weights(settings)
    except ConfigError as exc:
        print(f"m2fp worker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    settings = resolve_batching(settings)
    _prepare_children(settings, weights)
    if not args.no_preflight:
        check = subprocess.run([sys.executable, "-m", "worker.preflight"], check=False)
        if check.returncode != 0:
            print("m2fp worker: the model could not be loaded; not starting", file=sys.stderr)
            return 3
    try:
        serve_metrics(settings.worker_metrics_host, settings.worker_metrics_port)
    except OSError as exc:
        where = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
        print(f"m2fp worker: cannot serve metrics on {where}: {exc.strerror}", file=sys.stderr)
        return 2
    from worker.celery_app import create_worker_app

    create_worker_app(settings).worker_main(_celery_argv(settings, args.celery_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
