"""The worker's Celery app: the `m2fp.parse` task and the per-process model lifecycle.

Fork safety (RESEARCH §2.1–2.3): the parent process never imports torch. Each pool child, after
fork, caps its threads, opens its own Redis connection and loads the model once, in a background
thread started from `worker_process_init` (whose handlers must return within 4 s); the task waits
for it. A heartbeat thread in each child publishes `m2fp:worker:{name}` (variant, device,
untrained, deform_op: "op" or "reference: <reason>") with a short TTL once the model is loaded:
that is what the gateway's /readyz reads.

Each pool child also hardens itself before anything else (`shared.hardening`): no core dumps,
not dumpable, and its data segment capped at `M2FP_CHILD_MEMORY_LIMIT_MB`, so an outlier job
fails `out_of_memory` alone instead of waking the kernel's OOM killer.

The task itself stays thin: validate the id, call `worker.pipeline.process_job`, and turn the
Celery-level failures into a clear job state instead of a message loop: soft time limit ->
`failed/timeout`; unexpected crash -> `failed/internal_error`; a Redis error mid-job -> the
message is rejected *with requeue* (not acked) after a pause, so the job runs again once Redis
answers, and the job store's attempt counter ends it `failed/worker_lost` past
`M2FP_MAX_ATTEMPTS`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time

import redis
from celery import Celery, signals
from celery.exceptions import Reject, SoftTimeLimitExceeded

from shared import heartbeat as heartbeats
from shared.config import Settings, resolve_weights
from shared.constants import TASK_PARSE
from shared.hardening import disable_core_dumps, limit_memory
from shared.heartbeat import HEARTBEAT_SECONDS, Heartbeat
from shared.jobstore import JobStore
from shared.logging import bind, clear, configure_logging, event
from shared.queue import make_celery
from shared.watchdog import MemoryWatchdog
from worker.metrics import child_exited, record_job
from worker.pipeline import JobContext, fail_job, process_job
from worker.weights import load_predictor

log = logging.getLogger(__name__)
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MODEL_LOAD_TIMEOUT = 600
REDIS_ERROR_PAUSE = 2.0  # seconds before requeueing a job whose Redis call failed (no hot loop)


def torch_threads(settings: Settings) -> int:
    """Threads per pool process so that processes x threads <= cores (RESEARCH §2.2)."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) // settings.worker_concurrency)


