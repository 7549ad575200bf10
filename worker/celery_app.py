"""The worker's Celery app factory and its pool children's lifecycle, nothing else.

`create_worker_app(settings)` makes the app (`shared.queue.make_celery`), registers the
module-level `m2fp.parse` task of `worker.tasks` and configures it with `settings`, and wires
Celery's process signals: each pool child, right after fork, hardens itself (`shared.hardening`:
no core dumps, not dumpable, its data segment capped at `M2FP_CHILD_MEMORY_LIMIT_MB`, so an
outlier job fails `out_of_memory` alone instead of waking the kernel's OOM killer, after which
the child is replaced: worker/retirement.py), configures logging and starts its `WorkerProcess`
(model load in the background, then the heartbeat); before it exits it removes its heartbeat. In batching mode (`settings.batching == "on"`, Celery's threads
pool, worker/batching.py) the worker process itself does all of that.
"""

from __future__ import annotations

import os

from celery import Celery, signals

from shared.config import Settings
from shared.constants import TASK_PARSE
from shared.hardening import disable_core_dumps, limit_memory
from shared.logging import configure_logging
from shared.queue import make_celery
from worker import retirement, tasks
from worker.metrics import child_exited


def create_worker_app(settings: Settings) -> Celery:
    """The worker's Celery app with the parse task configured and the process signals wired."""
    app = make_celery(settings, "m2fp-worker")
    task: tasks.ParseTask = app.tasks[TASK_PARSE]
    task.setup(settings)

    if settings.batching == "on":
        _wire_threads_pool(settings, task)
        return app

    @signals.worker_process_init.connect(weak=False)
    def _child_started(**_):
        disable_core_dumps()
        limit_memory(settings.child_memory_limit_mb)
        retirement.install()  # a job out of that memory ends the child after it (the pool forks anew)
        configure_logging(settings.log_level)
        task.start_process()

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_stopping(**_):
        task.process.stop()
        child_exited(os.getpid())

    return app


def _wire_threads_pool(settings: Settings, task: tasks.ParseTask) -> None:
    """Batching mode: no pool child, the worker process itself holds the model and the batcher.

    Celery's threads pool sends no process signals; the process starts its `WorkerProcess`
    (model load, batcher, heartbeat, reaper) at `worker_init`, before it consumes, and removes
    its heartbeat at `worker_shutdown`, after its running jobs ended.
    """

    @signals.worker_init.connect(weak=False)
    def _worker_started(**_):
        limit_memory(settings.child_memory_limit_mb)  # python -m worker clears it on CUDA
        task.start_process()

    @signals.worker_shutdown.connect(weak=False)
    def _worker_stopping(**_):
        task.process.stop()
