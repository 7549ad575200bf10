"""The HTTP API's views (DESIGN §2): submit, status, one-time result, withdraw, health and spec.

Each view is thin: abuse checks and validation live in `api.abuse` / `api.validation`, job
creation and the one-time delivery (cryptography, Redis) in `api.jobs`, job state in
`shared.jobstore`, heartbeats in `shared.heartbeat`. An unknown job id, a malformed one and a
wrong or missing token all give the same 404 body, after the same work (the token is hashed and
compared against a dummy digest when the id is unknown), so ids cannot be enumerated.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass

import flask
import redis
from celery import Celery
from flask_limiter import Limiter
from werkzeug.exceptions import MethodNotAllowed

from api import abuse
from api.jobs import RESULT_MIMETYPES, create_job, deliver_result
from api.metrics import Metrics
from api.openapi import openapi_document
from api.validation import Upload, validate_upload
from shared import heartbeat as heartbeats
from shared.config import Settings
from shared.constants import JOB_ID_RE, UNTRAINED_WARNING
from shared.crypto import hash_secret, secret_matches
from shared.errors import JOB_ERRORS, BadRequest, JobNotFound, RequestTimeout, ServiceError
from shared.jobstore import JobStore
from shared.logging import bind, event

log = logging.getLogger(__name__)

TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
DUMMY_TOKEN_HASH = hash_secret("m2fp: no such job")
READY_RETRY_AFTER = 10
MAX_WORKER_KEYS = 1000

bp = flask.Blueprint("api", __name__)


@dataclass(frozen=True)
class Gateway:
    """What the views need, built once per app by `api.create_app`."""

    settings: Settings
    redis: redis.Redis
    store: JobStore
    celery: Celery
    limiter: Limiter
    metrics: Metrics


def gateway() -> Gateway:
    """The current app's Gateway."""
    return flask.current_app.extensions["m2fp"]


# --- submit ------------------------------------------------------------------------------
@bp.post("/v1/jobs")
def submit_job() -> flask.Response:
    """Meter, validate, rate-limit, admit, encrypt, store and enqueue one photo.

    Order (cheapest first): ban, attempt limit (before the body is read), validation (a
    failure is a strike), submit limit, queue room, then the job is created and counted
    against the client's jobs in flight; only an admitted job clears the client's strikes.
    """
    gw, started = gateway(), time.perf_counter()
    client = abuse.client_key()
    abuse.refuse_banned(gw.redis, gw.settings, client)
    abuse.enforce_attempt_limit(gw.limiter, gw.settings)
    upload = validated_upload(gw, client)
    abuse.enforce_submit_limit(gw.limiter, gw.settings)
    abuse.admit(gw.store, gw.settings)
    job_id, token = create_job(gw, upload.data, client)
    abuse.clear_strikes(gw.redis, gw.settings, client)
    gw.metrics.jobs_submitted.inc()
    bind(job_id=job_id)
    event(
        log,
        "job_submitted",
        bytes=len(upload.data),
        width=upload.width,
        height=upload.height,
        seconds=round(time.perf_counter() - started, 4),
    )
    return accepted(job_id, token, gw.settings.job_ttl)


def validated_upload(gw: Gateway, client: str) -> Upload:
    """The request's upload, validated; a refusal is logged and (unless slow) a strike."""
    try:
        return validate_upload(flask.request, gw.settings)
    except ServiceError as exc:
        event(
            log,
            "upload_rejected",
            code=exc.code,
            status=exc.status_code,
            client=abuse.client_tag(client),
        )
        if exc.status_code != RequestTimeout.status_code:
            abuse.record_strike(gw.redis, gw.settings, client, exc.code)
        raise


def accepted(job_id: str, token: str, expires_in: int) -> flask.Response:
    """202 with the job's id, token and URLs; Location is the status URL."""
    status_url = flask.url_for("api.job_status", job_id=job_id)
    response = flask.jsonify(
        job_id=job_id,
        token=token,
        status_url=status_url,
        result_url=flask.url_for("api.job_result", job_id=job_id),
        expires_in=expires_in,
    )
    response.status_code = 202
    response.headers["Location"] = status_url
    return response


# --- one job -----------------------------------------------------------------------------
def bearer_token() -> str:
    """The token of `Authorization: Bearer <token>`, or '' when absent or malformed."""
    scheme, _, token = flask.request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and TOKEN_RE.fullmatch(token) else ""


