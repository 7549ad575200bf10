"""Upload validation, step by step as pure functions: file names, magic bytes, dimensions from the
header (bombs refused unread), limits from settings, multipart parts kept in memory. The same
steps through the HTTP API on a real Redis (each code and status, their order, no temp file, a
50 KB bomb's cost) are in tests/integration/test_api_validation.py."""

from __future__ import annotations

import io

import pytest
from werkzeug.test import EnvironBuilder

from api.validation import InMemoryRequest, check_filename, check_magic, read_dimensions
from shared.config import load_settings
from shared.errors import TooManyPixels, TypeMismatch, UndecodableImage, UnsupportedType
from tests.helpers import bomb_png, jpeg_bytes, png_bytes


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
    environ = builder.get_environ()
    try:
        request = InMemoryRequest(environ)
        stream = request.files["image"].stream
        assert isinstance(stream, io.BytesIO) and stream.getvalue() == big
    finally:
        environ["wsgi.input"].close()  # the builder's encoded body: a temporary file past 500 KB
        builder.close()
