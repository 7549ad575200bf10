"""The `m2fp.parse` task, at module level, on a base class that owns the per-process predictor.

The Celery guide's "instantiation" pattern: a task is instantiated once per process, so
`ParseTask` keeps the pool child's `worker.process.WorkerProcess` (Redis store, the model loaded
once in the background, the heartbeat) as instance state, and `get_predictor` returns the loaded
model. The module can be imported and the task called in a test (`parse.run(job_id)`) without a
broker; `worker.celery_app.create_worker_app` registers it and wires the process signals.

The task itself stays thin: validate the id, call `worker.pipeline.process_job`, and turn the
Celery-level failures into a clear job state instead of a message loop: soft time limit (in
batching mode: its deadline passing while the job waits for its batch) -> `failed/timeout`;
unexpected crash -> `failed/internal_error`; a Redis error mid-job -> the message is rejected
*with requeue* (not acked) after a pause, so the job runs again once Redis answers, and the
job store's attempt counter ends it `failed/worker_lost` past `M2FP_MAX_ATTEMPTS`.
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Task, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from shared.config import Settings, load_settings
from shared.constants import JOB_ID_RE, TASK_PARSE
from shared.logging import bind, clear, event
from shared.queue import enqueue_parse
from worker.batching import BatchTimeout
from worker.metrics import record_job
from worker.pipeline import fail_job, process_job
from worker.process import WorkerProcess

log = logging.getLogger(__name__)
REDIS_ERROR_PAUSE = 2.0  # seconds before requeueing a job whose Redis call failed (no hot loop)


class ParseTask(Task):
    """Base of `m2fp.parse`: one `WorkerProcess` per process, made on first use."""

    _process: WorkerProcess | None = None

    def setup(self, settings: Settings) -> WorkerProcess:
        """Use `settings` for this process (the app factory calls it; else they are loaded)."""
        self._process = WorkerProcess(settings, requeue=self.requeue)
        return self._process

    def requeue(self, job_id: str) -> None:
        """Send job `job_id`'s message again, by name, like the gateway does."""
        enqueue_parse(self.app, job_id)

    @property
    def process(self) -> WorkerProcess:
        """This process's store, model and heartbeat; started here in a solo pool or a test."""
        process = self._process or self.setup(load_settings())
        if process.store is None:  # solo pool or direct call: no pool child was forked
            process.start()
        return process

    def start_process(self) -> WorkerProcess:
        """Start this process's store, model load and heartbeat now (after a pool child's fork)."""
        return self.process

    def get_predictor(self):
        """The process's loaded predictor (waits for the background load)."""
        return self.process.get_predictor()

    def end_job(self, job_id: str, code: str) -> str:
        """End a job `failed/<code>` from outside the pipeline; Redis errors are logged only."""
        record_job(f"failed_{code}")
        try:
            fail_job(self.process.started_store(), job_id, code)
        except redis.RedisError:
            log.warning("fail_job_redis_error", extra={"code": code})
        return "failed"


@shared_task(
    name=TASK_PARSE,
    base=ParseTask,
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def parse(self: ParseTask, job_id: str) -> str:
    """Run job `job_id` (the gateway enqueues only the id); returns its outcome."""
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        log.warning("invalid_task_argument")
        return "invalid"
    process = self.process
    bind(job_id=job_id, task_id=self.request.id)
    try:
        # Claim only once the model is loaded: the heartbeat that tells the reaper this process
        # is alive starts then, so a job is never claimed by a process that looks dead.
        process.get_predictor()
        return process_job(job_id, process.context())
    except (SoftTimeLimitExceeded, BatchTimeout):  # the latter: batching mode's soft limit
        event(log, "job_failed", logging.WARNING, code="timeout")
        return self.end_job(job_id, "timeout")
    except redis.RedisError:
        # Nothing can be stored now. Acking (what a plain exception does, with
        # task_acks_on_failure) would leave the job `running` until its TTL: reject with
        # requeue instead, after a pause, so the job runs again when Redis answers; each
        # delivery's claim counts an attempt, so past M2FP_MAX_ATTEMPTS it ends
        # failed/worker_lost. If the requeue itself cannot reach Redis, the message stays
        # in Celery's unacked set and comes back after the visibility timeout.
        log.exception("redis_error_during_job")
        record_job("requeued_redis_error")
        time.sleep(REDIS_ERROR_PAUSE)
        raise Reject("redis_error", requeue=True) from None
    except Exception:
        log.exception("job_crashed")
        return self.end_job(job_id, "internal_error")
    finally:
        clear()
