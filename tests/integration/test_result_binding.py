"""A result opens only with its job's bearer token, even for someone who can write to Redis.

The attacker here holds Redis write access (a worker's credentials suffice) but not the token
the client got. Replacing the job's token hash lets them past the gateway's check, but the
result is sealed to a key derived from the real token: they get a 500 and no byte of it, and
the result stays for its owner. Replacing the job's result key before the worker runs makes the
input undecryptable (the key is in its associated data): the job fails, nothing is sealed to
the attacker's key.
"""

from __future__ import annotations

import json

import pytest

from shared.constants import job_key, output_key
from shared.crypto import hash_secret, new_token, result_public_key
from tests.helpers import bearer, play_worker, png_bytes, upload
from worker.pipeline import JobContext, process_job

pytestmark = pytest.mark.integration


def submitted(client) -> dict:
    response = upload(client, png_bytes())
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def test_a_replaced_token_hash_opens_nothing(app, client, clean_redis):
    job = submitted(client)
    job_id = job["job_id"]
    play_worker(app, job_id)
    real_hash = clean_redis.hget(job_key(job_id), "token_hash")
    sealed = clean_redis.get(output_key(job_id))
    attacker = new_token()
    clean_redis.hset(job_key(job_id), "token_hash", hash_secret(attacker))

    stolen = client.get(job["result_url"], headers=bearer(attacker))
    assert stolen.status_code == 500
    assert stolen.get_json()["error"] == "internal_error"
    assert b"label_map_png" not in stolen.data and sealed not in stolen.data
    assert clean_redis.get(output_key(job_id)) == sealed  # a failed delivery destroys nothing

    clean_redis.hset(job_key(job_id), "token_hash", real_hash)
    served = client.get(job["result_url"], headers=bearer(job["token"]))
    assert served.status_code == 200
    assert json.loads(served.data)["job_id"] == job_id


def test_a_replaced_result_key_fails_the_job_before_anything_is_sealed(app, client, clean_redis):
    job = submitted(client)
    job_id = job["job_id"]
    attacker = new_token()
    clean_redis.hset(job_key(job_id), "result_pk", result_public_key(attacker, job_id))
    gw = app.extensions["m2fp"]

    def never_called():
        pytest.fail("the model ran on an input whose result key was swapped")

    context = JobContext(
        store=gw.store,
        keyring=gw.settings.keyring,
        predictor=never_called,
        worker_name="worker:1",
        max_pixels=gw.settings.max_pixels,
    )
    assert process_job(job_id, context) == "failed"
    record = gw.store.status(job_id)
    assert (record["status"], record["error_code"]) == ("failed", "internal_error")
    assert not clean_redis.exists(output_key(job_id))