class WorkerProcess:
    """State of one pool child: its store, its model (loaded once) and its heartbeat."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.loaded = threading.Event()
        self.predictor = None
        self.load_error: BaseException | None = None
        self.store: JobStore | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Called in the child right after fork: new connections, model load in background."""
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.store = JobStore.from_settings(self.settings)
        MemoryWatchdog(
            self.settings.memory_alert_percent, self.settings.alert_webhook, component="worker"
        ).start()
        threading.Thread(target=self._load_model, name="m2fp-model-load", daemon=True).start()

    def _load_model(self) -> None:
        try:
            import torch

            torch.set_num_threads(torch_threads(self.settings))
            device = self.settings.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            tic = time.monotonic()
            self.predictor = load_predictor(
                resolve_weights(self.settings),
                variant=self.settings.variant,
                device=device,
                max_side=self.settings.infer_max_side,
                sha256=self.settings.weights_sha256,
                key_file=self.settings.weights_key_file,
                deform_attn=self.settings.deform_attn,
            )
            event(
                log,
                "model_loaded",
                seconds=round(time.monotonic() - tic, 2),
                device=device,
                variant=self.settings.variant,
                untrained=self.predictor.untrained,
                threads=torch.get_num_threads(),
                deform_op=self.predictor.deform_attn,
            )
            if (
                self.predictor.deform_attn != "op"
                and device == "cpu"
                and self.settings.deform_attn != "reference"
            ):
                event(
                    log,
                    "deform_attn_op_not_used_reference_is_slower",
                    logging.WARNING,
                    mode=self.settings.deform_attn,
                    deform_op=self.predictor.deform_attn,
                )
            if self.predictor.untrained:
                event(
                    log, "UNTRAINED_MODEL_random_weights_results_are_meaningless", logging.WARNING
                )
            threading.Thread(target=self._heartbeat, name="m2fp-heartbeat", daemon=True).start()
        except BaseException as exc:
            self.load_error = exc
            log.critical("model_load_failed", exc_info=True)
        finally:
            self.loaded.set()

    def _heartbeat(self) -> None:
        heartbeat = Heartbeat(
            name=self.name,
            variant=self.settings.variant,
            device=str(self.predictor.device),
            untrained=self.predictor.untrained,
            pid=os.getpid(),
            deform_op=self.predictor.deform_attn,
            started=round(time.time()),
        )
        while not self._stop.is_set():
            try:
                heartbeats.beat(self.store.redis, heartbeat)
            except redis.RedisError:
                log.warning("heartbeat_failed")
            self._stop.wait(HEARTBEAT_SECONDS)

    def stop(self) -> None:
        """Called in the child before it exits: stop the heartbeat, remove its key."""
        self._stop.set()
        if self.store is not None:
            try:
                heartbeats.remove(self.store.redis, self.name)
            except redis.RedisError:
                pass

    def get_predictor(self):
        """The loaded predictor; raises if the model could not be loaded."""
        if not self.loaded.wait(MODEL_LOAD_TIMEOUT):
            raise RuntimeError("model did not load in time")
        if self.predictor is None:
            raise RuntimeError("model failed to load") from self.load_error
        return self.predictor

    def context(self) -> JobContext:
        """Dependencies for `process_job`."""
        return JobContext(
            store=self.store,
            keyring=self.settings.keyring,
            predictor=self.get_predictor,
            worker_name=self.name,
            max_pixels=self.settings.max_pixels,
            max_decode_bytes=self.settings.max_decode_mb * 1024 * 1024,
            infer_max_side=self.settings.infer_max_side,
        )


def create_worker_app(settings: Settings) -> Celery:
    """The worker's Celery app with the parse task and process signals registered."""
    app = make_celery(settings, "m2fp-worker")
    process = WorkerProcess(settings)

    @signals.worker_process_init.connect(weak=False)
    def _child_started(**_):
        disable_core_dumps()
        limit_memory(settings.child_memory_limit_mb)
        configure_logging(settings.log_level)
        process.start()

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_stopping(**_):
        process.stop()
        child_exited(os.getpid())

    @app.task(
        name=TASK_PARSE, bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True
    )
    def parse(self, job_id: str) -> str:
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            log.warning("invalid_task_argument")
            return "invalid"
        if process.store is None:  # solo pool or eager use: no fork happened
            process.start()
        bind(job_id=job_id, task_id=self.request.id)
        try:
            return process_job(job_id, process.context())
        except SoftTimeLimitExceeded:
            fail_job(process.store, job_id, "timeout")
            event(log, "job_failed", logging.WARNING, code="timeout")
            record_job("failed_timeout")
            return "failed"
        except redis.RedisError:
            # Nothing can be stored now. Acking (what a plain exception does, with
            # task_acks_on_failure) would leave the job `running` until its TTL: reject with
            # requeue instead, after a pause, so the job runs again when Redis answers; each
            # delivery's claim counts an attempt, so past M2FP_MAX_ATTEMPTS it ends
            # failed/worker_lost. If the requeue itself cannot reach Redis, the message stays
            # in Celery's unacked set and comes back after the visibility timeout.
            log.error("redis_error_during_job", exc_info=True)
            record_job("requeued_redis_error")
            time.sleep(REDIS_ERROR_PAUSE)
            raise Reject("redis_error", requeue=True) from None
        except Exception:
            log.error("job_crashed", exc_info=True)
            record_job("failed_internal_error")
            try:
                fail_job(process.store, job_id, "internal_error")
            except redis.RedisError:
                pass
            return "failed"
        finally:
            clear()

    app.m2fp_process = process  # for tests and the preflight
    return app
