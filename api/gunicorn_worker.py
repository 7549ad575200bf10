"""The gateway's gunicorn worker class: gunicorn's `gthread` with a read deadline per request.

`gthread` suits the gateway: a request is a little CPU (validation, AES-GCM) and one or two
Redis round trips, so a few processes with many threads serve many clients at once, and idle
keep-alive connections wait in the main thread's poller, not in a thread. What `gthread` does
not bound is a client that sends its headers or body slowly: the thread handling it waits in
`recv`. `GuardedThreadWorker` arms `api.read_deadline.DEADLINES` for
`M2FP_REQUEST_READ_TIMEOUT` seconds around every request a thread handles: a request whose
headers and body have not arrived by then has its read side cut, so the thread is back in the
pool within the deadline whatever the client does (DESIGN: the gateway stays responsive).

Use: `worker_class = "api.gunicorn_worker.GuardedThreadWorker"` (api/gunicorn_conf.py).
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker

from api.read_deadline import DEADLINES
from shared.config import load_settings


class GuardedThreadWorker(ThreadWorker):
    """gthread, with every request's headers and body bounded by one total read deadline."""

    def init_process(self) -> None:
        """Read the deadline once per worker process, before the threads start."""
        self.read_timeout = load_settings().request_read_timeout
        super().init_process()

    def handle(self, conn):
        """Handle one request on `conn` under its read deadline (runs in a pool thread)."""
        entry = DEADLINES.arm(conn.sock, self.read_timeout)
        try:
            return super().handle(conn)
        finally:
            DEADLINES.disarm(entry)
