"""Gunicorn settings for the gateway: `gunicorn -c api/gunicorn_conf.py api.wsgi:app`.

- Binds `M2FP_HOST:M2FP_PORT` from `shared.config` (the one place the environment is read).
- Concurrency: `M2FP_GATEWAY_WORKERS` processes x `M2FP_GATEWAY_THREADS` threads of
  `api.gunicorn_worker.GuardedThreadWorker` (gthread plus a total read deadline of
  `M2FP_REQUEST_READ_TIMEOUT` seconds per request, so slow or stalled uploads give their
  thread back). Defaults 2 x 16, chosen from bench/load_bench.py (docs/BENCHMARKS.md): a
  request is ~2 ms of CPU and a Redis round trip, so threads, not processes, carry the
  concurrency; two processes keep serving while one is busy. A `-w` on the command line still
  wins. With several processes, set PROMETHEUS_MULTIPROC_DIR so /metrics covers them all
  (api/metrics.py); `make run` and the tests do.
- Access log: one JSON object per request with method, path (only when it is a plain path),
  status, bytes, seconds and the request id. Never the query string, headers, the client's
  address, user agent or referrer: tokens travel in headers and paths may carry client text.
- No `Server` header: gunicorn 27 sends `Server: gunicorn` (its name, not its version; the
  version is in `SERVER_SOFTWARE` of the WSGI environ only). The header is dropped here.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import time

from gunicorn import glogging
from gunicorn.http import wsgi as gunicorn_wsgi

from shared.config import load_settings, prometheus_multiproc_dir
from shared.constants import REQUEST_ID_RE
from shared.hardening import disable_core_dumps

# The master reads the settings (keys included) before any worker forks: no core dumps of it either.
disable_core_dumps()
_settings = load_settings()
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./-]{1,128}")
_PROMETHEUS_FILES = ("counter_*.db", "gauge_*.db", "histogram_*.db", "summary_*.db")


def _bind_address(host: str, port: int) -> str:
    """host:port, with brackets for an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class JsonAccessLogger(glogging.Logger):
    """Gunicorn's logger with a JSON access line holding only safe fields."""

    def access(self, resp, req, environ, request_time: datetime.timedelta) -> None:
        """Log one request: method, path template-safe path, status, bytes, seconds, request id."""
        if not self.access_log_enabled:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        path = environ.get("PATH_INFO", "")
        request_id = next((v for k, v in resp.headers if k.lower() == "x-request-id"), None)
        line = {
            "ts": round(time.time(), 3),
            "level": "info",
            "logger": "gunicorn.access",
            "event": "http_request",
            "method": environ.get("REQUEST_METHOD", "-")[:10],
            "path": path if _SAFE_PATH.fullmatch(path) else "-",
            "status": int(status) if str(status).isdigit() else None,
            "bytes": getattr(resp, "sent", None),
            "seconds": round(request_time.total_seconds(), 4),
            "request_id": request_id if REQUEST_ID_RE.fullmatch(request_id or "") else None,
        }
        self.access_log.info(json.dumps(line, separators=(",", ":")))


_default_headers = gunicorn_wsgi.Response.default_headers


def _default_headers_without_server(self) -> list[str]:
    """Gunicorn's status line and default headers, minus `Server`."""
    return [line for line in _default_headers(self) if not line.lower().startswith("server:")]


gunicorn_wsgi.Response.default_headers = _default_headers_without_server


def on_starting(server) -> None:
    """Wipe stale prometheus_client multiprocess files from an earlier run."""
    directory = prometheus_multiproc_dir()
    if directory and os.path.isdir(directory):
        for pattern in _PROMETHEUS_FILES:
            for path in glob.glob(os.path.join(directory, pattern)):
                os.remove(path)


def post_worker_init(worker) -> None:
    """Warm the new worker process up (Redis, scripts, broker) before it takes requests."""
    from api import warm_up

    warm_up(worker.wsgi)


def child_exit(server, worker) -> None:
    """Let prometheus_client forget a dead worker's live gauges."""
    if prometheus_multiproc_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


bind = [_bind_address(_settings.host, _settings.port)]
# Forwarded headers are the app's business alone (ProxyFix, M2FP_TRUSTED_PROXIES hops): gunicorn
# would otherwise trust X-Forwarded-Proto from any loopback peer, and only from loopback.
forwarded_allow_ips = ""
worker_class = "api.gunicorn_worker.GuardedThreadWorker"
workers = _settings.gateway_workers
threads = _settings.gateway_threads
# Connections beyond the threads wait in each worker's poller (idle keep-alive costs no thread).
worker_connections = 1000
proc_name = "m2fp-gateway"
logger_class = JsonAccessLogger
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
# Request-line and header limits well under gunicorn's maxima; bodies are bounded by the app.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
timeout = 60
graceful_timeout = 30
keepalive = 5
# Worker heartbeat files in memory, not on the (possibly read-only) disk.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# No runtime control socket: nothing here needs one, and its default path ($HOME/.gunicorn)
# is shared by every gunicorn of the user and absent on a read-only root filesystem.
control_socket_disable = True
