"""Upload validation through the HTTP API on the session's real Redis: each step's error code and
status, the order of the checks (cheapest first), a 2 MB upload without a temporary file, and a
50 KB decompression bomb refused fast with little memory (measured in a fresh process)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import REPO
from tests.helpers import bomb_png, jpeg_bytes, png_bytes, upload

pytestmark = pytest.mark.integration


def test_a_2mb_upload_never_creates_a_temporary_file(client, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("a temporary file was requested for an upload")

    for name in (
        "SpooledTemporaryFile",
        "TemporaryFile",
        "NamedTemporaryFile",
        "mkstemp",
        "mkdtemp",
    ):
        monkeypatch.setattr(tempfile, name, no_disk)
    monkeypatch.setattr("werkzeug.formparser.SpooledTemporaryFile", no_disk)
    # The test client's own encoder (client side, not the gateway) spools a body over 500 KB to
    # a TemporaryFile it never closes (a ResourceWarning whenever it is collected); keep it in memory.
    monkeypatch.setattr("werkzeug.test.TemporaryFile", lambda *args, **kwargs: io.BytesIO())
    big = png_bytes(900, 800, noise=True)
    response = upload(client, big, "big.png")
    assert response.status_code == 202, response.get_json()


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("no field", 400, "missing_image"),
        ("text field", 400, "missing_image"),
        ("empty name", 400, "missing_image"),
        ("empty file", 400, "missing_image"),
        ("two files", 400, "bad_request"),
        ("too many bytes", 413, "payload_too_large"),
        ("bomb", 413, "image_too_large"),
        ("long side", 413, "image_too_large"),
        ("gif extension", 415, "unsupported_type"),
        ("double extension", 415, "unsupported_type"),
        ("png named jpg", 415, "type_mismatch"),
        ("text named png", 415, "type_mismatch"),
        ("truncated png", 422, "undecodable_image"),
        ("truncated jpeg", 422, "undecodable_image"),
    ],
)
def test_each_validation_step_has_its_code(make_app, case, status, code):
    client = make_app(M2FP_MAX_UPLOAD_BYTES="200000").test_client()
    image = png_bytes()
    forms = {
        "no field": {},
        "text field": {"image": "not a file"},
        "empty name": {"image": (io.BytesIO(image), "")},
        "empty file": {"image": (io.BytesIO(b""), "x.png")},
        "two files": {"image": [(io.BytesIO(image), "a.png"), (io.BytesIO(image), "b.png")]},
        "too many bytes": {"image": (io.BytesIO(png_bytes(300, 300, noise=True)), "x.png")},
        "bomb": {"image": (io.BytesIO(bomb_png()), "x.png")},
        "long side": {"image": (io.BytesIO(png_bytes(10_001, 2)), "x.png")},
        "gif extension": {"image": (io.BytesIO(image), "x.gif")},
        "double extension": {"image": (io.BytesIO(image), "x.php.png")},
        "png named jpg": {"image": (io.BytesIO(image), "x.jpg")},
        "text named png": {"image": (io.BytesIO(b"hello world" * 10), "x.png")},
        "truncated png": {"image": (io.BytesIO(image[:30]), "x.png")},
        "truncated jpeg": {"image": (io.BytesIO(jpeg_bytes()[:100]), "x.jpeg")},
    }
    response = client.post("/v1/jobs", data=forms[case], content_type="multipart/form-data")
    assert response.status_code == status
    assert response.get_json()["error"] == code
    assert set(response.get_json()) == {"error", "message"}


def test_checks_run_cheapest_first(make_app):
    client = make_app(M2FP_MAX_UPLOAD_BYTES="200000").test_client()
    # bytes before extension; extension before magic; magic before dimensions.
    assert (
        upload(client, png_bytes(300, 300, noise=True), "x.gif").get_json()["error"]
        == "payload_too_large"
    )
    assert upload(client, b"junk", "x.gif").get_json()["error"] == "unsupported_type"
    assert upload(client, bomb_png(), "x.jpg").get_json()["error"] == "type_mismatch"


def test_a_json_body_is_missing_image(client):
    response = client.post("/v1/jobs", json={"image": "aGVsbG8="})
    assert response.status_code == 400 and response.get_json()["error"] == "missing_image"


BOMB_SCRIPT = r"""
import json, re, sys, time
from api import create_app
from shared.config import load_settings
from tests.helpers import bomb_png, png_bytes, upload

def peak_kb():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:  # Linux: "5" resets VmHWM to VmRSS
        handle.write("5")

app = create_app(load_settings(json.loads(sys.argv[1])))
client = app.test_client()
assert upload(client, png_bytes(), "warm.png").status_code == 202   # imports, Redis connection
bomb = bomb_png()
reset_peak()
before = peak_kb()
started = time.perf_counter()
response = upload(client, bomb, "bomb.png")
elapsed = time.perf_counter() - started
growth = peak_kb() - before
reset_peak()
before_control = peak_kb()
control = b"\x01" * (32 << 20)  # the probe is sensitive: 32 MB really written shows up
control_growth = peak_kb() - before_control
print(json.dumps({"status": response.status_code, "code": response.get_json()["error"],
                  "seconds": elapsed, "rss_growth_kb": growth, "size": len(bomb),
                  "control_growth_kb": control_growth}))
"""


def test_a_50k_bomb_is_refused_fast_with_little_memory(service_env, clean_redis):
    """A ~50 KB PNG declaring 50000x50000 pixels (2.5 GB decoded) costs almost nothing to refuse."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS of one request")
    env = {k: v for k, v in service_env.items() if k.startswith("M2FP_")}
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, json.dumps(env)],
        cwd=REPO,
        env=service_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # the assertion below shows its stderr
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["size"] < 60_000
    assert (result["status"], result["code"]) == (413, "image_too_large")
    assert result["seconds"] < 0.5
    assert result["rss_growth_kb"] < 8_000, result  # peak RSS grew by less than 8 MB
    assert result["control_growth_kb"] > 30_000, result
