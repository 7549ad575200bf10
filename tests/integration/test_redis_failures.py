"""Redis going away, and Redis full: the service says so clearly and recovers by itself.

RESEARCH §4.3 adapted: with persistence off (by design: photos never reach disk), a Redis restart
drops every queued job; the gateway must answer 404 for them (never a job stuck in PENDING), the
workers must reconnect, and new jobs must run. A Redis at its memory limit must make a submission
fail fast with 503, not hang or 500.
"""

from __future__ import annotations

import pytest
import requests

from tests.conftest import make_service_env, start_redis, stop_redis
from tests.integration.conftest import StackFactory, photo_jpeg, poll_until, submit

pytestmark = pytest.mark.integration


def test_redis_restart_loses_jobs_loudly_and_the_stack_recovers(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis-restart"))
    factory = StackFactory(make_service_env(server["url"]), tmp_path_factory)
    try:
        stack = factory(workers=1)
        done = submit(stack, photo_jpeg(64, 64, seed=1)).json()
        assert poll_until(stack, done)["status"] == "done"
        stop_redis(server)  # Redis dies; nothing was persisted
        outage = submit(stack, photo_jpeg(64, 64, seed=2))
        assert outage.status_code == 503 and outage.json()["error"] == "unavailable"
        assert "Retry-After" in outage.headers
        assert requests.get(stack.base_url + "/readyz", timeout=10).status_code == 503
        server = start_redis(
            tmp_path_factory.mktemp("redis-restart"), server["port"], server["password"]
        )
        lost = requests.get(
            stack.base_url + done["status_url"],
            headers={"Authorization": f"Bearer {done['token']}"},
            timeout=10,
        )
        assert lost.status_code == 404  # gone, and said so: not "queued" forever
        stack.wait_ready(1, timeout=120)  # the worker reconnected and heartbeats
        after = submit(stack, photo_jpeg(64, 64, seed=3)).json()
        assert poll_until(stack, after, timeout=180)["status"] == "done"
    finally:
        factory.stop_all()
        stop_redis(server)


def test_full_redis_refuses_submissions_fast(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis-full"), None, None, "--maxmemory", "3mb")
    factory = StackFactory(make_service_env(server["url"]), tmp_path_factory)
    try:
        stack = factory(workers=0)
        replies = [submit(stack, photo_jpeg(1200, 900, seed=s)) for s in range(16)]
        codes = [reply.status_code for reply in replies]
        assert 202 in codes and codes[-1] == 503, codes
        refused = replies[-1]
        assert refused.json()["error"] == "unavailable" and "Retry-After" in refused.headers
        assert refused.elapsed.total_seconds() < 5
        assert requests.get(stack.base_url + "/healthz", timeout=5).status_code == 200
    finally:
        factory.stop_all()
        stop_redis(server)
