"""The client's exceptions: one class per family of the service's stable error codes.

Every exception is an `M2FPError` carrying the server's `code` (e.g. "undecodable_image"), its
human `message` and the HTTP `status` (None when no response came back). Catch a family
(`InvalidImage`, `RateLimited`, ...) or switch on `.code`.
"""

from __future__ import annotations


class M2FPError(Exception):
    """An error reported by the service, or met while talking to it."""

    def __init__(
        self, code: str, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after


class BadRequest(M2FPError):
    """400: the request was malformed (e.g. `missing_image`)."""


class Unauthorized(M2FPError):
    """401: the server wants a valid API key (header X-API-Key)."""


class Banned(M2FPError):
    """403: this client sent too many invalid uploads and is banned for a while."""


class NotFound(M2FPError):
    """404: no such job, or the token does not match (the server does not say which)."""


class NotReady(M2FPError):
    """409: the job has not finished yet."""


class ResultGone(M2FPError):
    """410: the result was already fetched once, or expired; results are fetched exactly once."""


class InvalidImage(M2FPError):
    """413/415/422: the photo was refused (too large, wrong type, or undecodable)."""


class RateLimited(M2FPError):
    """429: too many requests; `retry_after` says how many seconds to wait."""


class ServerUnavailable(M2FPError):
    """503 or another 5xx: the service is full, starting or unavailable; retry later."""


class ConnectionFailed(M2FPError):
    """The server could not be reached (after the client's bounded retries)."""


class ProtocolError(M2FPError):
    """The server answered something the client does not understand (not the v1 contract)."""


class JobFailed(M2FPError):
    """The job ended `failed` (or `expired`); `code` is the job's error code."""


class JobExpired(JobFailed):
    """The job expired before it was processed or before its result was fetched."""


class WaitTimeout(M2FPError):
    """The job did not finish within the client's `timeout`."""


CODE_CLASSES: dict[str, type[M2FPError]] = {
    "missing_image": BadRequest,
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "banned": Banned,
    "not_found": NotFound,
    "not_ready": NotReady,
    "result_gone": ResultGone,
    "payload_too_large": InvalidImage,
    "image_too_large": InvalidImage,
    "unsupported_type": InvalidImage,
    "type_mismatch": InvalidImage,
    "undecodable_image": InvalidImage,
    "rate_limited": RateLimited,
    "queue_full": ServerUnavailable,
    "unavailable": ServerUnavailable,
}

STATUS_CLASSES: dict[int, type[M2FPError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Banned,
    404: NotFound,
    409: NotReady,
    410: ResultGone,
    413: InvalidImage,
    415: InvalidImage,
    422: InvalidImage,
    429: RateLimited,
    503: ServerUnavailable,
}


def error_for(
    code: str, message: str, status: int | None, retry_after: float | None = None
) -> M2FPError:
    """The exception instance for an error code (falling back on the HTTP status)."""
    cls = CODE_CLASSES.get(code) or STATUS_CLASSES.get(status or 0)
    if cls is None:
        cls = ServerUnavailable if status is not None and status >= 500 else M2FPError
    return cls(code, message, status, retry_after)
