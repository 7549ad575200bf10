"""Chaos in small: the harness of bench/chaos.py on the real stack, under two minutes.

40 jobs at one a second to 2 workers (the test-only `tiny` network, random weights) while two
pool children and then one whole worker tree are SIGKILLed: every job ends done, or failed with
a public code; none is lost or expired, none produced twice or delivered twice, no 5xx. The
second test checks the checker: jobs dropped from a live stack are counted lost.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from bench.chaos import (
    Chaos,
    ChaosStack,
    Load,
    StackConfig,
    job_figures,
    run_load,
    unfinished_report,
    verdict,
)
from shared.constants import QUEUE
from tests.integration.conftest import photo_jpeg

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def chaos_stack(tmp_path):
    stack = ChaosStack(tmp_path, StackConfig(workers=2, concurrency=1))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_no_job_lost_or_delivered_twice_while_workers_die(chaos_stack):
    plan = {"every": 8, "kills": ["child", "child", "worker"], "restart_after": 3, "drain": 75}
    load, chaos = run_load(chaos_stack, jobs=40, rate=1.0, plan=plan)
    figures = job_figures(load, chaos_stack.events())
    assert [kill["kind"] for kill in chaos.kills] == plan["kills"]
    assert all(kill.get("pid", 1) for kill in chaos.kills), "a kill found no pool child"
    assert figures["admitted"] == 40, figures["refused_by_code"]
    # the whole figures (pytest's diff would cut the dict short), and for a job left unfinished
    # its record, its messages and its events: enough to tell which path dropped it
    report = {"figures": figures, "unfinished": unfinished_report(chaos_stack, load, chaos)}
    assert verdict(figures) == [], json.dumps(report, default=str)
    assert figures["done"] + sum(figures["failed_by_code"].values()) == 40


def test_the_harness_counts_dropped_jobs_as_lost(chaos_stack):
    """A stack that silently drops jobs (their queue messages deleted while the one worker is
    down, then the worker back, healthy) must fail the verdict as `lost`."""
    chaos_stack.kill_worker(1)
    chaos_stack.kill_worker(0)
    load = Load(chaos_stack.base_url, photo_jpeg(96, 96, seed=1), jobs=4, rate=4.0, drain=20)
    runner = threading.Thread(target=load.run)
    runner.start()
    time.sleep(2)  # every job submitted and queued
    client = redis.Redis.from_url(chaos_stack.redis.url)
    assert client.llen(QUEUE) == 4
    client.delete(QUEUE)
    client.close()
    chaos_stack.start_worker(0)
    runner.join(60)
    figures = job_figures(load, chaos_stack.events())
    assert figures["lost"] == 4
    assert "4 lost" in verdict(figures)
    # the report a failed verdict prints: each dropped job queued in Redis, with no message left
    report = unfinished_report(chaos_stack, load, Chaos())
    assert sorted(job["job_id"] for job in report["jobs"]) == sorted(j.job_id for j in load.records)
    assert all(job["record"]["status"] == "queued" for job in report["jobs"]), report
    assert all(job["messages"] == [] for job in report["jobs"]), report
