"""Upload validation: each step's error code and status, its order, bombs, and no temp files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile

import pytest
from werkzeug.test import EnvironBuilder

from api.validation import InMemoryRequest, check_filename, check_magic, read_dimensions
from shared.config import load_settings
from shared.errors import TooManyPixels, TypeMismatch, UndecodableImage, UnsupportedType
from tests.conftest import REPO
from tests.unit.test_api_helpers import (  # noqa: F401  (fixtures)
    app,
    bomb_png,
    client,
    jpeg_bytes,
    make_app,
    png_bytes,
    upload,
)


# --- pure functions (no Redis) ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name, extension",
    [
        ("photo.jpg", "jpg"),
        ("PHOTO.JPEG", "jpeg"),
        ("x.Png", "png"),
        ("holiday.2024.jpg", "jpg"),
        ("фото.png", "png"),
        ("a b (1).jpeg", "jpeg"),
    ],
)
def test_allowed_names(name, extension):
    assert check_filename(name) == extension


@pytest.mark.parametrize(
    "name",
    [
        "photo.gif",
        "photo",
        "photo.",
        ".png",
        "x.png.",
        "x.png ",
        "x.jpg.php",
        "x.php.jpg",
        "x.PHTML.png",
        "x.svg.png",
        "x.png\x00.jpg",
        "x\x00.png",
        "../x.png",
        "..\\x.png",
        "/etc/x.png",
        "C:\\x\\y.jpg",
        "x\n.png",
        "x\x7f.png",
        "a" * 300 + ".png",
        "x.jpe",
        "x.webp",
    ],
)
def test_refused_names(name):
    with pytest.raises(UnsupportedType):
        check_filename(name)


def test_magic_must_match_the_extension():
    assert check_magic(png_bytes(), "png") == "image/png"
    assert check_magic(jpeg_bytes(), "jpeg") == "image/jpeg"
    for data, extension in [
        (png_bytes(), "jpg"),
        (jpeg_bytes(), "png"),
        (b"GIF89a" + b"\0" * 64, "png"),
        (b"<?php echo 1; ?>", "jpg"),
        (b"%PDF-1.4\n", "png"),
    ]:
        with pytest.raises(TypeMismatch):
            check_magic(data, extension)


def test_dimensions_come_from_the_header(settings):
    assert read_dimensions(png_bytes(64, 48), "image/png", settings) == (64, 48)
    assert read_dimensions(jpeg_bytes(30, 20), "image/jpeg", settings) == (30, 20)


@pytest.mark.parametrize(
    "width, height", [(50_000, 50_000), (12_000, 12_000), (9_000, 9_000), (10_001, 10)]
)
def test_oversized_headers_are_refused(settings, width, height):
    with pytest.raises(TooManyPixels):
        read_dimensions(bomb_png(width, height), "image/png", settings)


@pytest.mark.parametrize(
    "data",
    [
        png_bytes()[:20],
        png_bytes()[:30],
        jpeg_bytes()[:4],
        jpeg_bytes()[:100],
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
    ],
)
def test_truncated_headers_are_undecodable(settings, data):
    with pytest.raises(UndecodableImage):
        read_dimensions(data, "image/jpeg" if data.startswith(b"\xff") else "image/png", settings)


def test_side_and_pixel_limits_come_from_settings(settings_env):
    tight = load_settings({**settings_env, "M2FP_MAX_IMAGE_SIDE": "100", "M2FP_MAX_PIXELS": "5000"})
    assert read_dimensions(png_bytes(100, 50), "image/png", tight) == (100, 50)
    with pytest.raises(TooManyPixels):
        read_dimensions(png_bytes(101, 10), "image/png", tight)
    with pytest.raises(TooManyPixels):
        read_dimensions(png_bytes(80, 70), "image/png", tight)


def test_multipart_files_stay_in_memory():
    """Werkzeug would spool a 2 MB part to a temporary file; the gateway's request class does not."""
    big = png_bytes(900, 800, noise=True)
    assert len(big) > 2_000_000
    builder = EnvironBuilder(
        method="POST", path="/v1/jobs", data={"image": (io.BytesIO(big), "big.png")}
    )
    request = InMemoryRequest(builder.get_environ())
    stream = request.files["image"].stream
    assert isinstance(stream, io.BytesIO) and stream.getvalue() == big


# --- through the HTTP API (real Redis) ----------------------------------------------------------
@pytest.mark.integration
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
    big = png_bytes(900, 800, noise=True)
    response = upload(client, big, "big.png")
    assert response.status_code == 202, response.get_json()


@pytest.mark.integration
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


@pytest.mark.integration
def test_checks_run_cheapest_first(make_app):
    client = make_app(M2FP_MAX_UPLOAD_BYTES="200000").test_client()
    # bytes before extension; extension before magic; magic before dimensions.
    assert (
        upload(client, png_bytes(300, 300, noise=True), "x.gif").get_json()["error"]
        == "payload_too_large"
    )
    assert upload(client, b"junk", "x.gif").get_json()["error"] == "unsupported_type"
    assert upload(client, bomb_png(), "x.jpg").get_json()["error"] == "type_mismatch"


@pytest.mark.integration
def test_a_json_body_is_missing_image(client):
    response = client.post("/v1/jobs", json={"image": "aGVsbG8="})
    assert response.status_code == 400 and response.get_json()["error"] == "missing_image"


BOMB_SCRIPT = r"""
import json, re, sys, time
from api import create_app
from shared.config import load_settings
from tests.unit.test_api_helpers import bomb_png, png_bytes, upload

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


@pytest.mark.integration
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
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["size"] < 60_000
    assert (result["status"], result["code"]) == (413, "image_too_large")
    assert result["seconds"] < 0.5
    assert result["rss_growth_kb"] < 8_000, result  # peak RSS grew by less than 8 MB
    assert result["control_growth_kb"] > 30_000, result
