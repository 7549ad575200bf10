"""The service's error vocabulary: one exception class per public error code.

Every error a client can see is a `ServiceError` subclass carrying an HTTP status, a stable
machine-readable `code` and a *public* message (never a path, a stack trace, a key or model
internals). The gateway turns them into `{"error": code, "message": ...}`; the worker stores the
code and message of a failed job in its job record. Codes are a contract: clients switch on them.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base class: an error with an HTTP status, a stable code and a public message."""

    status_code: int = 500
    code: str = "internal_error"
    message: str = "The server could not complete the request."
    retry_after: int | None = None

    def __init__(self, message: str | None = None, *, retry_after: int | None = None):
        super().__init__(message or self.message)
        if message:
            self.message = message
        if retry_after is not None:
            self.retry_after = retry_after

    def to_dict(self) -> dict[str, str]:
        """Return the JSON body clients receive."""
        return {"error": self.code, "message": self.message}


# --- 4xx: the client's request -------------------------------------------------------------
class MissingImage(ServiceError):
    status_code, code = 400, "missing_image"
    message = "Send the photo as multipart/form-data in a field named 'image'."


class BadRequest(ServiceError):
    status_code, code = 400, "bad_request"
    message = "The request is malformed."


class Unauthorized(ServiceError):
    status_code, code = 401, "unauthorized"
    message = "A valid API key is required in the 'X-API-Key' header."


class MetricsUnauthorized(Unauthorized):
    message = "GET /metrics needs the scraper's token in an 'Authorization: Bearer <token>' header."
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="metrics"'}


class Banned(ServiceError):
    status_code, code = 403, "banned"
    message = "Too many invalid uploads from this client; try again later."


class CrossOrigin(ServiceError):
    status_code, code = 403, "cross_origin"
    message = "Submissions from another site's page are not allowed; use this service's own page or an API client."


class JobNotFound(ServiceError):
    status_code, code = 404, "not_found"
    message = "No such job, or the token does not match."


class NotFound(ServiceError):
    status_code, code = 404, "not_found"
    message = "No such resource."


class MethodNotAllowed(ServiceError):
    status_code, code = 405, "method_not_allowed"
    message = "This method is not allowed on this resource."


class RequestTimeout(ServiceError):
    status_code, code = 408, "request_timeout"
    message = "The request body did not arrive in time; send it again at a steady pace."


class JobNotReady(ServiceError):
    status_code, code = 409, "not_ready"
    message = "The job has not finished yet; poll its status URL."


class ResultGone(ServiceError):
    status_code, code = 410, "result_gone"
    message = "The result was already fetched or has expired; results can be fetched once."


class PayloadTooLarge(ServiceError):
    status_code, code = 413, "payload_too_large"
    message = "The upload is larger than the allowed number of bytes."


class TooManyPixels(ServiceError):
    status_code, code = 413, "image_too_large"
    message = "The image has more pixels or a longer side than allowed."


class UnsupportedType(ServiceError):
    status_code, code = 415, "unsupported_type"
    message = "Only JPEG and PNG photos are accepted (.jpg, .jpeg, .png)."


class TypeMismatch(ServiceError):
    status_code, code = 415, "type_mismatch"
    message = "The file's content does not match its extension."


class DecodeTooLarge(ServiceError):
    status_code, code = 413, "decode_too_large"
    message = (
        "Decoding this image would need more memory than allowed (pixels x channels x bit depth); "
        "send a smaller image, or an 8-bit one without transparency."
    )


class UndecodableImage(ServiceError):
    status_code, code = 422, "undecodable_image"
    message = "The image is corrupt, truncated or cannot be decoded."


class RateLimited(ServiceError):
    status_code, code = 429, "rate_limited"
    message = "Too many requests; retry after the number of seconds in Retry-After."


class TooManyJobs(ServiceError):
    status_code, code = 429, "too_many_jobs"
    message = "This client already has the maximum number of jobs waiting or running; retry when one finishes."
    retry_after = 10


# --- 5xx: the service ---------------------------------------------------------------------
class QueueFull(ServiceError):
    status_code, code = 503, "queue_full"
    message = "The service is at capacity; retry after the number of seconds in Retry-After."
    retry_after = 30


class StoreUnavailable(ServiceError):
    status_code, code = 503, "unavailable"
    message = "The service is temporarily unavailable; retry shortly."
    retry_after = 5


# --- job failure codes (stored in the job record, shown by GET /v1/jobs/{id}) ---------------
JOB_ERRORS: dict[str, str] = {
    "undecodable_image": UndecodableImage.message,
    "image_too_large": TooManyPixels.message,
    "decode_too_large": DecodeTooLarge.message,
    "out_of_memory": "Processing this image needed more memory than a worker may use; send a smaller image.",
    "expired": "The job's input expired before a worker could process it.",
    "worker_lost": "The job's worker stopped unexpectedly too many times; the job was abandoned.",
    "timeout": "Processing took longer than the allowed time.",
    "internal_error": "The worker could not process this image.",
}


class DecryptionError(Exception):
    """A ciphertext failed authentication: tampered, wrong key, wrong job or direction.

    Internal only: never shown to clients with detail (they see not_found or internal_error).
    """


class ConfigError(RuntimeError):
    """The environment is missing a required setting or holds an invalid one."""
