"""worker.imaging: every photo mode decodes to upright RGB uint8; bad bytes end as clear errors."""

import base64
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from shared.errors import TooManyPixels, UndecodableImage
from worker.imaging import decode_image, png_base64

LIMIT = 40_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width=40, height=30) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=2)


def test_opencv_pixel_limit_set_before_import():
    import os

    assert int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]) <= 64_000_000


def test_rgb_png_exact():
    rgb = gradient()
    assert np.array_equal(decode_image(encode(Image.fromarray(rgb), "PNG"), max_pixels=LIMIT), rgb)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "1"])
def test_png_modes(mode):
    source = Image.fromarray(gradient())
    if mode == "I;16":
        grey = np.asarray(source.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey)
        assert image.mode.startswith("I;16")
    else:
        image = source.convert(mode)
    out = decode_image(encode(image, "PNG"), max_pixels=LIMIT)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit scaled down, not clipped to white
        assert (
            np.abs(out[:, :, 0].astype(int) - np.asarray(source.convert("L"), dtype=int)).max() <= 1
        )


def test_16bit_rgb_png_via_opencv():
    rgb16 = gradient().astype(np.uint16) * 257
    ok, data = cv2.imencode(".png", rgb16[:, :, ::-1])
    assert ok
    out = decode_image(data.tobytes(), max_pixels=LIMIT)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8


def test_rgba_transparent_pixels_become_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 17
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=LIMIT)
    assert (out == 255).all()


def test_cmyk_and_grey_jpeg():
    source = Image.fromarray(gradient())
    for mode in ("CMYK", "L"):
        out = decode_image(encode(source.convert(mode), "JPEG", quality=95), max_pixels=LIMIT)
        assert out.shape == (30, 40, 3)
    cmyk = decode_image(encode(source.convert("CMYK"), "JPEG", quality=95), max_pixels=LIMIT)
    assert np.abs(cmyk.astype(int) - gradient().astype(int)).mean() < 20


def test_exif_orientation_applied():
    image = Image.fromarray(gradient(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes()), max_pixels=LIMIT)
    assert out.shape == (40, 30, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        b"\xff\xd8\xff\xe0" + b"\x00" * 100,
    ],
)
def test_garbage_is_undecodable(data):
    with pytest.raises(UndecodableImage):
        decode_image(data, max_pixels=LIMIT)


def test_truncated_jpeg_and_png_are_undecodable():
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    )
    for fmt in ("JPEG", "PNG"):
        data = encode(image, fmt)
        with pytest.raises(UndecodableImage):
            decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_other_formats_are_refused():
    with pytest.raises(UndecodableImage):
        decode_image(encode(Image.fromarray(gradient()), "GIF"), max_pixels=LIMIT)
    with pytest.raises(UndecodableImage):
        decode_image(encode(Image.fromarray(gradient()), "BMP"), max_pixels=LIMIT)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb's shape)."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def test_pixel_bomb_refused_before_decoding():
    with pytest.raises(TooManyPixels):
        decode_image(png_declaring(50_000, 50_000), max_pixels=LIMIT)


def test_png_base64_single_channel():
    labels = np.arange(20, dtype=np.uint8).repeat(3).reshape(6, 10)
    decoded = Image.open(io.BytesIO(base64.b64decode(png_base64(labels))))
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), labels)
    with pytest.raises(ValueError):
        png_base64(labels.astype(np.int32))
