"""One pool child's state: its Redis store, its model (loaded once) and its heartbeat.

Fork safety (RESEARCH §2.1–2.3): the worker's parent process never imports torch. Each pool
child, after fork, caps its threads, opens its own Redis connection and loads the model once, in
a background thread started from `worker_process_init` (whose handlers must return within 4 s);
the task waits for it (`get_predictor`). Once the model is loaded, a heartbeat thread publishes
the child through `shared.heartbeat` (variant, device, untrained, deform_op: "op" or
"reference: <reason>") with a short TTL: that is what the gateway's /readyz reads.

`worker.tasks.ParseTask` owns one `WorkerProcess` per process; `worker.celery_app` wires its
`start`/`stop` to Celery's process signals.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
from kombu.exceptions import KombuError

from shared import heartbeat as heartbeats
from shared.config import Settings
from shared.constants import UNTRAINED_WARNING
from shared.heartbeat import HEARTBEAT_SECONDS, Heartbeat
from shared.jobstore import JobStore
from shared.logging import event
from shared.queue import unacked_job_ids
from shared.watchdog import MemoryWatchdog
from worker.batching import Batcher
from worker.metrics import record_batch, record_job
from worker.pipeline import JobContext
from worker.weights import settings_predictor

if TYPE_CHECKING:  # torch is imported in pool children only
    from worker.m2fp.predictor import Predictor

log = logging.getLogger(__name__)
MODEL_LOAD_TIMEOUT = 600
REAP_SECONDS = 5.0  # how often each live worker looks for dead workers' jobs (jittered)
UNCLAIMED_SECONDS = 30.0  # a message delivered this long ago whose job is still queued is re-sent
# A queued job sent this long before a job already claimed, with no unacked message, lost it.
VANISHED_MARGIN_SECONDS = 2.0


class WorkerProcess:
    """State of one pool child: its store, its model (loaded once) and its heartbeat."""

    def __init__(self, settings: Settings, requeue: Callable[[str], None] | None = None):
        self.settings = settings
        self.requeue = requeue  # re-sends a job's message (the reaper's); None: no reaper
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.loaded = threading.Event()
        self.predictor: Predictor | None = None
        self.load_error: BaseException | None = None
        self.store: JobStore | None = None
        self.batcher: Batcher | None = None  # batching mode only (settings.batching == "on")
        self._stop = threading.Event()

    def start(self) -> None:
        """Called in the child right after fork: new connections, model load in background."""
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.store = JobStore.from_settings(self.settings)
        MemoryWatchdog(
            self.settings.memory_alert_percent, self.settings.alert_webhook, component="worker"
        ).start()
        threading.Thread(target=self._load_model, name="m2fp-model-load", daemon=True).start()

    def _device(self) -> str:
        import torch

        if self.settings.device != "auto":
            return self.settings.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _load_model(self) -> None:
        try:
            import torch

            torch.set_num_threads(self.settings.torch_threads_per_child())
            device = self._device()
            tic = time.monotonic()
            predictor = settings_predictor(self.settings, device)
            self.predictor = predictor
            self._announce(predictor, device, time.monotonic() - tic, torch.get_num_threads())
            batch = self._start_batcher(predictor)
            heartbeat = Heartbeat(
                name=self.name,
                variant=self.settings.variant,
                device=str(predictor.device),
                untrained=predictor.untrained,
                pid=os.getpid(),
                deform_op=predictor.deform_attn,
                precision=predictor.precision,
                started=round(time.time()),
                batch=batch,
                batch_wait_ms=self.settings.batch_wait_ms if batch > 1 else 0,
            )
            threading.Thread(
                target=self._heartbeat, args=(heartbeat,), name="m2fp-heartbeat", daemon=True
            ).start()
            if self.requeue is not None:
                threading.Thread(target=self._reaper, name="m2fp-reaper", daemon=True).start()
        except BaseException as exc:
            self.load_error = exc
            log.critical("model_load_failed", exc_info=True)
        finally:
            self.loaded.set()

    def _announce(self, predictor: Predictor, device: str, seconds: float, threads: int) -> None:
        """The start log: what was loaded, which deformable-attention path, and loud warnings."""
        event(
            log,
            "model_loaded",
            seconds=round(seconds, 2),
            device=device,
            variant=self.settings.variant,
            untrained=predictor.untrained,
            threads=threads,
            deform_op=predictor.deform_attn,
            precision=predictor.precision,
            precision_reason=predictor.precision_choice.reason,
            backbone=predictor.backbone_path,
            winograd=predictor.winograd_path,
            amx=predictor.amx_path,
            encoder=predictor.encoder_path,
            dense=predictor.dense_path,
            allocator=predictor.allocator,
            cpu_flags=predictor.precision_choice.features,
        )
        if (
            predictor.deform_attn != "op"
            and device == "cpu"
            and self.settings.deform_attn != "reference"
        ):
            event(
                log,
                "deform_attn_op_not_used_reference_is_slower",
                logging.WARNING,
                mode=self.settings.deform_attn,
                deform_op=predictor.deform_attn,
            )
        if predictor.untrained:
            event(log, "untrained_model", logging.WARNING, warning=UNTRAINED_WARNING)

    def _start_batcher(self, predictor: Predictor) -> int:
        """In batching mode, start the process's batcher; the most jobs per forward (1: per job)."""
        settings = self.settings
        on = settings.batching == "on"
        event(
            log,
            "worker_mode",
            batching=on,
            max_batch=settings.gpu_batch if on else 1,
            batch_wait_ms=settings.batch_wait_ms if on else 0,
        )
        if not on:
            return 1
        self.batcher = Batcher(
            predictor.predict_batch,
            max_batch=settings.gpu_batch,
            wait_seconds=settings.batch_wait_ms / 1000,
            hard_limit=settings.hard_time_limit,
            on_stuck=self._forward_stuck,
            on_batch=record_batch,
        ).start()
        return settings.gpu_batch

    def _forward_stuck(self, seconds: float) -> None:
        """A batch's forward ran past the hard time limit: exit, as prefork kills such a child.

        Every message of the process is unacked, so each job comes back (the reaper requeues
        the claimed ones once this heartbeat lapses); the attempt counter bounds a job that hangs
        the device each time.
        """
        event(log, "batch_forward_past_hard_limit_exiting", logging.CRITICAL, seconds=seconds)
        logging.shutdown()
        os._exit(70)

    def _heartbeat(self, heartbeat: Heartbeat) -> None:
        store = self.started_store()
        while not self._stop.is_set():
            try:
                heartbeats.beat(store.redis, heartbeat)
            except redis.RedisError:
                log.warning("heartbeat_failed")
            self._stop.wait(HEARTBEAT_SECONDS)

    def _reaper(self) -> None:
        """Every few seconds: requeue the jobs of workers whose heartbeat lapsed."""
        store = self.started_store()
        while not self._stop.wait(REAP_SECONDS * random.uniform(0.8, 1.2)):
            try:
                self.reap_once(store)
            except (redis.RedisError, OSError, KombuError):
                log.warning("reaper_failed", exc_info=True)

    def reap_once(self, store: JobStore) -> list[str]:
        """One pass: the jobs put back in the queue (their messages re-sent).

        Three kinds: jobs a dead worker had claimed (`JobStore.reap`); jobs whose message a
        worker took but never claimed (it died between the two: the message waits unacked
        for the visibility timeout, the job stays `queued`); and jobs whose message vanished
        (`JobStore.vanished`: taken from the queue by a consumer killed before kombu recorded it
        as unacked, or never sent by a gateway that died after recording the job).
        """
        job_ids = store.reap()
        unclaimed = [
            job_id
            for job_id in unacked_job_ids(store.redis, UNCLAIMED_SECONDS)
            if job_id not in job_ids and store.may_resend(job_id, UNCLAIMED_SECONDS)
        ]
        vanished = self._vanished(store, set(job_ids + unclaimed))
        for job_id in job_ids + unclaimed + vanished:
            if self.requeue is not None:
                self.requeue(job_id)
        for name, metric, found in (
            ("jobs_of_dead_workers_requeued", "requeued_dead_worker", job_ids),
            ("unclaimed_jobs_resent", "resent_unclaimed", unclaimed),
            ("vanished_messages_resent", "resent_vanished", vanished),
        ):
            if found:
                event(log, name, logging.WARNING, count=len(found))
                record_job(metric)
        return job_ids + unclaimed + vanished

    @staticmethod
    def _vanished(store: JobStore, handled: set[str]) -> list[str]:
        """The `JobStore.vanished` candidates with no unacked message, each at most once an
        interval (`may_resend`); a live consumer records its message as unacked within
        milliseconds, long before the margin lets a later claim make the job a candidate."""
        candidates = store.vanished(VANISHED_MARGIN_SECONDS)
        if not candidates:
            return []
        unacked = set(unacked_job_ids(store.redis, 0.0))
        return [
            job_id
            for job_id in candidates
            if job_id not in unacked
            and job_id not in handled
            and store.may_resend(job_id, UNCLAIMED_SECONDS)
        ]

    def stop(self) -> None:
        """Called in the child before it exits: stop the heartbeat, remove its key."""
        self._stop.set()
        if self.batcher is not None:
            self.batcher.stop()
        if self.store is not None:
            try:
                heartbeats.remove(self.store.redis, self.name)
            except redis.RedisError:
                pass

    def started_store(self) -> JobStore:
        """The child's job store; `start` must have run."""
        if self.store is None:
            raise RuntimeError("WorkerProcess.start() has not run in this process")
        return self.store

    def get_predictor(self) -> Predictor:
        """The loaded predictor (waits for the background load); raises if it failed."""
        if not self.loaded.wait(MODEL_LOAD_TIMEOUT):
            raise RuntimeError("model did not load in time")
        if self.predictor is None:
            raise RuntimeError("model failed to load") from self.load_error
        return self.predictor

    def context(self) -> JobContext:
        """Dependencies for `process_job`."""
        return JobContext(
            store=self.started_store(),
            keyring=self.settings.keyring,
            predictor=self.get_predictor,
            worker_name=self.name,
            max_pixels=self.settings.max_pixels,
            max_decode_bytes=self.settings.max_decode_mb * 1024 * 1024,
            infer_max_side=self.settings.infer_max_side,
            infer=self._batched_infer() if self.batcher is not None else None,
        )

    def _batched_infer(self) -> Callable:
        """Parse in the next batch, waiting at most until the job's soft time limit."""
        batcher, deadline = self.batcher, time.monotonic() + self.settings.soft_time_limit
        if batcher is None:
            raise RuntimeError("the batcher runs in batching mode only")
        return lambda image: batcher.infer(image, timeout=deadline - time.monotonic())
