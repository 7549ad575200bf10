"""`Client`: submit a photo, poll its job, fetch the parsing once, with bounded, polite retries.

Retries: 429 and 503 are retried after the server's `Retry-After` (when it is at most
`max_retry_wait` seconds), connection failures after an exponential backoff; both at most
`max_retries` times. A request that may have reached the server and is not idempotent (the
submit, and the result fetch, which deletes the result) is retried only when the connection
was never established, so a retry can neither duplicate a job nor lose a result.
"""

from __future__ import annotations

import email.utils
import io
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, overload
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import NewConnectionError

from m2fp_client.errors import (
    ConnectionFailed,
    JobExpired,
    JobFailed,
    M2FPError,
    NotFound,
    ProtocolError,
    WaitTimeout,
    error_for,
)
from m2fp_client.results import Job, JobStatus, ParsingResult

__version__ = "0.1.0"
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
ImageSource = str | Path | bytes | bytearray | BinaryIO


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def connection_not_established(exc: Exception) -> bool:
    """True when the request certainly never reached the server (refused, DNS, connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while (
        stack
    ):  # walk args / reason / __cause__ / __context__ looking for urllib3's NewConnectionError
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, NewConnectionError):
            return True
        if isinstance(item, BaseException):
            stack.extend(
                [getattr(item, "reason", None), item.__cause__, item.__context__, *item.args]
            )
    return False


def _read_image(image: ImageSource, filename: str | None) -> tuple[bytes, str]:
    """The upload's bytes and file name from a path, bytes or a binary file object."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.read_bytes(), filename or path.name
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, io.IOBase) or hasattr(image, "read"):
        data = image.read()
        filename = filename or Path(getattr(image, "name", "") or "").name or None
    else:
        raise TypeError(f"image must be a path, bytes or a binary file, got {type(image).__name__}")
    if filename is None:
        filename = "image.png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image.jpg"
    return data, filename


