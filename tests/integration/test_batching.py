"""Batching mode end to end on CPU: real redis-server, real gateway, a real batching worker.

The worker runs `M2FP_BATCHING=on` (Celery's threads pool, one process, worker/batching.py) with
the test-only tiny network. Eight jobs submitted at once all end done, at least one result says
it shared its forward (`timings.batch_size` > 1), and every label map equals the one of the same
image run alone (fp32, images of one padded size). A job withdrawn while it waits in a batch is
discarded alone. A worker SIGKILLed while a batch waits loses no job: each is requeued (a
second attempt) and ends done.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
import requests
from PIL import Image

from shared.constants import job_key
from tests.conftest import make_service_env, wait_for
from tests.integration.conftest import StackFactory, poll_until, submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH_ENV = {
    "M2FP_VARIANT": "tiny",
    "M2FP_TEST_NETWORK": "1",
    "M2FP_WEIGHTS": "random",
    "M2FP_PRECISION": "fp32",
    "M2FP_BATCHING": "on",
    "M2FP_GPU_BATCH": "8",
    # Long enough that jobs submitted one after another meet in one batch on 2 shared cores.
    "M2FP_BATCH_WAIT_MS": "3000",
    "M2FP_DEVICE": "cpu",
}


def photo_png(seed: int, width: int = 160, height: int = 120) -> bytes:
    """A noisy PNG (lossless, so the worker decodes exactly these pixels)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def auth(job: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {job['token']}"}


def submit_all(stack, images: list[bytes]) -> list[dict]:
    with ThreadPoolExecutor(len(images)) as pool:
        replies = list(pool.map(lambda data: submit(stack, data, "photo.png"), images))
    assert [reply.status_code for reply in replies] == [202] * len(images)
    return [reply.json() for reply in replies]


def wait_running(stack, jobs: list[dict]) -> redis.Redis:
    """Wait until every job is claimed (decoded, waiting for or in its batch)."""
    client = redis.Redis.from_url(stack.env["M2FP_REDIS_URL"])
    keys = [job_key(job["job_id"]) for job in jobs]
    wait_for(
        lambda: all(client.hget(key, "status") == b"running" for key in keys),
        30,
        what="every job to be claimed",
    )
    return client


def label_map(document: dict) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(document["label_map_png"]))))


@pytest.fixture(scope="module")
def batch_stack(redis_server, tmp_path_factory):
    factory = StackFactory(make_service_env(redis_server["url"]), tmp_path_factory)
    try:
        yield factory(**BATCH_ENV)
    finally:
        factory.stop_all()


def test_readyz_and_start_log_report_batching(batch_stack):
    ready = requests.get(batch_stack.base_url + "/readyz", timeout=10).json()
    assert ready["batching"] == {"workers": 1, "max_batch": 8}
    log = batch_stack.log("worker1")
    assert '"event":"worker_mode"' in log and '"batching":true' in log


def test_jobs_submitted_at_once_share_forwards_and_match_one_at_a_time(batch_stack, monkeypatch):
    images = [photo_png(seed) for seed in range(8)]
    jobs = submit_all(batch_stack, images)
    finals = [poll_until(batch_stack, job, timeout=120) for job in jobs]
    assert [final["status"] for final in finals] == ["done"] * 8, finals
    documents = [
        requests.get(batch_stack.base_url + job["result_url"], headers=auth(job), timeout=30).json()
        for job in jobs
    ]
    sizes = [document["timings"]["batch_size"] for document in documents]
    assert max(sizes) > 1, sizes
    metrics = requests.get(batch_stack.worker_metrics_url, timeout=10).text
    forwards = re.search(r"^m2fp_worker_batch_size_sum (\S+)$", metrics, re.MULTILINE)
    assert forwards and float(forwards[1]) >= 8  # every job was in a recorded forward
    monkeypatch.setenv("M2FP_PRECISION", "fp32")
    from worker.weights import load_predictor

    alone = load_predictor("random", variant="tiny", device="cpu", max_side=1920)
    for image, document in zip(images, documents, strict=True):
        expected = alone.predict(np.array(Image.open(io.BytesIO(image)).convert("RGB")))
        assert np.array_equal(label_map(document), expected.label_map)  # 100 % of the pixels


def test_a_withdrawn_job_in_a_batch_is_discarded_alone(batch_stack):
    jobs = submit_all(batch_stack, [photo_png(seed) for seed in range(10, 14)])
    wait_running(batch_stack, jobs)  # all four wait in one batch (3 s window, room for 8)
    withdrawn = jobs[1]
    reply = requests.delete(
        batch_stack.base_url + withdrawn["status_url"], headers=auth(withdrawn), timeout=10
    )
    assert reply.status_code == 204
    others = [job for job in jobs if job is not withdrawn]
    assert [poll_until(batch_stack, job, timeout=120)["status"] for job in others] == ["done"] * 3
    gone = requests.get(
        batch_stack.base_url + withdrawn["status_url"], headers=auth(withdrawn), timeout=10
    )
    assert gone.status_code == 404
    wait_for(lambda: "job_discarded" in batch_stack.log("worker1"), 30, what="the discard")


def test_a_worker_killed_mid_batch_loses_no_job(stack_factory):
    stack = stack_factory(**BATCH_ENV)
    jobs = submit_all(stack, [photo_png(seed) for seed in range(20, 24)])
    client = wait_running(stack, jobs)
    victim = stack.workers[0]
    os.killpg(victim.pid, signal.SIGKILL)  # the whole worker: one process holds every job
    victim.wait(10)
    killed = time.time()
    stack.start_worker()  # its reaper requeues the dead worker's claims once its heartbeat lapses
    finals = [poll_until(stack, job, timeout=150) for job in jobs]
    assert [final["status"] for final in finals] == ["done"] * 4, finals
    attempts = [int(client.hget(job_key(job["job_id"]), "attempts")) for job in jobs]
    assert attempts == [2] * 4
    requeued = [float(client.hget(job_key(job["job_id"]), "requeued")) for job in jobs]
    assert max(requeued) - killed <= 60
    assert "jobs_of_dead_workers_requeued" in stack.all_logs()


def test_a_job_past_its_soft_limit_in_a_batch_fails_timeout_alone(stack_factory):
    """Celery enforces no time limit in a threads pool: the worker's own deadline does."""
    stack = stack_factory(**{**BATCH_ENV, "M2FP_SOFT_TIME_LIMIT": "1"})
    job = submit_all(stack, [photo_png(30)])[0]  # waits 3 s for company: past its 1 s limit
    final = poll_until(stack, job, timeout=60)
    assert final["status"] == "failed" and final["error"]["code"] == "timeout", final
    # The job thread gave up alone: the worker process lives on.
    assert stack.workers[0].poll() is None
    assert '"code":"timeout"' in stack.log("worker1")
