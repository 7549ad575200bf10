"""Test doubles for the m2fp_client tests (plain code; the fixtures are in tests/unit/conftest.py).

`Scripted` + `make_handler`: an HTTP server that only scripts status codes, headers and bodies,
to drive the client's retry and error paths (429 + Retry-After, 503, dropped connections).
`make_client` builds a Client that records its sleeps; `result_document` is a small valid result;
`JOB` a submit reply.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler

import numpy as np

from m2fp_client import Client
from m2fp_client.results import grey_png
from shared import constants


class Scripted:
    """Answers each request with the next scripted (status, headers, body); "drop" closes the socket."""

    def __init__(self) -> None:
        self.responses: list = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""  # set by the `server` fixture once it listens
        self.lock = threading.Lock()

    def next(self):
        with self.lock:
            return (
                self.responses.pop(0)
                if self.responses
                else (500, {}, {"error": "internal_error", "message": "script exhausted"})
            )


def make_handler(script: Scripted):
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            script.requests.append((self.command, self.path, dict(self.headers)))
            reply = script.next()
            if reply == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            status, headers, body = reply
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/json" if not isinstance(body, bytes) else "image/png"
            )
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    return Handler


def make_client(url: str, sleeps: list[float], **kwargs) -> Client:
    return Client(url, sleep=sleeps.append, **kwargs)


def png_b64(array: np.ndarray) -> str:
    return base64.b64encode(grey_png(array)).decode()


def result_document(width: int = 6, height: int = 4) -> dict:
    labels = np.zeros((height, width), np.uint8)
    labels[1:3, 1:3], labels[0, 5] = 13, 2
    instances = (labels > 0).astype(np.uint8)
    return {
        "job_id": "j" * 24,
        "width": width,
        "height": height,
        "label_map_png": png_b64(labels),
        "instance_map_png": png_b64(instances),
        "persons": [
            {
                "index": 1,
                "score": 0.9,
                "box": [1, 0, 6, 3],
                "area": 5,
                "parts": [
                    {"class_id": 2, "name": "Hair", "area": 1},
                    {"class_id": 13, "name": "Face", "area": 4},
                ],
            }
        ],
        "parts": [],
        "classes": {str(i): n for i, n in enumerate(constants.CIHP_CLASSES)},
        "classes_present": [0, 2, 13],
        "untrained": True,
        "warnings": ["UNTRAINED MODEL"],
        "timings": {"inference": 0.5},
    }


JOB = {
    "job_id": "A" * 24,
    "token": "T" * 43,
    "status_url": f"/v1/jobs/{'A' * 24}",
    "result_url": f"/v1/jobs/{'A' * 24}/result",
    "expires_in": 1200,
}