class Client:
    """A client of one m2fp-serve server (thread-compatible: use one per thread)."""

    def __init__(
        self,
        server_url: str,
        api_key: str | None = None,
        timeout: float = 30,
        *,
        max_retries: int = 5,
        max_retry_wait: float = 120.0,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urlsplit(server_url).scheme or not urlsplit(server_url).netloc:
            raise ValueError(f"server_url must be an absolute http(s) URL, got {server_url!r}")
        self.server_url = server_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", f"m2fp-client/{__version__}")
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"Client({self.server_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HTTP session."""
        self.session.close()

    # --- the v1 API ------------------------------------------------------------------------
    def submit(self, image: ImageSource, filename: str | None = None) -> Job:
        """Upload a JPEG/PNG (path, bytes or binary file); returns the queued Job."""
        data, name = _read_image(image, filename)
        content_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
        response = self._request(
            "POST",
            self._url("/v1/jobs"),
            idempotent=False,
            files={"image": (name, data, content_type)},
        )
        body = self._json(response)
        try:
            job_id, token = str(body["job_id"]), str(body["token"])
        except KeyError as exc:
            raise ProtocolError(
                "bad_response", f"submit response lacks {exc}", response.status_code
            ) from exc
        return Job(
            job_id=job_id,
            token=token,
            status_url=self._same_origin(body.get("status_url"), f"/v1/jobs/{job_id}"),
            result_url=self._same_origin(body.get("result_url"), f"/v1/jobs/{job_id}/result"),
            expires_in=body.get("expires_in"),
        )

    def job(self, job_id: str, token: str) -> Job:
        """A Job handle from a job id and token kept elsewhere."""
        return Job(
            job_id, token, self._url(f"/v1/jobs/{job_id}"), self._url(f"/v1/jobs/{job_id}/result")
        )

    def status(self, job: Job) -> JobStatus:
        """The job's current status (queued, running, done, failed or expired)."""
        response = self._request("GET", job.status_url, idempotent=True, headers=self._bearer(job))
        return JobStatus.from_json(self._json(response))

    @overload
    def result(self, job: Job, format: Literal["json"] = "json") -> ParsingResult: ...
    @overload
    def result(self, job: Job, format: str) -> ParsingResult | bytes: ...
    def result(self, job: Job, format: str = "json") -> ParsingResult | bytes:
        """Fetch the result, which the server then deletes: a second call raises ResultGone.

        `format="json"` gives a ParsingResult; any other format (e.g. "palette") the raw bytes.
        """
        params = None if format == "json" else {"format": format}
        response = self._request(
            "GET", job.result_url, idempotent=False, headers=self._bearer(job), params=params
        )
        if format != "json":
            return response.content
        return ParsingResult.from_json(self._json(response))

    def delete(self, job: Job, missing_ok: bool = True) -> None:
        """Withdraw the job: its input, result and record are deleted on the server."""
        try:
            self._request("DELETE", job.status_url, idempotent=True, headers=self._bearer(job))
        except NotFound:
            if not missing_ok:
                raise

    def wait(
        self, job: Job, poll_interval: float = 0.5, timeout: float = 300, max_interval: float = 5.0
    ) -> JobStatus:
        """Poll until the job is done (returned) or failed/expired (JobFailed/JobExpired raised)."""
        deadline = self._clock() + timeout
        interval = poll_interval
        while True:
            status = self.status(job)
            if status.status == "done":
                return status
            if status.status in ("failed", "expired"):
                raise self._job_error(status)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WaitTimeout(
                    "wait_timeout",
                    f"job not finished after {timeout:g} s (last status: {status.status})",
                )
            self._sleep(min(interval, remaining))
            interval = min(max_interval, interval * 1.5)

    @overload
    def parse(
        self,
        path: ImageSource,
        wait: Literal[True] = True,
        poll_interval: float = 0.5,
        timeout: float = 300,
    ) -> ParsingResult: ...
    @overload
    def parse(
        self, path: ImageSource, wait: bool, poll_interval: float = 0.5, timeout: float = 300
    ) -> ParsingResult | Job: ...
    def parse(
        self, path: ImageSource, wait: bool = True, poll_interval: float = 0.5, timeout: float = 300
    ) -> ParsingResult | Job:
        """Submit, wait and fetch in one call; with `wait=False`, only submit and return the Job."""
        job = self.submit(path)
        if not wait:
            return job
        try:
            self.wait(job, poll_interval=poll_interval, timeout=timeout)
        except (WaitTimeout, KeyboardInterrupt):
            self._withdraw_quietly(job)
            raise
        return self.result(job)

    def ready(self) -> dict[str, Any]:
        """GET /readyz as a dict (a 503 "not ready" answer is returned, not raised)."""
        response = self._request(
            "GET", self._url("/readyz"), idempotent=True, retry_statuses=(), allow_statuses=(503,)
        )
        return self._json(response)

    def health(self) -> bool:
        """True when GET /healthz answers 200."""
        self._request("GET", self._url("/healthz"), idempotent=True, retry_statuses=())
        return True

    # --- plumbing --------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"{self.server_url}{path}"

    def _same_origin(self, url: str | None, fallback_path: str) -> str:
        """An absolute URL on our server; a URL pointing elsewhere is ignored (the token must not leak)."""
        if not url:
            return self._url(fallback_path)
        absolute = urljoin(self.server_url + "/", url)
        ours, theirs = urlsplit(self.server_url), urlsplit(absolute)
        if (ours.scheme, ours.netloc) != (theirs.scheme, theirs.netloc):
            return self._url(fallback_path)
        return absolute

    def _bearer(self, job: Job) -> dict[str, str]:
        return {"Authorization": f"Bearer {job.token}"}

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        headers.update(extra or {})
        return headers

    def _backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: in [d/2, d], d = min(max_backoff, backoff * 2**attempt)."""
        ceiling = min(self.max_backoff, self.backoff * (2**attempt))
        return ceiling * random.uniform(0.5, 1.0)

    def _request(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool,
        headers: dict[str, str] | None = None,
        retry_statuses: tuple[int, ...] = (429, 503),
        allow_statuses: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> requests.Response:
        """One API call with the retry policy of the module docstring; raises M2FPError on errors."""
        attempt = 0
        while True:
            try:
                response = self.session.request(
                    method, url, headers=self._headers(headers), timeout=self.timeout, **kwargs
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                retryable = idempotent or connection_not_established(exc)
                if not retryable or attempt >= self.max_retries:
                    raise ConnectionFailed("connection_error", self._describe(exc)) from exc
                self._sleep(self._backoff_delay(attempt))
                attempt += 1
                continue
            if response.status_code < 400 or response.status_code in allow_statuses:
                return response
            error = self._error(response)
            if response.status_code in retry_statuses and attempt < self.max_retries:
                delay = (
                    error.retry_after
                    if error.retry_after is not None
                    else self._backoff_delay(attempt)
                )
                if delay <= self.max_retry_wait:
                    self._sleep(delay)
                    attempt += 1
                    continue
            raise error

    def _describe(self, exc: Exception) -> str:
        kind = (
            "timed out talking to" if isinstance(exc, requests.Timeout) else "could not connect to"
        )
        return f"{kind} {self.server_url} (gave up after {self.max_retries} retries)"

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise ProtocolError(
                "bad_response",
                f"expected JSON, got {response.headers.get('Content-Type')}",
                response.status_code,
            ) from exc
        if not isinstance(body, dict):
            raise ProtocolError("bad_response", "expected a JSON object", response.status_code)
        return body

    @staticmethod
    def _error(response: requests.Response) -> M2FPError:
        """The exception for an error response, from its {"error", "message"} body."""
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            code, message = body["error"], str(body.get("message") or body["error"])
        else:
            code, message = f"http_{response.status_code}", response.reason or "HTTP error"
        return error_for(code, message, response.status_code, retry_after)

    @staticmethod
    def _job_error(status: JobStatus) -> JobFailed:
        code = status.error_code or status.status
        message = status.error_message or f"the job ended {status.status}"
        cls = JobExpired if status.status == "expired" else JobFailed
        return cls(code, message, None)

    def _withdraw_quietly(self, job: Job) -> None:
        try:
            self.delete(job)
        except M2FPError:
            pass
