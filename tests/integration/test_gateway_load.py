"""The gateway under slow clients and unfair ones, on real gunicorn, real Redis and real nginx.

- Slow uploads: clients that announce a body and trickle it (or their headers) a byte at a
  time must not keep a normal request from being served: the gateway alone cuts them at
  `M2FP_REQUEST_READ_TIMEOUT` (408 JSON for a body), and behind deploy/nginx.conf they never
  reach the gateway at all (nginx buffers bodies in memory, never on disk).
- One client is one client: IPv6 peers of one /64 (forwarded by a trusted proxy) share a
  limit and a ban; the per-client cap on jobs in flight answers 429 `too_many_jobs`.
- The TLS deployment trusts its proxy: the compose TLS profile's gateway sets
  M2FP_TRUSTED_PROXIES=1, and a gateway that sees X-Forwarded-For while trusting no hop warns.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest
import requests

from tests.conftest import REPO
from tests.helpers import metrics_headers, png_bytes
from tests.integration.conftest import NGINX, nginx_proxy, photo_jpeg, submit

pytestmark = pytest.mark.integration

BODY_HEAD = (
    b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 900000\r\n\r\n--b\r\n"
)
HEADER_HEAD = b"GET /healthz HTTP/1.1\r\n"


class Trickler(threading.Thread):
    """One connection that sends `head`, then a byte every `interval` s for at most `seconds` s."""

    def __init__(
        self,
        port: int,
        head: bytes,
        *,
        seconds: float = 20,
        interval: float = 0.5,
        tls: bool = False,
        source: str = "127.0.0.1",
    ):
        super().__init__(daemon=True)
        self.port, self.head, self.seconds, self.interval = port, head, seconds, interval
        self.tls, self.source = tls, source
        self.response = b""
        self.ended_after: float | None = (
            None  # seconds until the server closed, None if it never did
        )

    def run(self) -> None:
        started = time.monotonic()
        sock = socket.create_connection(
            ("127.0.0.1", self.port), timeout=5, source_address=(self.source, 0)
        )
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        with sock:
            sock.sendall(self.head)
            sock.settimeout(self.interval)
            while time.monotonic() - started < self.seconds:
                try:
                    sock.send(b"x")
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                except (OSError, ssl.SSLError):
                    break
                if not chunk:
                    break
                self.response += chunk
            else:
                return
        self.ended_after = time.monotonic() - started


def probe_healthz(base: str, seconds: float, **kwargs) -> list[float]:
    """GET /healthz every 0.25 s for `seconds`; the latency of each (each must be a 200)."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        reply = requests.get(base + "/healthz", timeout=20, **kwargs)
        assert reply.status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.25)
    return latencies