def authorized_record(gw: Gateway, job_id: str) -> dict[str, str]:
    """The job's record if the id is well-formed, known and the bearer token matches; else 404."""
    token = bearer_token()
    record = gw.store.status(job_id) if JOB_ID_RE.fullmatch(job_id) else None
    expected = (record or {}).get("token_hash") or ""
    matches = secret_matches(token, expected or DUMMY_TOKEN_HASH)
    if not (record and expected and token and matches):
        raise JobNotFound()
    bind(job_id=job_id)
    return record


def status_body(job_id: str, record: dict[str, str]) -> dict[str, object]:
    """`{"job_id", "status"}`, plus `"error": {"code", "message"}` for failed and expired jobs."""
    status = record.get("status") or "expired"
    body: dict[str, object] = {"job_id": job_id, "status": status}
    if status in ("failed", "expired"):
        code = record.get("error_code") or ("expired" if status == "expired" else "internal_error")
        code = code if code in JOB_ERRORS else "internal_error"
        body["error"] = {"code": code, "message": JOB_ERRORS[code]}
    return body


@bp.get("/v1/jobs/<job_id>")
def job_status(job_id: str) -> flask.Response:
    """The job's status (and public error for failed/expired jobs)."""
    gw = gateway()
    abuse.enforce_poll_limit(gw.limiter, gw.settings)
    record = authorized_record(gw, job_id)
    return flask.jsonify(status_body(job_id, record))


@bp.get("/v1/jobs/<job_id>/result")
def job_result(job_id: str) -> flask.Response:
    """The result, exactly once: served, then deleted atomically; later fetches get 410.

    A server-side failure (decryption, rendering) before the delete leaves it fetchable.
    """
    if flask.request.method == "HEAD":
        # Werkzeug adds HEAD to every GET rule; a HEAD must not consume the one-time result.
        raise MethodNotAllowed(valid_methods=["GET"])
    gw = gateway()
    abuse.enforce_poll_limit(gw.limiter, gw.settings)
    result_format = flask.request.args.get("format", "json")
    if result_format not in RESULT_MIMETYPES:
        raise BadRequest("Unknown result format; use format=json or format=palette.")
    authorized_record(gw, job_id)
    body = deliver_result(gw, job_id, bearer_token(), result_format)
    return flask.Response(body, mimetype=RESULT_MIMETYPES[result_format])


@bp.delete("/v1/jobs/<job_id>")
def delete_job(job_id: str) -> flask.Response:
    """Withdraw a job at any stage: its input, result and record are deleted now."""
    gw = gateway()
    abuse.enforce_poll_limit(gw.limiter, gw.settings)
    authorized_record(gw, job_id)
    gw.store.delete(job_id)
    event(log, "job_deleted")
    return flask.Response(status=204)


# --- service -----------------------------------------------------------------------------
@bp.get("/healthz")
def healthz() -> flask.Response:
    """Liveness: the process answers."""
    return flask.jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> flask.Response:
    """Readiness: Redis answers and at least one worker's heartbeat is alive (read through the
    heartbeat index, never a SCAN of the keyspace: cheap under load)."""
    gw = gateway()
    try:
        gw.redis.ping()
        workers = heartbeats.live(gw.redis, MAX_WORKER_KEYS)
    except redis.RedisError as exc:
        event(log, "readyz_redis_unreachable", logging.WARNING, exc_type=type(exc).__name__)
        return not_ready("unavailable", "Redis is unreachable.")
    if not workers:
        return not_ready("no_workers", "No worker is alive: jobs would wait in the queue.")
    untrained = any(worker.untrained for worker in workers)
    batching = [worker for worker in workers if worker.batch > 1]
    return flask.jsonify(
        status="ready",
        workers=len(workers),
        untrained=untrained,
        warnings=[UNTRAINED_WARNING] if untrained else [],
        # How many live workers run each precision (fp32, bf16x3, bf16, int8: M2FP_PRECISION).
        precisions=dict(Counter(worker.precision or "unknown" for worker in workers)),
        # Workers in batching mode (worker/batching.py) and the most jobs one forward takes.
        batching={
            "workers": len(batching),
            "max_batch": max((worker.batch for worker in batching), default=1),
        },
    )


def not_ready(status: str, warning: str) -> flask.Response:
    """503 from /readyz with Retry-After."""
    response = flask.jsonify(status=status, workers=0, untrained=False, warnings=[warning])
    response.status_code = 503
    response.headers["Retry-After"] = str(READY_RETRY_AFTER)
    return response


@bp.get("/openapi.json")
def openapi() -> flask.Response:
    """The OpenAPI 3.1 description of this API."""
    return flask.jsonify(openapi_document())
