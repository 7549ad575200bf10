"""One JSON shape for every error the gateway returns: `{"error": code, "message": sentence}`.

`ServiceError`s carry their own status, code and public message. Werkzeug's HTTP errors
(404, 405, 413, ...) are mapped onto the same vocabulary, Redis and broker failures become
503 `unavailable` with Retry-After, and anything unexpected becomes a bare 500: never a stack
trace, a path, a library version or an exception message in a response.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import flask
import redis
from flask_limiter import Limiter, RateLimitExceeded
from kombu.exceptions import KombuError
from limits.errors import StorageError
from werkzeug.exceptions import HTTPException

from api import abuse
from shared.errors import (
    BadRequest,
    JobNotReady,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    StoreUnavailable,
    Unauthorized,
)
from shared.logging import event

log = logging.getLogger(__name__)

HTTP_ERRORS: dict[int, type[ServiceError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    429: RateLimited,
}
GENERIC_CLIENT_ERROR = "The request cannot be served as sent."
UNAVAILABLE_ERRORS = (
    redis.exceptions.RedisError,
    StorageError,
    KombuError,
    ConnectionError,
    TimeoutError,
)


class NotReadyWithStatus(JobNotReady):
    """409 for a result asked before the job is done; the body also names the job's status."""

    def __init__(self, status: str):
        super().__init__()
        self.extra: dict[str, object] = {"status": status}


def error_response(exc: ServiceError) -> flask.Response:
    """The JSON response for a ServiceError, with Retry-After where it has one."""
    body: dict[str, object] = {**exc.to_dict(), **getattr(exc, "extra", {})}
    response = flask.jsonify(body)
    response.status_code = exc.status_code
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    response.headers.update(getattr(exc, "headers", {}))
    return response


def register_error_handlers(
    app: flask.Flask, limiter: Limiter, on_reject: Callable[[str], None]
) -> None:
    """Route every exception raised while handling a request to a JSON response.

    `on_reject(code)` counts each refusal (api.metrics); `limiter` says when a limit lets in again.
    """
    app.register_error_handler(ServiceError, functools.partial(service_error, on_reject))
    app.register_error_handler(
        RateLimitExceeded, functools.partial(rate_limited, limiter, on_reject)
    )
    app.register_error_handler(HTTPException, functools.partial(http_error, on_reject))
    for exc_class in UNAVAILABLE_ERRORS:
        app.register_error_handler(exc_class, functools.partial(unavailable, on_reject))
    app.register_error_handler(Exception, functools.partial(unexpected, on_reject))


def service_error(on_reject: Callable[[str], None], exc: ServiceError) -> flask.Response:
    """A public error raised by the gateway's own code."""
    on_reject(exc.code)
    if exc.status_code >= 500:
        event(log, "request_refused", logging.WARNING, code=exc.code, status=exc.status_code)
    return error_response(exc)


def rate_limited(
    limiter: Limiter, on_reject: Callable[[str], None], _exc: RateLimitExceeded
) -> flask.Response:
    """429 `rate_limited` with Retry-After from the breached limit."""
    seconds = abuse.retry_after(limiter)
    event(
        log,
        "rate_limited",
        logging.WARNING,
        seconds=seconds,
        client=abuse.client_tag(abuse.client_key()),
        endpoint=flask.request.endpoint,
    )
    on_reject(RateLimited.code)
    return error_response(RateLimited(retry_after=seconds))


def http_error(on_reject: Callable[[str], None], exc: HTTPException) -> flask.Response:
    """Werkzeug's HTTP errors (404, 405, 413, ...) as our JSON errors."""
    status = exc.code or 500
    known = HTTP_ERRORS.get(status)
    error = known() if known else ServiceError(GENERIC_CLIENT_ERROR if status < 500 else None)
    if not known:
        error.status_code = status
        error.code = "bad_request" if status < 500 else "internal_error"
    on_reject(error.code)
    response = error_response(error)
    valid_methods = getattr(exc, "valid_methods", None)  # MethodNotAllowed's
    if status == 405 and valid_methods:
        response.headers["Allow"] = ", ".join(valid_methods)
    return response


def unavailable(on_reject: Callable[[str], None], exc: Exception) -> flask.Response:
    """Redis or the broker unreachable: 503 `unavailable`."""
    event(log, "store_unavailable", logging.ERROR, exc_type=type(exc).__name__)
    on_reject(StoreUnavailable.code)
    return error_response(StoreUnavailable())


def unexpected(on_reject: Callable[[str], None], exc: Exception) -> flask.Response:
    """Anything else: a bare 500, logged by exception type only."""
    # The type only: an exception's message may hold a path or data (shared.logging).
    event(log, "unhandled_error", logging.ERROR, exc_type=type(exc).__name__)
    on_reject(ServiceError.code)
    return error_response(ServiceError())
