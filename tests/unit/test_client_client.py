"""m2fp_client.client against the scripted HTTP double (`server` in tests/unit/conftest.py):
Retry-After and backoff, which calls a dropped connection may retry, the headers sent, job URLs
pinned to the server's origin, wait/parse with a fake clock, result formats and /readyz.

The real API is exercised by tests/integration/test_client_e2e.py against the live stack.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import numpy as np
import pytest

from m2fp_client import (
    Client,
    ConnectionFailed,
    Job,
    JobExpired,
    JobFailed,
    NotReady,
    RateLimited,
    ResultGone,
    ServerUnavailable,
    WaitTimeout,
)
from m2fp_client.client import connection_not_established, parse_retry_after
from m2fp_client.results import palette_png
from tests.conftest import free_port
from tests.unit.client_doubles import JOB, make_client, result_document


def test_parse_retry_after_seconds_dates_and_garbage():
    assert parse_retry_after("7") == 7
    assert parse_retry_after(" 0 ") == 0
    assert parse_retry_after("-3") == 0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(later) <= 30


def test_429_is_retried_after_retry_after(server, sleeps):
    server.responses = [
        (429, {"Retry-After": "3"}, {"error": "rate_limited", "message": "slow down"}),
        (202, {}, JOB),
    ]
    job = make_client(server.url, sleeps).submit(b"\xff\xd8\xff fake jpeg", filename="a.jpg")
    assert sleeps == [3.0]
    assert len(server.requests) == 2 and job.job_id == JOB["job_id"]
    assert job.status_url == server.url + JOB["status_url"]


def test_503_queue_full_is_retried_then_raised_when_retries_run_out(server, sleeps):
    busy = (503, {"Retry-After": "2"}, {"error": "queue_full", "message": "full"})
    server.responses = [busy] * 3
    with pytest.raises(ServerUnavailable) as info:
        make_client(server.url, sleeps, max_retries=2).submit(b"\x89PNG\r\n\x1a\nxx")
    assert (
        info.value.code == "queue_full" and info.value.status == 503 and info.value.retry_after == 2
    )
    assert sleeps == [2.0, 2.0] and len(server.requests) == 3


def test_retry_after_beyond_the_cap_is_raised_at_once(server, sleeps):
    server.responses = [
        (429, {"Retry-After": "3600"}, {"error": "rate_limited", "message": "later"})
    ]
    with pytest.raises(RateLimited) as info:
        make_client(server.url, sleeps, max_retry_wait=60).submit(b"x", filename="a.jpg")
    assert sleeps == [] and info.value.retry_after == 3600


def test_503_without_retry_after_backs_off_exponentially(server, sleeps):
    busy = (503, {}, {"error": "unavailable", "message": "x"})
    server.responses = [busy] * 3 + [(200, {}, {"job_id": "j", "status": "queued"})]
    client = make_client(server.url, sleeps, backoff=1.0, max_backoff=8.0)
    assert client.status(client.job("j", "t" * 20)).status == "queued"
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        assert 0.5 * 2**attempt <= delay <= 2**attempt


def test_connection_refused_is_retried_with_backoff_then_raised(sleeps):
    client = make_client(
        f"http://127.0.0.1:{free_port()}", sleeps, max_retries=3, backoff=0.5, max_backoff=1.0
    )
    with pytest.raises(ConnectionFailed) as info:
        client.submit(b"x", filename="a.jpg")  # never reached the server: safe to retry a POST
    assert info.value.code == "connection_error" and info.value.status is None
    assert len(sleeps) == 3
    assert all(0.25 <= s <= 1.0 for s in sleeps) and sleeps[2] >= 0.5


def test_dropped_connection_retries_idempotent_calls_only(server, sleeps):
    server.responses = ["drop", (200, {}, {"job_id": "j", "status": "running"})]
    client = make_client(server.url, sleeps)
    assert client.status(client.job("j", "t" * 20)).status == "running"
    assert len(server.requests) == 2

    server.requests.clear()
    server.responses = ["drop", (202, {}, JOB)]
    with pytest.raises(ConnectionFailed):
        client.submit(b"x", filename="a.jpg")  # may have reached the server: no duplicate job
    assert len(server.requests) == 1

    server.requests.clear()
    server.responses = ["drop", (200, {}, result_document())]
    with pytest.raises(ConnectionFailed):
        client.result(client.job("j", "t" * 20))  # the fetch may have consumed the one-time result
    assert len(server.requests) == 1


def test_connection_not_established_recognises_refusals_only():
    import requests

    with pytest.raises(requests.ConnectionError) as info:
        requests.get(f"http://127.0.0.1:{free_port()}/", timeout=2)
    assert connection_not_established(info.value)
    assert not connection_not_established(requests.ConnectionError("Connection aborted."))
    assert connection_not_established(requests.ConnectTimeout())
    assert not connection_not_established(requests.ReadTimeout())


def test_api_key_and_bearer_headers_are_sent(server, sleeps):
    server.responses = [(200, {}, {"job_id": "j", "status": "done"})]
    client = make_client(server.url, sleeps, api_key="k" * 32)
    client.status(client.job("j", "secret-token-123456"))
    headers = server.requests[0][2]
    assert headers["X-API-Key"] == "k" * 32
    assert headers["Authorization"] == "Bearer secret-token-123456"


def test_job_urls_on_another_origin_are_not_trusted(server, sleeps):
    evil = dict(JOB, status_url="https://evil.example/steal", result_url="//evil.example/r")
    server.responses = [(202, {}, evil)]
    job = make_client(server.url, sleeps).submit(b"x", filename="a.jpg")
    assert job.status_url == f"{server.url}/v1/jobs/{JOB['job_id']}"
    assert job.result_url == f"{server.url}/v1/jobs/{JOB['job_id']}/result"
    assert "T" * 43 not in repr(job)  # the bearer token never shows in reprs or logs


def test_wait_polls_until_done_and_raises_job_errors(server, sleeps):
    client = make_client(server.url, sleeps)
    job = client.job("j", "t" * 20)
    server.responses = [
        (200, {}, {"job_id": "j", "status": s}) for s in ("queued", "running", "done")
    ]
    assert client.wait(job, poll_interval=0.2).status == "done"
    assert sleeps == pytest.approx([0.2, 0.3])

    server.responses = [
        (
            200,
            {},
            {
                "job_id": "j",
                "status": "failed",
                "error": {"code": "undecodable_image", "message": "corrupt"},
            },
        )
    ]
    with pytest.raises(JobFailed) as info:
        client.wait(job)
    assert info.value.code == "undecodable_image" and info.value.message == "corrupt"

    server.responses = [
        (
            200,
            {},
            {"job_id": "j", "status": "expired", "error": {"code": "expired", "message": "gone"}},
        )
    ]
    with pytest.raises(JobExpired):
        client.wait(job)


def test_wait_times_out_with_a_fake_clock(server):
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    client = Client(server.url, sleep=sleep, clock=lambda: now[0])
    server.responses = [(200, {}, {"job_id": "j", "status": "queued"})] * 50
    with pytest.raises(WaitTimeout):
        client.wait(client.job("j", "t" * 20), poll_interval=1, timeout=10)
    assert 10 <= now[0] <= 11


def test_parse_withdraws_a_job_that_timed_out(server):
    now = [0.0]
    client = Client(
        server.url, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0]
    )
    server.responses = (
        [(202, {}, JOB)] + [(200, {}, {"job_id": "j", "status": "queued"})] * 5 + [(204, {}, b"")]
    )
    with pytest.raises(WaitTimeout):
        client.parse(b"\xff\xd8\xffx", timeout=2)
    assert server.requests[-1][0] == "DELETE"


def test_result_gone_and_not_ready(server, sleeps):
    client = make_client(server.url, sleeps)
    job = Job("j", "t" * 20, server.url + "/s", server.url + "/r")
    server.responses = [(410, {}, {"error": "result_gone", "message": "once"})]
    with pytest.raises(ResultGone):
        client.result(job)
    server.responses = [(409, {}, {"error": "not_ready", "message": "wait", "status": "running"})]
    with pytest.raises(NotReady):
        client.result(job)


def test_result_palette_format_returns_bytes(server, sleeps):
    png = palette_png(np.zeros((2, 3), np.uint8))
    server.responses = [(200, {}, png)]
    client = make_client(server.url, sleeps)
    assert (
        client.result(Job("j", "t" * 20, server.url + "/s", server.url + "/r"), format="palette")
        == png
    )
    assert server.requests[0][1] == "/r?format=palette"


def test_ready_returns_the_body_even_when_not_ready(server, sleeps):
    server.responses = [
        (503, {"Retry-After": "10"}, {"status": "no_workers", "workers": 0, "warnings": ["none"]})
    ]
    assert make_client(server.url, sleeps).ready()["status"] == "no_workers"
    assert sleeps == []
