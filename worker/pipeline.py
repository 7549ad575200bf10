"""One job, start to finish, as a plain function: claim -> decrypt -> decode -> parse -> seal -> store.

`process_job` is everything the Celery task does, written without Celery so it can be tested
with a real Redis and no broker. It owns the job's failure semantics: bad input ends the job
`failed` with a public code and never raises into Celery (so the message is acked, not retried);
an input that expired ends it `expired`; a withdrawn job's result is discarded; a job that runs
out of the pool child's memory limit (`M2FP_CHILD_MEMORY_LIMIT_MB`) ends `failed/out_of_memory`
and the pool child is replaced before its next job (worker/retirement.py). The plaintext image
and result exist only in this function's locals, and are dropped as soon as sealed. A JPEG may be decoded smaller than uploaded (`draft()` down to the
inference size); the maps and boxes are scaled back to the upload size here.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shared.constants import CIHP_CLASSES, LIP_CLASSES, UNTRAINED_WARNING
from shared.crypto import Keyring, decrypt_payload, seal_result
from shared.errors import DecodeTooLarge, DecryptionError, TooManyPixels, UndecodableImage
from shared.jobstore import JobStore
from shared.logging import event
from worker import retirement
from worker.imaging import decode_upload, png_base64
from worker.metrics import record_job

log = logging.getLogger(__name__)


class SupportsPredict(Protocol):
    """What the pipeline needs of a predictor (worker.m2fp.predictor.Predictor)."""

    untrained: bool
    variant: str

    def predict(self, image_rgb: np.ndarray): ...

    # Scales a parsing made at the working size back to the upload's (Predictor's own helper).
    def _to_input_size(self, parsing, height: int, width: int): ...


@dataclass
class JobContext:
    """Per-process dependencies of `process_job`."""

    store: JobStore
    keyring: Keyring
    predictor: Callable[[], SupportsPredict]
    worker_name: str
    max_pixels: int
    max_decode_bytes: int | None = None
    infer_max_side: int | None = None
    # Batching mode (worker/batching.py): parses a decoded image in the process's next batch.
    infer: Callable[[np.ndarray], Any] | None = None


def build_result(
    job_id: str, parsing, *, untrained: bool, variant: str, timings: dict, precision: str = "fp32"
) -> bytes:
    """The result document (DESIGN §2) as JSON bytes; maps as base64 single-channel PNGs."""
    label_map = parsing.label_map
    height, width = label_map.shape
    names = LIP_CLASSES if variant == "lip" else CIHP_CLASSES
    document = {
        "job_id": job_id,
        "width": int(width),
        "height": int(height),
        "label_map_png": png_base64(label_map),
        "instance_map_png": png_base64(parsing.instance_map),
        "persons": parsing.persons,
        "parts": parsing.parts,
        "classes": {str(i): name for i, name in enumerate(names)},
        "classes_present": sorted(int(c) for c in np.unique(label_map)),
        "untrained": untrained,
        "warnings": [UNTRAINED_WARNING] if untrained else [],
        "precision": precision,  # the network's arithmetic (worker/m2fp/precision.py)
        "timings": {k: v if isinstance(v, int) else round(float(v), 4) for k, v in timings.items()},
    }
    return json.dumps(document, separators=(",", ":")).encode()


def _fail(ctx: JobContext, job_id: str, code: str, started: float, reason: str) -> str:
    ctx.store.fail(job_id, code)
    seconds = time.monotonic() - started
    event(log, "job_failed", logging.WARNING, code=code, reason=reason, seconds=round(seconds, 3))
    record_job(f"failed_{code}", seconds)
    return "failed"


def process_job(job_id: str, ctx: JobContext) -> str:
    """Run one job; returns the outcome ('done', 'failed', 'expired', 'discarded', ...)."""
    started = time.monotonic()
    claim = ctx.store.claim(job_id, ctx.worker_name)
    if claim.outcome != "ok":
        event(log, "job_not_run", logging.WARNING, outcome=claim.outcome)
        record_job(claim.outcome)
        return claim.outcome
    event(log, "job_started", attempt=claim.attempts)
    try:
        data_key = ctx.keyring.unwrap(job_id, claim.key_id, claim.wrapped_key)
        # The result key is in the input's associated data: one swapped in Redis fails here.
        image_bytes = decrypt_payload(
            data_key, job_id, "in", claim.sealed_input, bound=claim.result_key
        )
    except DecryptionError:
        return _fail(ctx, job_id, "internal_error", started, "decryption_failed")
    try:
        sealed, timings = _parse_and_seal(ctx, job_id, image_bytes, data_key, claim.result_key)
    except (UndecodableImage, TooManyPixels, DecodeTooLarge) as exc:
        return _fail(ctx, job_id, exc.code, started, exc.code)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        del exc
        return _out_of_memory(ctx, job_id, started)
    del image_bytes
    if not ctx.store.store_result(job_id, sealed):
        event(log, "job_discarded", reason="withdrawn_or_expired")
        record_job("discarded", time.monotonic() - started, timings["inference"], claim.attempts)
        return "discarded"
    seconds = time.monotonic() - started
    event(
        log,
        "job_done",
        seconds=round(seconds, 3),
        inference_seconds=round(timings["inference"], 3),
        attempt=claim.attempts,
        batch_size=timings["batch_size"],
    )
    record_job("done", seconds, timings["inference"], claim.attempts)
    return "done"


def _out_of_memory(ctx: JobContext, job_id: str, started: float) -> str:
    """End a job that ran out of the child's memory; the child leaves the pool after it (its heap
    is left fragmented: worker/retirement.py)."""
    gc.collect()
    retirement.request("out_of_memory")
    return _fail(ctx, job_id, "out_of_memory", started, "memory_limit")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation refused by the memory limit: MemoryError, or torch's allocator error."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def _parse_and_seal(
    ctx: JobContext, job_id: str, image_bytes: bytes, data_key: bytes, result_key: bytes
):
    """Decode, parse at (at most) the inference size, render at the upload size, seal the result."""
    timings: dict[str, float] = {}
    tic = time.monotonic()
    decoded = decode_upload(
        image_bytes,
        max_pixels=ctx.max_pixels,
        max_decode_bytes=ctx.max_decode_bytes,
        target_side=ctx.infer_max_side,
    )
    timings["decode"] = time.monotonic() - tic
    predictor = ctx.predictor()
    tic = time.monotonic()
    parsing = ctx.infer(decoded.rgb) if ctx.infer is not None else predictor.predict(decoded.rgb)
    model_timings = dict(getattr(parsing, "timings", {}))  # before a rescale makes a new result
    if parsing.label_map.shape != (decoded.height, decoded.width):
        # Decoded smaller than uploaded (JPEG draft): maps, boxes and areas back to the upload size.
        parsing = predictor._to_input_size(parsing, decoded.height, decoded.width)
    timings["inference"] = time.monotonic() - tic
    timings["batch_size"] = int(model_timings.pop("batch_size", 1))  # jobs in its forward
    timings.update({f"model_{k}": v for k, v in model_timings.items()})
    del decoded
    tic = time.monotonic()
    document = build_result(
        job_id,
        parsing,
        untrained=predictor.untrained,
        variant=predictor.variant,
        timings=timings,
        precision=getattr(predictor, "precision", "fp32"),
    )
    sealed = seal_result(result_key, data_key, job_id, document)
    del document, parsing
    timings["render_seal"] = time.monotonic() - tic
    return sealed, timings


def fail_job(store: JobStore, job_id: str, code: str) -> None:
    """End a job with a public error code from outside `process_job` (time limits, crashes)."""
    store.fail(job_id, code)
