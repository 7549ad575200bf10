"""m2fp_client without the service: retry policy, error mapping, PNG decoding, the CLI's plumbing.

The HTTP test double below only scripts status codes and headers, to drive the client's retry
and error paths (429 + Retry-After, 503, dropped connections); the real API is exercised by
tests/integration/test_client_e2e.py against the live stack.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2fp_client import (
    PALETTE,
    Banned,
    Client,
    ConnectionFailed,
    InvalidImage,
    Job,
    JobExpired,
    JobFailed,
    NotReady,
    ParsingResult,
    ProtocolError,
    RateLimited,
    ResultGone,
    ServerUnavailable,
    Unauthorized,
    WaitTimeout,
    cli,
    decode_png_map,
)
from m2fp_client.client import connection_not_established, parse_retry_after
from m2fp_client.errors import BadRequest, M2FPError, NotFound, error_for
from m2fp_client.results import colorize, grey_png, palette_png
from shared import constants
from tests.conftest import free_port


# --- a scripted HTTP test double -------------------------------------------------------------
class Scripted:
    """Answers each request with the next scripted (status, headers, body); "drop" closes the socket."""

    def __init__(self) -> None:
        self.responses: list = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
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


@pytest.fixture
def server():
    script = Scripted()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(script))
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield script
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


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


# --- Retry-After and backoff -------------------------------------------------------------------
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


# --- error mapping ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "missing_image", BadRequest),
        (401, "unauthorized", Unauthorized),
        (403, "banned", Banned),
        (404, "not_found", NotFound),
        (409, "not_ready", NotReady),
        (410, "result_gone", ResultGone),
        (413, "payload_too_large", InvalidImage),
        (413, "image_too_large", InvalidImage),
        (415, "unsupported_type", InvalidImage),
        (415, "type_mismatch", InvalidImage),
        (422, "undecodable_image", InvalidImage),
        (429, "rate_limited", RateLimited),
        (503, "queue_full", ServerUnavailable),
        (503, "unavailable", ServerUnavailable),
    ],
)
def test_every_contract_error_maps_to_its_class(server, sleeps, status, code, cls):
    server.responses = [(status, {}, {"error": code, "message": f"the {code} sentence"})]
    with pytest.raises(cls) as info:
        make_client(server.url, sleeps, max_retries=0).submit(b"x", filename="a.jpg")
    assert (info.value.code, info.value.status, info.value.message) == (
        code,
        status,
        f"the {code} sentence",
    )


def test_unknown_codes_fall_back_on_the_status():
    assert type(error_for("brand_new", "m", 422)) is InvalidImage
    assert type(error_for("brand_new", "m", 502)) is ServerUnavailable
    assert type(error_for("brand_new", "m", 418)) is M2FPError


def test_non_json_error_bodies_still_raise_typed_errors(server, sleeps):
    server.responses = [(502, {}, b"<html>bad gateway</html>")]
    with pytest.raises(ServerUnavailable) as info:
        make_client(server.url, sleeps, max_retries=0).health()
    assert info.value.code == "http_502"


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


# --- results and PNG decoding -------------------------------------------------------------------
def test_result_document_decodes_to_typed_arrays():
    result = ParsingResult.from_json(result_document())
    assert result.label_map.shape == (4, 6) and result.label_map.dtype == np.uint8
    assert result.label_map[1, 1] == 13 and result.label_map[0, 5] == 2
    assert result.instance_map.max() == 1 and result.person_mask(1).sum() == 5
    assert result.classes[13] == "Face" and result.classes_present == [0, 2, 13]
    assert result.persons[0].box == (1, 0, 6, 3) and result.untrained and result.warnings
    assert json.loads(json.dumps(result.summary()))["persons"][0]["index"] == 1


def test_decode_png_map_keeps_every_value_0_to_255():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(decode_png_map(png_b64(values), (16, 16)), values)


def test_decode_png_map_reads_palette_indices():
    labels = np.array([[0, 5], [19, 13]], np.uint8)
    text = base64.b64encode(palette_png(labels)).decode()
    assert np.array_equal(decode_png_map(text), labels)


@pytest.mark.parametrize("bad", ["rgb", "shape", "base64"])
def test_bad_maps_are_protocol_errors(bad):
    document = result_document()
    if bad == "rgb":
        buffer = io.BytesIO()
        Image.new("RGB", (6, 4)).save(buffer, format="PNG")
        document["label_map_png"] = base64.b64encode(buffer.getvalue()).decode()
    elif bad == "shape":
        document["instance_map_png"] = png_b64(np.zeros((3, 6), np.uint8))
    else:
        document["label_map_png"] = "not base64!"
    with pytest.raises(ProtocolError):
        ParsingResult.from_json(document)


def test_client_palette_matches_the_server_palette():
    assert PALETTE == constants.PALETTE
    assert colorize(np.array([[5]], np.uint8))[0, 0].tolist() == list(constants.PALETTE[5])


# --- the command line ---------------------------------------------------------------------------
def test_expand_inputs_takes_images_from_directories(tmp_path):
    for name in ("b.JPG", "a.png", "c.jpeg", "notes.txt", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jpg").write_bytes(b"x")
    explicit = tmp_path / "notes.txt"
    files, missing = cli.expand_inputs(
        [tmp_path, explicit, tmp_path / "a.png", tmp_path / "nope.jpg"]
    )
    assert [f.name for f in files] == ["a.png", "b.JPG", "c.jpeg", "notes.txt"]
    assert missing == [tmp_path / "nope.jpg"]
    files, _ = cli.expand_inputs([tmp_path], recursive=True)
    assert [f.name for f in files] == ["a.png", "b.JPG", "c.jpeg", "d.jpg"]


def test_output_stems_are_unique():
    assert cli.output_stems(
        [Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg"), Path("c/x.jpeg")]
    ) == ["x", "x-2", "y", "x-3"]


def test_parser_requires_inputs_and_a_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["parse"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])
    args = cli.build_parser().parse_args(
        ["parse", "a.jpg", "dir", "--server", "http://h:1", "-o", "out", "--palette"]
    )
    assert (args.inputs, args.server, args.output, args.palette) == (
        ["a.jpg", "dir"],
        "http://h:1",
        "out",
        True,
    )


def test_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("  file-key-0123456789\n")
    monkeypatch.setenv("M2FP_API_KEY", "env-key")
    assert cli.read_api_key(str(key_file)) == "file-key-0123456789"
    assert cli.read_api_key(None) == "env-key"
    key_file.write_text("\n")
    with pytest.raises(ValueError):
        cli.read_api_key(str(key_file))


def test_main_rejects_a_missing_key_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["parse", str(tmp_path), "--api-key-file", str(tmp_path / "absent")])
    assert info.value.code == 2


def test_progress_shows_count_file_and_eta():
    now = [100.0]
    stream = io.StringIO()
    progress = cli.Progress(4, stream, clock=lambda: now[0])
    assert "ETA --:--" in progress.line(1, "a.jpg")
    now[0] += 10
    progress.finish_one()
    assert progress.eta() == pytest.approx(30)
    progress.show(2, "b.jpg")
    assert stream.getvalue() == "[2/4] b.jpg  elapsed 0:10  ETA 0:30\n"
    assert cli.format_seconds(3725) == "1:02:05"


class StubClient:
    """A null Client for CLI tests: returns a fixed parsing, or raises the scripted error per file name."""

    server_url = "http://stub"

    def __init__(self, errors: dict[str, M2FPError] | None = None) -> None:
        self.errors = errors or {}
        self.calls: list[str] = []

    def parse(self, path, poll_interval=0.5, timeout=300):
        self.calls.append(Path(path).name)
        if Path(path).name in self.errors:
            raise self.errors[Path(path).name]
        return ParsingResult.from_json(result_document())


def parse_args(*argv: str):
    return cli.build_parser().parse_args(["parse", *argv])


def test_run_parse_writes_outputs_and_reports_failures(tmp_path):
    photos, out = tmp_path / "in", tmp_path / "out"
    photos.mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        (photos / name).write_bytes(b"x")
    stub = StubClient({"b.png": InvalidImage("undecodable_image", "The image is corrupt.", 422)})
    stderr = io.StringIO()
    status = cli.run_parse(parse_args(str(photos), "-o", str(out)), stub, stderr)
    assert status == 1 and stub.calls == ["a.jpg", "b.png", "c.jpg"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.instances.png",
        "a.json",
        "a.labels.png",
        "c.instances.png",
        "c.json",
        "c.labels.png",
    ]
    log = stderr.getvalue()
    assert "FAILED b.png: undecodable_image: The image is corrupt." in log
    assert "2 of 3 parsed, 1 failed" in log and "WARNING: UNTRAINED MODEL" in log
    labels = np.array(Image.open(out / "a.labels.png"))
    assert labels.shape == (4, 6) and labels[1, 1] == 13
    summary = json.loads((out / "a.json").read_text())
    assert summary["source"] == "a.jpg" and summary["classes_present"] == {
        "0": "Background",
        "2": "Hair",
        "13": "Face",
    }


def test_run_parse_palette_keeps_class_ids(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert (
        cli.run_parse(
            parse_args(str(tmp_path / "a.jpg"), "-o", str(tmp_path), "--palette"),
            StubClient(),
            io.StringIO(),
        )
        == 0
    )
    with Image.open(tmp_path / "a.labels.png") as image:
        assert image.mode == "P" and np.array(image)[1, 1] == 13


def test_run_parse_stops_on_errors_every_file_would_hit(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    stub = StubClient({"a.jpg": Unauthorized("unauthorized", "A valid API key is required.", 401)})
    stderr = io.StringIO()
    assert cli.run_parse(parse_args(str(tmp_path), "-o", str(tmp_path / "o")), stub, stderr) == 1
    assert stub.calls == ["a.jpg"]
    assert (
        "2 remaining file(s) not sent" in stderr.getvalue()
        and "0 of 3 parsed, 3 failed" in stderr.getvalue()
    )


def test_run_parse_counts_missing_paths_and_empty_inputs(tmp_path):
    stderr = io.StringIO()
    assert cli.run_parse(parse_args(str(tmp_path / "nope.jpg")), StubClient(), stderr) == 1
    assert "FAILED" in stderr.getvalue() and "not_found" in stderr.getvalue()
    (tmp_path / "empty").mkdir()
    assert cli.run_parse(parse_args(str(tmp_path / "empty")), StubClient(), io.StringIO()) == 2
