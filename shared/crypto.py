"""Envelope encryption of job payloads: AES-256-GCM under per-job data keys wrapped by a keyring.

Owns every cryptographic operation of the service (nothing else touches `cryptography`):
- `Keyring`: key id -> 32-byte key-encryption key (KEK). The *active* key wraps new data keys;
  every key in the ring unwraps, so keys rotate without downtime (add the new key as active, keep
  the old one until the longest TTL has passed, then drop it).
- Per job, a random 256-bit data key (DEK) encrypts the input image and the result. Only the DEK
  wrapped by the active KEK is stored (in the job record). Deleting the job record therefore
  crypto-shreds the input and the result, even if a copy of their ciphertext survives somewhere.
- Associated data binds every ciphertext to its job id and direction (`in`, `out`) and the wrapped
  DEK to its job id, so no ciphertext can be replayed under another job or swapped between input
  and output.
- The result is also bound to the client's bearer token, which the service never stores (Redis
  holds its SHA-256): the gateway derives an X25519 key pair from the token and the job id
  (HKDF-SHA256) and stores only the public key with the job; the worker seals the result to it
  (an ephemeral X25519 exchange) *and* under the data key. Opening a result takes the token and
  the keyring. Someone who can write to Redis (a worker's credentials suffice) and replaces the
  job's token hash or public key gets nothing: the gateway opens the result with the key of the
  token presented, and the input's associated data carries the public key, so a swapped key makes
  the input undecryptable and the job fails before any result is sealed to it.
- Fresh 96-bit random nonces per message (never reused: a new DEK per job, and few messages per
  key; the KEK wraps one DEK per job, far below the ~2^32 random-nonce bound between rotations).

Wire format of a sealed blob: b"M2FP" | version (1 byte) | nonce (12) | ciphertext+tag.
Wire format of a sealed result: the ephemeral X25519 public key (32) | a sealed blob.
Wire format of a wrapped key: the key id travels beside it in the job record.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import ConfigError, DecryptionError

MAGIC = b"M2FP"
VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
HEADER = MAGIC + bytes([VERSION])


RESULT_KEY_BYTES = 32  # an X25519 public key


def _aad(job_id: str, purpose: str, bound: bytes = b"") -> bytes:
    aad = f"m2fp:v{VERSION}:{purpose}:{job_id}".encode()
    return aad + b":" + bound.hex().encode() if bound else aad


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate `plaintext` under `key` with `aad`; returns header|nonce|ct."""
    nonce = os.urandom(NONCE_BYTES)
    return HEADER + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of `seal`; raises DecryptionError on any tampering, wrong key or wrong aad."""
    if len(blob) < len(HEADER) + NONCE_BYTES + 16 or not blob.startswith(HEADER):
        raise DecryptionError("not a sealed blob of a known version")
    nonce = blob[len(HEADER) : len(HEADER) + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(HEADER) + NONCE_BYTES :], aad)
    except InvalidTag as exc:
        raise DecryptionError("authentication failed") from exc


@dataclass(frozen=True)
class Keyring:
    """Key-encryption keys by id; `active_id` wraps, all unwrap."""

    keys: dict[str, bytes]
    active_id: str

    def __post_init__(self) -> None:
        if self.active_id not in self.keys:
            raise ConfigError(f"active key id {self.active_id!r} is not in the keyring")
        for key_id, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise ConfigError(f"key {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """Parse 'id1:base64key1,id2:base64key2' (whitespace or commas); the FIRST entry is active."""
        entries = [e for e in text.replace("\n", ",").replace(" ", ",").split(",") if e]
        if not entries:
            raise ConfigError("the keyring is empty")
        keys: dict[str, bytes] = {}
        for entry in entries:
            key_id, sep, encoded = entry.partition(":")
            if (
                not sep
                or not key_id
                or not key_id.isascii()
                or not key_id.replace("-", "").isalnum()
            ):
                raise ConfigError(
                    "each keyring entry must look like 'keyid:base64key' (keyid = letters, digits, -)"
                )
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(f"key {key_id!r} is not valid base64") from exc
            if key_id in keys:
                raise ConfigError(f"key id {key_id!r} appears twice in the keyring")
            keys[key_id] = key
        return cls(keys=keys, active_id=entries[0].partition(":")[0])

    def wrap(self, job_id: str, data_key: bytes) -> tuple[str, bytes]:
        """Wrap a job's data key with the active key; returns (key id, wrapped key)."""
        return self.active_id, seal(self.keys[self.active_id], data_key, _aad(job_id, "dek"))

    def pseudonym(self, value: str) -> str:
        """A keyed, irreversible tag of `value` (a client's address or key), stable for one active key.

        HMAC-SHA256 under a subkey derived from the active key, so nobody without the keyring can
        map a tag back to an address by enumerating IPv4 (as with a bare SHA-256). Rotating the
        active key changes every tag (a client's ban and in-flight count start afresh).
        """
        subkey = hmac.new(
            self.keys[self.active_id], b"m2fp client pseudonym v1", hashlib.sha256
        ).digest()
        return hmac.new(subkey, value.encode(), hashlib.sha256).hexdigest()[:32]

    def unwrap(self, job_id: str, key_id: str, wrapped: bytes) -> bytes:
        """Unwrap a job's data key with the key it was wrapped under (any key in the ring)."""
        key = self.keys.get(key_id)
        if key is None:
            raise DecryptionError("the job's key id is not in the keyring (rotated out?)")
        return open_sealed(key, wrapped, _aad(job_id, "dek"))


