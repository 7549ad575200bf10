"""A job's life on the gateway's side: creating it and handing its result out once.

- `create_job`: a fresh job id, bearer token and data key; the upload sealed under the data key
  (AES-256-GCM, the job id, direction and the token-derived result public key as associated
  data; the public key is stored with the job, the token only as a hash), the data key wrapped by the
  keyring; record and sealed input stored in Redis with TTLs (`shared.jobstore`); the job
  counted against the client's jobs in flight; the parse task sent by name (`shared.queue`),
  with the job id as its only argument. A job that cannot be enqueued is withdrawn at once.
- `deliver_result`: the one-time fetch. Peek at the sealed result, unwrap the data key, open it
  with the caller's bearer token (the result is sealed to a key derived from it, `shared.crypto`),
  render (JSON as stored, or a palette PNG: `api.palette`), and only then take the result out
  of Redis atomically: a server-side failure before the take leaves it fetchable, and of
  concurrent fetches exactly one gets it.

The views in `api.routes` authorise the caller first; nothing here reads the request.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import redis
from kombu.exceptions import KombuError

from api import abuse
from api.errors import NotReadyWithStatus
from api.palette import palette_png
from shared.crypto import (
    Keyring,
    encrypt_payload,
    hash_secret,
    new_data_key,
    new_job_id,
    new_token,
    open_result,
    result_public_key,
)
from shared.errors import (
    DecryptionError,
    JobNotFound,
    ResultGone,
    ServiceError,
    StoreUnavailable,
    TooManyJobs,
)
from shared.jobstore import Fetch
from shared.logging import event
from shared.queue import enqueue_parse

if TYPE_CHECKING:
    from api.routes import Gateway

log = logging.getLogger(__name__)

RESULT_MIMETYPES = {"json": "application/json", "palette": "image/png"}


def create_job(gw: Gateway, data: bytes, client: str) -> tuple[str, str]:
    """Seal `data` under a fresh data key, record the job, admit it for `client`, enqueue it.

    Returns (job id, bearer token). TooManyJobs (429) or StoreUnavailable (503) leave no job.
    """
    job_id, token, data_key = new_job_id(), new_token(), new_data_key()
    key_id, wrapped_key = gw.settings.keyring.wrap(job_id, data_key)
    result_key = result_public_key(token, job_id)
    gw.store.create(
        job_id,
        token_hash=hash_secret(token),
        key_id=key_id,
        wrapped_key=wrapped_key,
        sealed_input=encrypt_payload(data_key, job_id, "in", data, bound=result_key),
        result_key=result_key,
    )
    try:
        abuse.admit_for_client(gw.store, gw.settings, client, job_id)
        enqueue_parse(gw.celery, job_id)
    except TooManyJobs:
        gw.store.delete(job_id)
        raise
    except (KombuError, redis.RedisError, OSError) as exc:
        # A job nobody will ever run must not linger: withdraw it, then report 503.
        with contextlib.suppress(redis.RedisError):
            gw.store.delete(job_id)
        event(log, "enqueue_failed", logging.ERROR, exc_type=type(exc).__name__)
        raise StoreUnavailable() from exc
    return job_id, token


def deliver_result(gw: Gateway, job_id: str, token: str, result_format: str) -> bytes:
    """The job's result in `result_format` (a RESULT_MIMETYPES key), exactly once.

    `token` is the bearer token the view checked: the result opens only with it.

    Raises NotReadyWithStatus while the job runs, ResultGone once it was served or expired,
    JobNotFound when the record is gone, ServiceError (500) when it cannot be opened.
    """
    fetch = gw.store.peek_result(job_id)
    _check_fetchable(fetch)
    # Decrypt and render first: a failure here leaves the result in Redis for the next fetch.
    result = open_job_result(gw.settings.keyring, job_id, token, fetch)
    body = palette_png(result) if result_format == "palette" else result
    if not gw.store.take_result(job_id, fetch.sealed_result):
        raise ResultGone()  # a concurrent fetch served it: exactly one response carries it
    event(log, "result_fetched", format=result_format, bytes=len(result))
    return body


def _check_fetchable(fetch: Fetch) -> None:
    """Raise the public error for a peek that found no result to serve."""
    if fetch.outcome == "not_ready":
        if fetch.status == "expired":
            raise ResultGone()
        raise NotReadyWithStatus(fetch.status)
    if fetch.outcome == "fetched":
        raise ResultGone()
    if fetch.outcome != "ok":
        raise JobNotFound()


def open_job_result(keyring: Keyring, job_id: str, token: str, fetch: Fetch) -> bytes:
    """Unwrap the job's data key and open its sealed result with the caller's token.

    A result that does not open (a record tampered with in Redis: another token hash, another
    result key) is a 500 and stays where it is; nothing of it reaches the caller.
    """
    try:
        if not fetch.key_id or not fetch.wrapped_key:
            raise DecryptionError("the job record has no data key")
        data_key = keyring.unwrap(job_id, fetch.key_id, fetch.wrapped_key)
        return open_result(token, data_key, job_id, fetch.sealed_result)
    except DecryptionError as exc:
        event(log, "result_undecryptable", logging.ERROR)
        raise ServiceError() from exc
