"""The gateway under a real gunicorn: no Server header, JSON access log without secrets, metrics
merged across worker processes, and the whole submit path."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import gunicorn
import pytest
import requests

from tests.conftest import REPO, free_port, stop_process, wait_for
from tests.helpers import metrics_headers, png_bytes

pytestmark = pytest.mark.integration


GUNICORN = [
    sys.executable,
    "-m",
    "gunicorn",
    "-c",
    "api/gunicorn_conf.py",
    "-w",
    "2",
    "api.wsgi:app",
]


def start_gunicorn(env: dict[str, str], log_path) -> subprocess.Popen:
    """The gateway under gunicorn (two sync workers), its output into `log_path`."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            GUNICORN, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )


def wait_until_serving(proc: subprocess.Popen, base: str, log_path) -> None:
    """Wait for /healthz to answer 200; fail with gunicorn's log if it exits first."""

    def up():
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited early:\n{log_path.read_text()[-3000:]}")
        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(up, 30, what="gunicorn to serve /healthz")


@pytest.fixture
def gateway_process(service_env, clean_redis, tmp_path):
    """gunicorn -c api/gunicorn_conf.py -w 2 api.wsgi:app on a free port, metrics in multiprocess mode."""
    port = free_port()
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    # No jobs complete here (no worker), so the per-client in-flight cap must not mask the rate limit.
    env = dict(
        service_env,
        M2FP_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(prometheus_dir),
        M2FP_MAX_JOBS_PER_CLIENT="10",
    )
    log_path = tmp_path / "gunicorn.log"
    proc = start_gunicorn(env, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, base, log_path)
        yield base, log_path, port, prometheus_dir
    finally:
        stop_process(proc, grace=15)


def raw_headers(port: int, method: str, path: str) -> list[tuple[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request(method, path)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.getheaders()


def test_no_server_header_and_no_version_anywhere(gateway_process):
    _, _, port, _ = gateway_process
    for method, path in (
        ("GET", "/healthz"),
        ("GET", "/nope"),
        ("DELETE", "/healthz"),
        ("GET", "/openapi.json"),
    ):
        headers = raw_headers(port, method, path)
        names = [name.lower() for name, _ in headers]
        assert "server" not in names, headers
        text = " ".join(f"{name}: {value}" for name, value in headers).lower()
        assert (
            "gunicorn" not in text and gunicorn.__version__ not in text and "werkzeug" not in text
        )
    # gunicorn's own error page for a request it cannot parse carries no version either.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NOT-HTTP\r\n\r\n")
        reply = sock.recv(65536).decode("latin1")
    assert gunicorn.__version__ not in reply and "server:" not in reply.lower()


# Every field of an access-log line: no client address, user agent, query or token among them.
ACCESS_LOG_FIELDS = {
    "ts",
    "level",
    "logger",
    "event",
    "method",
    "path",
    "status",
    "bytes",
    "seconds",
    "request_id",
}


def submit_and_poll_with_secrets(base: str) -> tuple[requests.Response, dict]:
    """Submit a photo with a private file name, then poll it with a secret in the query and the
    user agent; returns the submit's response and the job."""
    response = requests.post(
        f"{base}/v1/jobs",
        files={"image": ("private-name.png", png_bytes(), "image/png")},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job = response.json()
    status = requests.get(
        f"{base}{job['status_url']}?secret=query-secret-value",
        headers={"Authorization": f"Bearer {job['token']}", "User-Agent": "agent-secret"},
        timeout=10,
    )
    assert status.status_code == 200 and status.json()["status"] == "queued"
    return response, job


def test_submit_status_and_access_log_without_secrets(gateway_process):
    base, log_path, _, _ = gateway_process
    response, job = submit_and_poll_with_secrets(base)
    wait_for(
        lambda: log_path.read_text().count('"event":"http_request"') >= 3,
        10,
        what="access log lines",
    )
    log = log_path.read_text()
    for secret in (
        "query-secret-value",
        job["token"],
        "private-name",
        "agent-secret",
        "127.0.0.1 -",
    ):
        assert secret not in log, secret
    access = [json.loads(line) for line in log.splitlines() if '"event":"http_request"' in line]
    submit_line = next(line for line in access if line["method"] == "POST")
    assert submit_line["path"] == "/v1/jobs" and submit_line["status"] == 202
    assert submit_line["request_id"] == response.headers["X-Request-ID"]
    status_line = next(line for line in access if line["path"] == job["status_url"])
    assert set(status_line) == ACCESS_LOG_FIELDS


def test_metrics_merge_every_worker_process(gateway_process):
    base, _, port, prometheus_dir = gateway_process
    count = 20
    # Hold one sync worker busy on a half-sent request, so that the other one serves the rest.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: test\r\n")
        time.sleep(0.5)
        for _ in range(count):
            response = requests.get(
                f"{base}/openapi.json", headers={"Connection": "close"}, timeout=5
            )
            assert response.status_code == 200
        slow.sendall(b"Connection: close\r\n\r\n")
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    assert len(list(prometheus_dir.glob("counter_*.db"))) == 2  # both processes counted requests
    for _ in range(4):  # whichever process answers the scrape reports the total of both
        text = requests.get(
            f"{base}/metrics", headers={"Connection": "close", **metrics_headers()}, timeout=5
        ).text
        line = next(
            line
            for line in text.splitlines()
            if line.startswith(
                'm2fp_http_requests_total{method="GET",route="/openapi.json",status="200"}'
            )
        )
        assert float(line.split()[-1]) == count + 1
    assert "m2fp_queue_depth 0.0" in text and "m2fp_redis_up 1.0" in text


def test_spoofed_forwarded_for_changes_nothing_behind_gunicorn(gateway_process):
    """No trusted proxy (the default): every X-Forwarded-For value is the same client."""
    base, _, _, _ = gateway_process
    statuses = []
    for index in range(6):  # the default submit limit is 5 a minute
        response = requests.post(
            f"{base}/v1/jobs",
            files={"image": ("a.png", png_bytes(), "image/png")},
            headers={"X-Forwarded-For": f"198.51.100.{index}"},
            timeout=10,
        )
        statuses.append(response.status_code)
    assert statuses == [202] * 5 + [429]