def test_slow_uploads_do_not_starve_other_clients(stack_factory):
    """Twice as many tricklers as threads: each is cut at the deadline, everybody else is served."""
    stack = stack_factory(
        workers=0,
        M2FP_GATEWAY_WORKERS="1",
        M2FP_GATEWAY_THREADS="4",
        M2FP_REQUEST_READ_TIMEOUT="3",
        M2FP_BAN_AFTER="1",
    )
    port = int(stack.base_url.rsplit(":", 1)[1])
    bodies = [Trickler(port, BODY_HEAD) for _ in range(6)]
    headers = [Trickler(port, HEADER_HEAD) for _ in range(2)]
    for trickler in bodies + headers:
        trickler.start()
    time.sleep(0.5)  # every thread is now held by a trickler
    latencies = probe_healthz(stack.base_url, 8)
    for trickler in bodies + headers:
        trickler.join(30)
    # A timed-out upload is slow, not invalid: with bans after one strike, this client is still welcome.
    reply = submit(stack, photo_jpeg(64, 64))
    assert reply.status_code == 202, reply.text
    # Each waited at most its own deadline plus the turn of those ahead of it (8 on 4 threads).
    assert max(latencies) < 3 * 3, latencies
    for trickler in bodies + headers:
        assert trickler.ended_after is not None and trickler.ended_after < 3 * 3 + 2
    for trickler in bodies:
        assert trickler.response.startswith(b"HTTP/1.1 408"), trickler.response[:200]
        assert json.loads(trickler.response.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (bootstrap installs it)")
def test_slow_uploads_behind_nginx_never_reach_the_gateway(stack_factory, tmp_path):
    """The gateway has 2 threads and a long deadline: only nginx's buffering keeps it free."""
    stack = stack_factory(
        workers=0,
        M2FP_TRUSTED_PROXIES="1",
        M2FP_GATEWAY_WORKERS="1",
        M2FP_GATEWAY_THREADS="2",
        M2FP_REQUEST_READ_TIMEOUT="120",
    )
    with nginx_proxy(tmp_path, stack.base_url.rsplit(":", 1)[1]) as (https, _, https_port):
        tricklers = [
            Trickler(https_port, BODY_HEAD, seconds=8, tls=True, source=f"127.0.0.{10 + i}")
            for i in range(10)
        ]
        for trickler in tricklers:
            trickler.start()
        time.sleep(1)
        latencies = probe_healthz(https, 6, verify=False)
        big = png_bytes(1650, 1650, noise=True)  # ~8 MB: nginx holds it in memory
        assert 7_000_000 < len(big) < 9_500_000
        reply = requests.post(
            https + "/v1/jobs", files={"image": ("big.png", big)}, verify=False, timeout=60
        )
        assert reply.status_code == 202, reply.text
        for trickler in tricklers:
            trickler.join(30)
        assert max(latencies) < 5, latencies
        # nginx never spooled a body to disk (it logs a warning whenever it does).
        assert "buffered to a temporary file" not in (tmp_path / "error.log").read_text()
        assert (
            not any((tmp_path / "client_body").rglob("*"))
            if (tmp_path / "client_body").exists()
            else True
        )
        # nginx logs no client address, user agent or referer (and no query string).
        access = (tmp_path / "access.log").read_text()
        assert '"POST /v1/jobs"' in access
        assert "127.0.0." not in access and "python-requests" not in access
        # A stalled body is cut by client_body_timeout with a JSON 408, not held forever.
        stalled = Trickler(https_port, BODY_HEAD, seconds=30, interval=15, tls=True)
        stalled.run()
        assert stalled.ended_after is not None and stalled.ended_after < 25


def test_one_client_is_one_client_behind_a_trusted_proxy(stack_factory):
    """Real gunicorn, X-Forwarded-For trusted for one hop: IPv6 /64s, strikes and the in-flight cap."""
    stack = stack_factory(
        workers=0,
        M2FP_TRUSTED_PROXIES="1",
        M2FP_SUBMIT_LIMIT="2/minute",
        M2FP_BAN_AFTER="3",
        M2FP_MAX_JOBS_PER_CLIENT="3",
    )

    def post(client: str, data: bytes, name: str = "p.png") -> requests.Response:
        return requests.post(
            stack.base_url + "/v1/jobs",
            files={"image": (name, data)},
            headers={"X-Forwarded-For": client},
            timeout=30,
        )

    # One /64 shares the submit limit; the next /64 is somebody else.
    assert [post(f"2001:db8:7:1::{i}", png_bytes()).status_code for i in (1, 2, 3)] == [
        202,
        202,
        429,
    ]
    assert post("2001:db8:7:2::1", png_bytes()).status_code == 202
    # One /64 shares a ban: three junk uploads from three interface ids.
    for suffix in ("a", "b", "c"):
        assert post(f"2001:db8:7:3::{suffix}", b"junk").status_code == 415
    banned = post("2001:db8:7:3::d", png_bytes())
    assert banned.status_code == 403 and banned.json()["error"] == "banned"
    # junk, junk, a valid upload refused with 429, junk: still three strikes in a row.
    client = "198.51.100.20"
    assert [post(client, png_bytes()).status_code for _ in range(2)] == [202, 202]
    assert [post(client, b"junk").status_code for _ in range(2)] == [415, 415]
    assert post(client, png_bytes()).status_code == 429
    assert post(client, b"junk").status_code == 415
    assert post(client, png_bytes()).json()["error"] == "banned"


def test_jobs_in_flight_are_capped_per_client_behind_gunicorn(stack_factory):
    stack = stack_factory(workers=0, M2FP_MAX_JOBS_PER_CLIENT="2")
    assert [submit(stack, png_bytes(), "p.png").status_code for _ in range(2)] == [202, 202]
    capped = submit(stack, png_bytes(), "p.png")
    assert capped.status_code == 429 and capped.json()["error"] == "too_many_jobs"
    assert int(capped.headers["Retry-After"]) > 0
    # A client at another address (loopback has many) is admitted.
    with requests.Session() as other:  # closed: its pooled connection is no leaked socket
        other.mount("http://", _SourceAdapter("127.0.0.2"))
        assert (
            other.post(
                stack.base_url + "/v1/jobs", files={"image": ("p.png", png_bytes())}, timeout=30
            ).status_code
            == 202
        )


class _SourceAdapter(requests.adapters.HTTPAdapter):
    """Connect from a given loopback address (another client, as far as the gateway knows)."""

    def __init__(self, source: str):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def test_the_tls_profile_trusts_its_proxy():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    conf = (REPO / "deploy/nginx.conf").read_text()
    upstreams = {
        line.split("http://", 1)[1].split(":", 1)[0]
        for line in conf.splitlines()
        if "proxy_pass http://" in line
    }
    assert upstreams == {"gateway-tls"}
    gateway = services["gateway-tls"]
    assert gateway["profiles"] == ["tls"] and services["proxy"]["profiles"] == ["tls"]
    assert str(gateway["environment"]["M2FP_TRUSTED_PROXIES"]) == "1"
    assert not gateway.get("ports")  # reachable only through the proxy
    assert "gateway-tls" in services["proxy"]["depends_on"]
    assert "M2FP_TRUSTED_PROXIES" not in services["api"].get("environment", {})


def test_forwarded_for_without_a_trusted_hop_is_warned_once(stack_factory):
    stack = stack_factory(workers=0, M2FP_GATEWAY_WORKERS="1", M2FP_TRUSTED_PROXIES="0")
    for _ in range(3):
        requests.get(
            stack.base_url + "/healthz", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10
        )
    time.sleep(0.3)
    warnings = [
        line for line in stack.log("gateway").splitlines() if '"untrusted_forwarded_for"' in line
    ]
    assert len(warnings) == 1 and '"level":"warning"' in warnings[0]
    metrics = requests.get(stack.base_url + "/metrics", headers=metrics_headers(), timeout=10).text
    assert "m2fp_untrusted_forwarded_for_total 3.0" in metrics