def generate_key() -> str:
    """A new random 256-bit key, base64-encoded, for a keyring entry."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def new_data_key() -> bytes:
    """A fresh random per-job data key."""
    return secrets.token_bytes(KEY_BYTES)


def encrypt_payload(
    data_key: bytes, job_id: str, direction: str, plaintext: bytes, bound: bytes = b""
) -> bytes:
    """Seal a job's input (`direction='in'`) or result (`'out'`) under its data key.

    `bound` joins the associated data: the input carries the job's result public key, so the
    key a worker reads from Redis must be the one the gateway stored.
    """
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
    return seal(data_key, plaintext, _aad(job_id, direction, bound))


def decrypt_payload(
    data_key: bytes, job_id: str, direction: str, blob: bytes, bound: bytes = b""
) -> bytes:
    """Open a job payload sealed by `encrypt_payload` for the same job id, direction and `bound`."""
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
    return open_sealed(data_key, blob, _aad(job_id, direction, bound))


def _hkdf(material: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(material)


def _result_private_key(token: str, job_id: str) -> X25519PrivateKey:
    """The job's result key, derived from its bearer token: exists only while a request holds it."""
    seed = _hkdf(token.encode(), job_id.encode(), f"m2fp:v{VERSION}:result-key".encode())
    return X25519PrivateKey.from_private_bytes(seed)


def result_public_key(token: str, job_id: str) -> bytes:
    """The 32-byte public half of the token's result key: what the job record stores."""
    public = _result_private_key(token, job_id).public_key()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _result_key(shared_secret: bytes, data_key: bytes, ephemeral: bytes, job_id: str) -> bytes:
    """The AES key of one sealed result: needs the token's exchange *and* the data key."""
    return _hkdf(shared_secret + data_key, ephemeral, _aad(job_id, "out"))


def seal_result(public_key: bytes, data_key: bytes, job_id: str, plaintext: bytes) -> bytes:
    """Seal a result to the job's token-derived public key and under its data key."""
    if len(public_key) != RESULT_KEY_BYTES:
        raise DecryptionError("the job has no valid result key")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    shared_secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
    key = _result_key(shared_secret, data_key, ephemeral_public, job_id)
    return ephemeral_public + seal(key, plaintext, _aad(job_id, "out", public_key))


def open_result(token: str, data_key: bytes, job_id: str, blob: bytes) -> bytes:
    """Open a result sealed by `seal_result`, with the bearer token presented and the data key."""
    if len(blob) < RESULT_KEY_BYTES:
        raise DecryptionError("not a sealed result")
    private = _result_private_key(token, job_id)
    ephemeral_public = blob[:RESULT_KEY_BYTES]
    try:
        shared_secret = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError as exc:  # an all-zero exchange: a malformed ephemeral key
        raise DecryptionError("not a sealed result") from exc
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _result_key(shared_secret, data_key, ephemeral_public, job_id)
    return open_sealed(key, blob[RESULT_KEY_BYTES:], _aad(job_id, "out", public))


def new_job_id() -> str:
    """An unguessable job id (144 random bits, URL-safe)."""
    return secrets.token_urlsafe(18)


def new_token() -> str:
    """An unguessable bearer token for one job (256 random bits)."""
    return secrets.token_urlsafe(32)


def hash_secret(value: str) -> str:
    """SHA-256 hex digest of a token or API key: what Redis and key files store instead of it."""
    return hashlib.sha256(value.encode()).hexdigest()


def secret_matches(value: str, expected_hash: str) -> bool:
    """Constant-time check of a presented token or key against a stored hash."""
    return hmac.compare_digest(hash_secret(value).encode(), expected_hash.encode())
