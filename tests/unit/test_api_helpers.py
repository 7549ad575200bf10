"""Helpers and fixtures for the gateway tests (imported by the other test_api_* modules).

- `make_app(**env)`: a gateway app on the session's real Redis, with a real Celery producer
  (`shared.queue.make_celery`), built from an env dict through `load_settings` (never by hand).
- `png_bytes` / `jpeg_bytes` / `bomb_png`: images made in memory.
- `play_worker`: does what a worker does to a job with the real shared code (claim, decrypt
  the input, seal a result document, store it), so status and result are tested without one.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from api import create_app
from shared.config import load_settings
from shared.crypto import decrypt_payload, encrypt_payload, generate_key
from shared.queue import make_celery


def png_bytes(width: int = 64, height: int = 48, noise: bool = False) -> bytes:
    """An RGB PNG; with noise=True it barely compresses (about 3 bytes a pixel)."""
    if noise:
        import os

        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jpeg_bytes(width: int = 64, height: int = 48) -> bytes:
    """An RGB JPEG with a gradient (so its body is not trivially repetitive)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A ~50 KB PNG whose header declares width x height 8-bit grey pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 1000, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def upload(client, data: bytes, name: str = "photo.png", **kwargs):
    """POST /v1/jobs with `data` as the multipart field `image`."""
    return client.post(
        "/v1/jobs",
        data={"image": (io.BytesIO(data), name)},
        content_type="multipart/form-data",
        **kwargs,
    )


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for a job token."""
    return {"Authorization": f"Bearer {token}"}


def label_map_png(width: int, height: int) -> bytes:
    """A single-channel PNG whose pixels cycle through class ids 0..19."""
    image = Image.frombytes("L", (width, height), bytes((i % 20) for i in range(width * height)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def play_worker(app, job_id: str) -> bytes:
    """Do a worker's part with the real shared code; returns the input image it decrypted."""
    gw = app.extensions["m2fp"]
    claim = gw.store.claim(job_id, "test-worker")
    assert claim.outcome == "ok", claim.outcome
    data_key = gw.settings.keyring.unwrap(job_id, claim.key_id, claim.wrapped_key)
    image = decrypt_payload(data_key, job_id, "in", claim.sealed_input)
    with Image.open(io.BytesIO(image)) as decoded:
        width, height = decoded.size
    empty = base64.b64encode(label_map_png(width, height)).decode()
    document = {
        "job_id": job_id,
        "width": width,
        "height": height,
        "label_map_png": empty,
        "instance_map_png": empty,
        "persons": [],
        "classes": {"0": "Background"},
    }
    sealed = encrypt_payload(data_key, job_id, "out", json.dumps(document).encode())
    assert gw.store.store_result(job_id, sealed)
    return image


@pytest.fixture
def make_app(redis_url, clean_redis):
    """Factory: make_app(M2FP_SUBMIT_LIMIT="2/minute", ...) -> a gateway app on the test Redis."""
    made = []

    def factory(**overrides: str):
        env = {
            "M2FP_REDIS_URL": redis_url,
            "M2FP_DATA_KEYS": f"k1:{generate_key()}",
            "M2FP_SUBMIT_LIMIT": "1000/minute",
            "M2FP_POLL_LIMIT": "1000/minute",
            "M2FP_SUBMIT_ATTEMPT_LIMIT": "1000/minute",
            "M2FP_BAN_AFTER": "0",
        }
        env.update(overrides)
        settings = load_settings(env)
        celery_app = make_celery(settings)
        app = create_app(settings, celery_app=celery_app)
        made.append(app)
        return app

    yield factory
    for app in made:
        gw = app.extensions["m2fp"]
        gw.celery.close()
        gw.redis.close()
        gw.redis.connection_pool.disconnect()


@pytest.fixture
def app(make_app):
    """A gateway app (limits raised and bans off, so tests are not throttled)."""
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
