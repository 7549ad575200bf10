"""The reaper: a dead worker's claimed jobs go back to the queue within a heartbeat TTL.

Store level (real Redis): `claim` records the claim, `store_result`/`fail` end it, `reap`
requeues only the running jobs of workers without a live heartbeat (and not fresh claims), a
claim on a job running under a live worker is refused `busy`. Process level: two real workers,
the one running a job is SIGKILLed with its whole process tree; the other requeues and
finishes the job, within 60 s of the kill for the requeue.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from shared import heartbeat
from shared.constants import CLAIMERS_KEY, claimed_key, job_key
from shared.jobstore import JobStore
from tests.conftest import wait_for
from tests.helpers import stored_job
from tests.integration.conftest import photo_jpeg, poll_until, submit

pytestmark = pytest.mark.integration


@pytest.fixture
def store(clean_redis):
    return JobStore(
        clean_redis, input_ttl=60, result_ttl=60, job_ttl=300, max_attempts=3, claim_input_ttl=120
    )


def create(store: JobStore) -> str:
    return stored_job(store, sealed_input=b"SEALED")


def backdate(client: redis.Redis, job_id: str, seconds: float) -> None:
    """Pretend the job was claimed `seconds` ago."""
    client.hset(job_key(job_id), "started", f"{time.time() - seconds:.3f}")


def test_claims_are_recorded_and_ended_by_result_or_failure(store, clean_redis):
    done, failed = create(store), create(store)
    assert store.claim(done, "host:1").outcome == "ok"
    assert store.claim(failed, "host:1").outcome == "ok"
    assert clean_redis.smembers(claimed_key("host:1")) == {done.encode(), failed.encode()}
    assert clean_redis.sismember(CLAIMERS_KEY, "host:1")
    assert store.store_result(done, b"RESULT")
    assert store.fail(failed, "undecodable_image")
    assert not clean_redis.exists(claimed_key("host:1"))


def test_reap_requeues_only_the_jobs_of_dead_workers(store, clean_redis):
    orphan, alive, fresh = create(store), create(store), create(store)
    store.claim(orphan, "dead:1")
    store.claim(fresh, "dead:1")
    store.claim(alive, "live:2")
    heartbeat.beat(clean_redis, heartbeat.Heartbeat(name="live:2"))
    for job_id in (orphan, alive):
        backdate(clean_redis, job_id, 60)
    assert store.reap() == [orphan]  # `fresh` was claimed < grace ago: left for the next pass
    assert store.status(orphan)["status"] == "queued"
    assert store.status(alive)["status"] == store.status(fresh)["status"] == "running"
    assert store.reap() == []  # atomic: requeued once
    backdate(clean_redis, fresh, 60)
    assert store.reap() == [fresh]
    assert not clean_redis.sismember(CLAIMERS_KEY, "dead:1")
    second = store.claim(orphan, "live:2")  # the re-sent message
    assert (second.outcome, second.attempts) == ("ok", 2)


def test_a_job_running_on_a_live_worker_is_not_claimed_again(store, clean_redis):
    job_id = create(store)
    store.claim(job_id, "live:1")
    heartbeat.beat(clean_redis, heartbeat.Heartbeat(name="live:1"))
    assert store.claim(job_id, "other:2").outcome == "busy"
    assert int(clean_redis.hget(job_key(job_id), "attempts")) == 1  # busy costs no attempt
    heartbeat.remove(clean_redis, "live:1")  # its owner died: a redelivery may take it over
    assert store.claim(job_id, "other:2").outcome == "ok"
    assert not clean_redis.sismember(claimed_key("live:1"), job_id)


@pytest.mark.slow
def test_a_killed_worker_host_loses_no_job(stack_factory):
    stack = stack_factory(workers=2, M2FP_TORCH_THREADS="1", M2FP_INFER_MAX_SIDE="1920")
    client = redis.Redis.from_url(stack.env["M2FP_REDIS_URL"])
    job = submit(stack, photo_jpeg(1600, 1200, seed=3)).json()
    job_id = job["job_id"]

    def owner() -> str | None:
        fields = client.hmget(job_key(job_id), "status", "worker")
        return fields[1].decode() if fields[0] == b"running" and fields[1] else None

    name = wait_for(owner, 60, interval=0.05, what="the job to start")
    pgid = os.getpgid(int(name.rsplit(":", 1)[1]))
    victim = next(proc for proc in stack.workers if proc.pid == pgid)
    os.killpg(pgid, signal.SIGKILL)  # the worker and its pool child, like a host going away
    killed = time.time()
    victim.wait(10)
    requeued = wait_for(
        lambda: client.hget(job_key(job_id), "requeued"), 75, interval=0.2, what="the requeue"
    )
    assert float(requeued) - killed <= 60
    final = poll_until(stack, job, timeout=240)
    assert final["status"] == "done", final
    assert int(client.hget(job_key(job_id), "attempts")) == 2
    assert "jobs_of_dead_workers_requeued" in stack.all_logs()


def _take_and_die(broker_url: str) -> None:
    """In a forked child: take one parse message like a worker would, then die without a word."""
    from kombu import Connection, Consumer, Queue

    from shared.constants import QUEUE

    with Connection(broker_url) as connection:
        taken = []
        consumer = Consumer(
            connection,
            queues=[Queue(QUEUE, routing_key=QUEUE)],
            callbacks=[lambda _body, message: taken.append(message)],
            accept=["json"],
        )
        with consumer:
            connection.drain_events(timeout=10)
        os._exit(0 if taken else 1)  # no ack, no channel close: the message stays unacked


def test_a_message_taken_by_a_worker_that_died_before_claiming_is_resent(
    store, clean_redis, redis_url, monkeypatch
):
    import multiprocessing

    from shared.config import load_settings
    from shared.crypto import generate_key
    from shared.queue import enqueue_parse, make_celery, unacked_job_ids
    from worker import process

    settings = load_settings(
        {"M2FP_REDIS_URL": redis_url, "M2FP_DATA_KEYS": f"k1:{generate_key()}"}
    )
    app = make_celery(settings)
    job_id = create(store)
    enqueue_parse(app, job_id)
    app.close()
    child = multiprocessing.get_context("fork").Process(target=_take_and_die, args=(redis_url,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert unacked_job_ids(clean_redis, older_than=0) == [job_id]  # taken, never acked
    monkeypatch.setattr(process, "UNCLAIMED_SECONDS", 0.0)
    sent: list[str] = []
    reaper = process.WorkerProcess(settings, requeue=sent.append)
    assert reaper.reap_once(store) == [job_id] and sent == [job_id]
    assert not store.may_resend(job_id, 30.0)  # re-sent just now: at most once an interval
    store.claim(job_id, "live:1")  # the re-sent message ran: a running job is never re-sent
    assert not store.may_resend(job_id, 0.0)


def test_a_message_that_vanished_from_the_queue_is_resent_once_a_later_job_is_claimed(
    store, clean_redis, redis_url
):
    """kombu's Redis transport pops a message (BRPOP), then records it as unacked: a consumer
    killed in between takes it along. The queue is FIFO, so once a job sent later is claimed,
    an earlier job still queued with no unacked message has lost its message: it is re-sent."""
    import multiprocessing

    from shared.config import load_settings
    from shared.constants import PENDING_KEY, QUEUE
    from shared.crypto import generate_key
    from shared.queue import enqueue_parse, make_celery, unacked_job_ids
    from worker import process

    settings = load_settings(
        {"M2FP_REDIS_URL": redis_url, "M2FP_DATA_KEYS": f"k1:{generate_key()}"}
    )
    app = make_celery(settings)
    lost, held = create(store), create(store)
    enqueue_parse(app, lost)
    assert clean_redis.rpop(QUEUE) is not None  # popped by a consumer that died at once
    enqueue_parse(app, held)
    child = multiprocessing.get_context("fork").Process(target=_take_and_die, args=(redis_url,))
    child.start()
    child.join(30)
    assert unacked_job_ids(clean_redis, older_than=0) == [held]  # taken, recorded, never acked
    sent: list[str] = []
    reaper = process.WorkerProcess(settings, requeue=sent.append)
    assert reaper.reap_once(store) == []  # nothing sent later was claimed: both may wait
    backdated = time.time() - 2 * process.VANISHED_MARGIN_SECONDS
    clean_redis.zadd(PENDING_KEY, {lost: backdated, held: backdated})
    later = create(store)
    enqueue_parse(app, later)
    app.close()
    assert store.claim(later, "live:1").outcome == "ok"
    # `held` is unacked (the unclaimed path re-sends it after UNCLAIMED_SECONDS), `lost` is gone
    assert reaper.reap_once(store) == [lost] and sent == [lost]
    assert reaper.reap_once(store) == [] and sent == [lost]  # re-sent now: not a candidate again
    assert store.claim(lost, "live:1").outcome == "ok"
    assert clean_redis.zscore(PENDING_KEY, lost) is None  # a claimed job leaves `pending`
