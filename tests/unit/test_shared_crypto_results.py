"""Results sealed to the job's token: they open with the token and the data key, nothing less."""

from __future__ import annotations

import pytest

from shared.crypto import new_data_key, new_token, open_result, result_public_key, seal_result
from shared.errors import DecryptionError

JOB = "job-aaaaaaaaaaaaaaaaaaaa"


@pytest.fixture
def sealed():
    token, key = new_token(), new_data_key()
    return token, key, seal_result(result_public_key(token, JOB), key, JOB, b'{"persons":[]}')


def test_the_token_and_the_data_key_open_the_result(sealed):
    token, key, blob = sealed
    assert open_result(token, key, JOB, blob) == b'{"persons":[]}'
    assert result_public_key(token, JOB) == result_public_key(token, JOB)  # derived, not stored


def test_another_token_opens_nothing(sealed):
    _, key, blob = sealed
    with pytest.raises(DecryptionError):
        open_result(new_token(), key, JOB, blob)


def test_the_token_alone_opens_nothing(sealed):
    """Deleting the job record (its wrapped data key) still crypto-shreds the result."""
    token, _, blob = sealed
    with pytest.raises(DecryptionError):
        open_result(token, new_data_key(), JOB, blob)


def test_a_result_is_bound_to_its_job_and_untouched(sealed):
    token, key, blob = sealed
    with pytest.raises(DecryptionError):
        open_result(token, key, "job-bbbbbbbbbbbbbbbbbbbb", blob)
    for index in (0, 40, len(blob) - 1):  # ephemeral key, nonce, tag
        tampered = bytearray(blob)
        tampered[index] ^= 1
        with pytest.raises(DecryptionError):
            open_result(token, key, JOB, bytes(tampered))
    with pytest.raises(DecryptionError):
        open_result(token, key, JOB, blob[:20])


def test_every_job_gets_its_own_key_and_every_seal_its_own_ephemeral(sealed):
    token, key, _ = sealed
    assert result_public_key(token, JOB) != result_public_key(token, "job-cccccccccccccccccccc")
    public = result_public_key(token, JOB)
    assert seal_result(public, key, JOB, b"x")[:32] != seal_result(public, key, JOB, b"x")[:32]
    with pytest.raises(DecryptionError):
        seal_result(b"short", key, JOB, b"x")
