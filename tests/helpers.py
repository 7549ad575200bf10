"""Helpers shared by the gateway tests, unit and integration alike (plain functions, no fixtures).

- `png_bytes` / `jpeg_bytes` / `bomb_png` / `label_map_png`: images made in memory.
- `upload` / `bearer`: a multipart submit through a Flask test client, a job token's header.
- `assert_secure`: the security headers every response carries, and no internals in its body.
- `save_tiny_checkpoint`: the tiny random network saved as a ModelScope-style checkpoint.
- `play_worker`: does what a worker does to a job with the real shared code (claim, decrypt
  the input, seal a result document, store it), so status and result are tested without one.
- `self_signed_certificate` (openssl, for localhost) and `certificate_authority` (`cryptography`:
  a CA and a server certificate it signed, for TLS to Redis across hosts).

The gateway fixtures that use them (`make_app`, `app`, `client`: an app on the session's real
Redis) are in tests/integration/conftest.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

from PIL import Image

from api.security import CSP
from shared.constants import CHECKPOINT_FILE
from shared.crypto import decrypt_payload, seal_result

EXPECTED_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}

LEAKS = re.compile(
    r"Traceback|/work/|\.py\b|site-packages|werkzeug|flask|gunicorn|redis-py|torch", re.I
)


def assert_secure(response) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert "Server" not in response.headers
    assert not LEAKS.search(response.get_data(as_text=True))


def png_bytes(width: int = 64, height: int = 48, noise: bool = False) -> bytes:
    """An RGB PNG; with noise=True it barely compresses (about 3 bytes a pixel)."""
    if noise:
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


# The gateway's /metrics answers only its scraper (M2FP_METRICS_TOKEN); the tests' stacks use this one.
METRICS_TOKEN = "test-metrics-token-5f0c2a9e41"


def metrics_headers() -> dict[str, str]:
    """The Authorization header of the tests' metrics scraper."""
    return bearer(METRICS_TOKEN)


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
    image = decrypt_payload(data_key, job_id, "in", claim.sealed_input, bound=claim.result_key)
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
    sealed = seal_result(claim.result_key, data_key, job_id, json.dumps(document).encode())
    assert gw.store.store_result(job_id, sealed)
    return image


def save_tiny_checkpoint(model_dir: Path):
    """Save the tiny random network into `model_dir` as the checkpoint file; returns the model."""
    import torch

    from worker.m2fp.checkpoint import build_model

    model, _ = build_model("random", variant="tiny")
    state_dict = {
        k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state_dict}, model_dir / CHECKPOINT_FILE)
    return model


def stored_job(store, job_id: str | None = None, sealed_input: bytes = b"SEALED-INPUT") -> str:
    """Record a queued job straight in a `shared.jobstore.JobStore` (token "tok"); its id."""
    from shared.crypto import hash_secret, new_job_id

    job_id = job_id or new_job_id()
    store.create(
        job_id,
        token_hash=hash_secret("tok"),
        key_id="k1",
        wrapped_key=b"W" * 60,
        sealed_input=sealed_input,
    )
    return job_id


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for localhost: (fullchain.pem, privkey.pem)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


TEST_CA_NAME = "m2fp test CA"


def _certificate(subject: str, key, signer, ca: bool, extensions=()):
    """One X.509 certificate for `key`, signed by `signer` (the test CA's key), valid a day."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TEST_CA_NAME)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA256())


def certificate_authority(
    folder: Path, name: str, ip_addresses: tuple[str, ...] = (), dns_names: tuple[str, ...] = ()
) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate it signed for `name` (its DNS names and IP
    addresses in the subjectAltName), made with `cryptography` (EC P-256, valid one day):
    (ca.pem, server.pem, server.key); the key file is 0600."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.DNSName(dns) for dns in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    server_usage = [
        x509.SubjectAlternativeName(alt_names),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    ca, cert, key = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    pem = serialization.Encoding.PEM
    ca.write_bytes(_certificate(TEST_CA_NAME, ca_key, ca_key, True).public_bytes(pem))
    cert.write_bytes(_certificate(name, server_key, ca_key, False, server_usage).public_bytes(pem))
    key.touch(mode=0o600)
    key.write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca, cert, key
