"""A Redis error inside a running job: the message is requeued, not acked, so the job ends in a
clear state (here: rerun and done on its second attempt) instead of `running` until its TTL.

The job's result store fails for real: while the worker parses the photo, the test sets Redis's
maxmemory to 1 byte, so the worker's write of the result is refused with OOM (noeviction); once
the worker has logged the error, the limit is lifted within the 2 s pause before the requeue.
"""

from __future__ import annotations

import pytest
import redis
import requests

from shared.constants import job_key
from tests.conftest import make_service_env, start_redis, stop_redis, wait_for
from tests.integration.conftest import StackFactory, photo_jpeg, submit

pytestmark = pytest.mark.integration


def test_redis_error_mid_job_requeues_and_the_job_completes(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis-error"))
    factory = StackFactory(make_service_env(server["url"]), tmp_path_factory)
    try:
        stack = factory(workers=1)
        admin = redis.Redis.from_url(stack.env["M2FP_REDIS_URL"], decode_responses=True)
        job = submit(stack, photo_jpeg(1024, 1024, seed=9)).json()
        key = job_key(job["job_id"])
        wait_for(
            lambda: admin.hget(key, "status") == "running",
            120,
            interval=0.05,
            what="the job to run",
        )
        admin.config_set("maxmemory", 1)  # every write is refused from now
        try:
            wait_for(
                lambda: "redis_error_during_job" in stack.log("worker1"),
                120,
                interval=0.1,
                what="the worker to hit the Redis error",
            )
        finally:
            admin.config_set("maxmemory", 0)
        wait_for(
            lambda: admin.hget(key, "status") in ("done", "failed"),
            180,
            interval=0.25,
            what="the job to end (without the fix it stays 'running')",
        )
        status, attempts, error = admin.hmget(key, "status", "attempts", "error_code")
        assert (status, attempts) == ("done", "2"), (status, attempts, error)
        reply = requests.get(
            stack.base_url + job["result_url"],
            timeout=30,
            headers={"Authorization": f"Bearer {job['token']}"},
        )
        assert reply.status_code == 200 and reply.json()["width"] == 1024
    finally:
        factory.stop_all()
        stop_redis(server)
