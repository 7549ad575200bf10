"""shared.watchdog: alerts once per crossing, posts to a real local HTTP server."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from shared.watchdog import MemoryWatchdog, memory_percent


@pytest.fixture
def webhook():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()  # shutdown() only stops the loop; this closes the listening socket


def test_memory_percent_is_a_percentage():
    assert 0 < memory_percent() < 100


def test_alert_posted_once_per_crossing(webhook, caplog):
    url, received = webhook
    samples = iter([50, 95, 96, 89, 84, 97])
    dog = MemoryWatchdog(90, url, sample=lambda: next(samples), component="test")
    with caplog.at_level(logging.ERROR):
        results = [dog.check() for _ in range(6)]
    assert results == [False, True, False, False, False, True]
    assert [r["percent"] for r in received] == [95, 97]
    assert received[0]["alert"] == "memory_high" and received[0]["threshold"] == 90
    assert sum(r.message == "memory_alert" for r in caplog.records) == 2


def test_unreachable_webhook_does_not_raise():
    dog = MemoryWatchdog(10, "http://127.0.0.1:9/none", sample=lambda: 99.0)
    assert dog.check() is True


def test_no_webhook_logs_only(caplog):
    with caplog.at_level(logging.ERROR):
        assert MemoryWatchdog(10, None, sample=lambda: 50.0).check()
    assert any(r.message == "memory_alert" for r in caplog.records)
