"""shared.crypto: envelope encryption, AAD binding, tampering, rotation, token hashing."""

import base64

import pytest

from shared.crypto import (
    Keyring,
    decrypt_payload,
    encrypt_payload,
    generate_key,
    hash_secret,
    new_data_key,
    new_job_id,
    new_token,
    secret_matches,
)
from shared.errors import ConfigError, DecryptionError

JOB = "job-aaaaaaaaaaaaaaaaaaaa"


def test_round_trip_in_and_out():
    key = new_data_key()
    for direction in ("in", "out"):
        sealed = encrypt_payload(key, JOB, direction, b"\xff\xd8\xff photo bytes")
        assert b"photo bytes" not in sealed
        assert decrypt_payload(key, JOB, direction, sealed) == b"\xff\xd8\xff photo bytes"


def test_fresh_nonce_every_time():
    key = new_data_key()
    assert encrypt_payload(key, JOB, "in", b"x") != encrypt_payload(key, JOB, "in", b"x")


@pytest.mark.parametrize("position", [0, 4, 5, 10, 17, -1])
def test_any_flipped_byte_is_detected(position):
    key = new_data_key()
    sealed = bytearray(encrypt_payload(key, JOB, "in", b"some image"))
    sealed[position] ^= 0x01
    with pytest.raises(DecryptionError):
        decrypt_payload(key, JOB, "in", bytes(sealed))


def test_truncated_blob_is_detected():
    key = new_data_key()
    with pytest.raises(DecryptionError):
        decrypt_payload(key, JOB, "in", encrypt_payload(key, JOB, "in", b"abc")[:20])


def test_wrong_key_wrong_job_wrong_direction():
    key = new_data_key()
    sealed = encrypt_payload(key, JOB, "in", b"payload")
    with pytest.raises(DecryptionError):
        decrypt_payload(new_data_key(), JOB, "in", sealed)
    with pytest.raises(DecryptionError):
        decrypt_payload(key, "job-bbbbbbbbbbbbbbbbbbbb", "in", sealed)
    with pytest.raises(DecryptionError):
        decrypt_payload(key, JOB, "out", sealed)
    with pytest.raises(ValueError):
        encrypt_payload(key, JOB, "sideways", b"x")


def test_keyring_rotation_newest_wraps_all_unwrap():
    old = Keyring.parse(f"k1:{generate_key()}")
    old_entry = f"k1:{base64.b64encode(old.keys['k1']).decode()}"
    rotated = Keyring.parse(f"k2:{generate_key()},{old_entry}")
    assert rotated.active_id == "k2"
    dek = new_data_key()
    kid, wrapped = old.wrap(JOB, dek)
    assert kid == "k1"
    assert rotated.unwrap(JOB, kid, wrapped) == dek  # old jobs still readable
    kid2, wrapped2 = rotated.wrap(JOB, dek)
    assert kid2 == "k2"
    with pytest.raises(DecryptionError):  # the old ring cannot read new jobs
        old.unwrap(JOB, kid2, wrapped2)
    with pytest.raises(DecryptionError):  # the wrapped key is bound to its job
        rotated.unwrap("job-cccccccccccccccccccc", kid2, wrapped2)


def test_key_rotated_out_cannot_unwrap():
    ring = Keyring.parse(f"k1:{generate_key()}")
    kid, wrapped = ring.wrap(JOB, new_data_key())
    with pytest.raises(DecryptionError):
        Keyring.parse(f"k9:{generate_key()}").unwrap(JOB, kid, wrapped)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nocolon",
        "k1:notbase64!!",
        f"k1:{base64.b64encode(b'short').decode()}",
        f"k1:{generate_key()},k1:{generate_key()}",
        f"bad id:{generate_key()}",
    ],
)
def test_bad_keyrings_fail_fast(text):
    with pytest.raises(ConfigError):
        Keyring.parse(text)


def test_tokens_and_ids_are_unguessable_and_hashed():
    assert len(base64.urlsafe_b64decode(new_job_id() + "==")) >= 16
    assert len(base64.urlsafe_b64decode(new_token() + "==")) >= 32
    token = new_token()
    stored = hash_secret(token)
    assert token not in stored
    assert secret_matches(token, stored)
    assert not secret_matches(token + "x", stored)


def test_client_pseudonyms_are_keyed_stable_and_irreversible_without_the_key():
    import hashlib

    from shared.crypto import Keyring, generate_key

    key_a, key_b = generate_key(), generate_key()
    ring = Keyring.parse(f"a:{key_a},b:{key_b}")
    tag = ring.pseudonym("ip:192.0.2.7")
    assert tag == Keyring.parse(f"a:{key_a}").pseudonym("ip:192.0.2.7")  # every gateway agrees
    assert len(tag) == 32 and tag != ring.pseudonym("ip:192.0.2.8")
    # Not the bare hash anyone could compute by enumerating IPv4 addresses:
    assert tag not in hashlib.sha256(b"ip:192.0.2.7").hexdigest()
    assert "192.0.2.7" not in tag
    assert (
        Keyring.parse(f"b:{key_b},a:{key_a}").pseudonym("ip:192.0.2.7") != tag
    )  # rotation: new tags
