"""shared.jobstore against a real redis-server: TTLs, state machine, atomic one-time fetch."""

import threading

import pytest

from shared.constants import input_key, job_key, output_key
from shared.jobstore import JobStore
from tests.helpers import stored_job

pytestmark = pytest.mark.integration


@pytest.fixture
def store(clean_redis):
    return JobStore(
        clean_redis, input_ttl=60, result_ttl=60, job_ttl=300, max_attempts=2, claim_input_ttl=120
    )


def create(store, job_id=None):
    return stored_job(store, job_id)


def test_every_key_has_a_ttl(store, clean_redis):
    job_id = create(store)
    claim = store.claim(job_id, "w1")
    assert claim.outcome == "ok" and claim.sealed_input == b"SEALED-INPUT" and claim.attempts == 1
    assert store.store_result(job_id, b"SEALED-RESULT")
    for key in clean_redis.scan_iter("m2fp:*"):
        assert clean_redis.ttl(key) > 0, key


def test_happy_path_and_single_fetch(store, clean_redis):
    job_id = create(store)
    assert store.status(job_id)["status"] == "queued"
    store.claim(job_id, "w1")
    assert store.status(job_id)["status"] == "running"
    assert store.fetch_result(job_id).outcome == "not_ready"
    assert store.store_result(job_id, b"SEALED-RESULT")
    assert not clean_redis.exists(input_key(job_id))  # input deleted when result stored
    assert store.status(job_id)["status"] == "done"
    first = store.fetch_result(job_id)
    assert (first.outcome, first.sealed_result, first.key_id) == ("ok", b"SEALED-RESULT", "k1")
    assert first.wrapped_key == b"W" * 60
    assert not clean_redis.exists(output_key(job_id))
    assert store.fetch_result(job_id).outcome == "fetched"
    assert b"wrapped_dek" not in clean_redis.hkeys(job_key(job_id))  # data key shredded


def test_concurrent_fetches_get_one_result(store):
    job_id = create(store)
    store.claim(job_id, "w1")
    store.store_result(job_id, b"R")
    outcomes = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(store.fetch_result(job_id).outcome))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["fetched"] * 7 + ["ok"]


def test_attempts_are_bounded(store, clean_redis):
    job_id = create(store)
    assert store.claim(job_id, "w1").attempts == 1
    assert store.claim(job_id, "w2").attempts == 2  # redelivered after a lost worker
    assert store.claim(job_id, "w3").outcome == "worker_lost"
    record = store.status(job_id)
    assert (record["status"], record["error_code"]) == ("failed", "worker_lost")
    assert not clean_redis.exists(input_key(job_id))


def test_expired_input_is_reported_not_queued_forever(store, clean_redis):
    job_id = create(store)
    clean_redis.delete(input_key(job_id))  # what the TTL does
    record = store.status(job_id)
    assert (record["status"], record["error_code"]) == ("expired", "expired")
    other = create(store)
    clean_redis.delete(input_key(other))
    assert store.claim(other, "w1").outcome == "expired"
    assert store.status(other)["status"] == "expired"


def test_unfetched_result_expiry_is_reported(store, clean_redis):
    job_id = create(store)
    store.claim(job_id, "w1")
    store.store_result(job_id, b"R")
    clean_redis.delete(output_key(job_id))
    assert store.status(job_id)["status"] == "expired"


def test_withdrawn_job_discards_result(store, clean_redis):
    job_id = create(store)
    store.claim(job_id, "w1")
    assert store.delete(job_id)
    assert not store.store_result(job_id, b"R")
    assert not list(clean_redis.scan_iter(f"m2fp:*{job_id}*"))
    assert store.status(job_id) is None
    assert store.claim(job_id, "w1").outcome == "gone"


def test_fail_is_final(store):
    job_id = create(store)
    store.claim(job_id, "w1")
    assert store.fail(job_id, "undecodable_image")
    assert not store.store_result(job_id, b"R")
    assert not store.fail(job_id, "timeout")
    assert store.status(job_id)["error_code"] == "undecodable_image"
    assert store.claim(job_id, "w1").outcome == "final"


def test_claim_extends_a_short_input_ttl(store, clean_redis):
    job_id = create(store)
    clean_redis.expire(input_key(job_id), 5)
    store.claim(job_id, "w1")
    assert clean_redis.ttl(input_key(job_id)) > 60


def test_a_peeked_result_is_taken_once(store, clean_redis):
    job_id = create(store)
    store.claim(job_id, "w1")
    store.store_result(job_id, b"R")
    first, second = store.peek_result(job_id), store.peek_result(job_id)
    assert first.sealed_result == second.sealed_result == b"R"  # peeking takes nothing
    assert clean_redis.exists(output_key(job_id))
    assert store.take_result(job_id, first.sealed_result) is True
    assert store.take_result(job_id, second.sealed_result) is False  # the other fetch lost
    assert store.peek_result(job_id).outcome == "fetched"
    assert b"wrapped_dek" not in clean_redis.hkeys(job_key(job_id))
