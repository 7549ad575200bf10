"""Dynamic batching in one worker process: many job threads, one inference thread, one forward.

In batching mode (`M2FP_BATCHING`, on CUDA by default) the worker runs Celery's threads pool:
each job runs the normal per-job pipeline in its own thread (claim, decrypt, decode, then seal,
store and ack its own message) and, instead of calling the predictor, hands its decoded image to
this process's `Batcher` (`infer`). The batcher's one inference thread takes the first waiting
image, waits up to `wait_seconds` (`M2FP_BATCH_WAIT_MS`) for more, up to `max_batch`
(`M2FP_GPU_BATCH`), runs one `predict_batch` for them and resolves each caller with its own
result. So delivery stays per job: each message is acked by its own thread when its job ends, a
crash of the process loses none (every unacked message comes back), a withdrawn job's result is
discarded by its own thread alone.

Failure semantics:
- an exception in a batch's forward fails every caller of that batch with it (a copy of the same
  type, chained to the original), so each job ends in its normal failure path; an out-of-memory
  error of a batch of several images first retries them one at a time, so only an image that
  does not fit alone fails `out_of_memory`;
- a caller's own deadline (the job's soft time limit: Celery's time limits need the prefork pool)
  raises `BatchTimeout` in that caller only; its image is dropped if its batch has not started;
- a forward that runs past `hard_limit` seconds means the device hangs: `on_stuck` is called
  (the worker logs it and exits the process, its messages are redelivered, the attempt counter
  bounds a job that hangs it each time), as the prefork pool kills a child past the hard limit.

Plain threading and NumPy-free: the predictor is any `predict_batch(images) -> results` callable.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.logging import event
from worker.pipeline import is_out_of_memory

log = logging.getLogger(__name__)
STUCK_CHECK_SECONDS = 1.0


class BatchTimeout(Exception):
    """A job's deadline passed while it waited for its batch's result."""


@dataclass(eq=False)
class _Entry:
    """One caller's image and, once its batch ran, its result or error."""

    image: Any
    queued_at: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False  # the caller gave up (deadline): never run, never resolved


def _copy_error(error: BaseException) -> BaseException:
    """An exception of the same type and arguments for one caller (each raises its own)."""
    try:
        duplicate = copy.copy(error)
    except Exception:
        return error
    if duplicate is error or type(duplicate) is not type(error):
        return error
    duplicate.__cause__ = error
    duplicate.__traceback__ = None
    return duplicate


class Batcher:
    """Collects images from many threads into batches for one `predict_batch` callable."""

    def __init__(
        self,
        predict_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int = 8,
        wait_seconds: float = 0.01,
        hard_limit: float | None = None,
        on_stuck: Callable[[float], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, but got {max_batch}")
        if wait_seconds < 0:
            raise ValueError(f"wait_seconds must be >= 0, but got {wait_seconds}")
        self.predict_batch, self.max_batch, self.wait_seconds = (
            predict_batch,
            max_batch,
            wait_seconds,
        )
        self.hard_limit, self.on_stuck, self.on_batch = hard_limit, on_stuck, on_batch
        self._queue: queue.Queue[_Entry] = queue.Queue()
        self._lock = threading.Lock()  # guards `abandoned` against the collector taking an entry
        self._busy_since: float | None = None
        self._stop = threading.Event()

    def start(self) -> Batcher:
        """Start the inference thread (and the hard-limit monitor when a limit is set)."""
        threading.Thread(target=self._run, name="m2fp-batcher", daemon=True).start()
        if self.hard_limit is not None:
            threading.Thread(target=self._monitor, name="m2fp-batch-monitor", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop taking new batches (a running forward finishes; waiting callers time out)."""
        self._stop.set()

    def infer(self, image: Any, timeout: float | None = None) -> Any:
        """This image's result from the next batch; raises its batch's error or `BatchTimeout`."""
        entry = _Entry(image)
        self._queue.put(entry)
        if not entry.done.wait(None if timeout is None else max(0.0, timeout)):
            with self._lock:
                entry.abandoned = True
            if not entry.done.is_set():
                raise BatchTimeout("the job's time limit passed while it waited for its batch")
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _collect(self) -> list[_Entry]:
        """The next batch: the first waiting image, and more for up to `wait_seconds`."""
        first = self._queue.get(timeout=0.5)
        batch, deadline = [first], time.monotonic() + self.wait_seconds
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    batch.append(self._queue.get(timeout=remaining))
                else:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        with self._lock:  # from here on a caller that gives up still gets resolved (and ignores it)
            return [entry for entry in batch if not entry.abandoned]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._collect()
            except queue.Empty:
                continue
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as error:  # never leave a caller waiting, never lose the thread
                log.exception("batch_failed_outside_the_forward")
                for entry in batch:
                    if not entry.done.is_set():
                        entry.error = _copy_error(error)
                        entry.done.set()

    def run_batch(self, batch: list[_Entry]) -> None:
        """One forward for `batch`; resolves every entry with its result or the batch's error."""
        started = time.monotonic()
        self._busy_since = started
        try:
            results = list(self.predict_batch([entry.image for entry in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"predict_batch gave {len(results)} results for {len(batch)}")
        except Exception as error:
            if len(batch) > 1 and is_out_of_memory(error):
                del error
                event(log, "batch_out_of_memory_retrying_singly", logging.WARNING, size=len(batch))
                for entry in batch:
                    self.run_batch([entry])
                return
            for entry in batch:
                entry.error = _copy_error(error)
                entry.done.set()
            return
        finally:
            self._busy_since = None
        seconds = time.monotonic() - started
        for entry, result in zip(batch, results, strict=True):
            timings = getattr(result, "timings", None)
            if isinstance(timings, dict):
                timings["batch_size"] = len(batch)
                timings["batch_wait"] = started - entry.queued_at
            entry.result = result
            entry.done.set()
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)

    def _monitor(self) -> None:
        """Call `on_stuck` once a forward has run past the hard limit."""
        while not self._stop.wait(STUCK_CHECK_SECONDS):
            since = self._busy_since
            if since is not None and self.hard_limit is not None and self.on_stuck is not None:
                running = time.monotonic() - since
                if running > self.hard_limit:
                    self.on_stuck(running)
                    return
