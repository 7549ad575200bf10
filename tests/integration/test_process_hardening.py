"""The real gateway and worker processes harden themselves (shared.hardening), not only under
`make run`: no core dumps in the gunicorn master and workers, the worker's parent and its pool children;
each pool child runs under its memory limit, and an outlier job over it fails `out_of_memory`
alone: that child then leaves the pool gracefully (its heap is left fragmented,
worker/retirement.py) and a fresh, equally hardened child serves the next job."""

from __future__ import annotations

import io
import resource
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.integration.conftest import photo_jpeg, poll_until, submit

pytestmark = pytest.mark.integration


def _limit(pid: int, name: str) -> tuple[str, str]:
    line = next(
        line
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
        if line.startswith(name)
    )
    return tuple(line[len(name) :].split()[:2])


@pytest.fixture
def core_dumps_allowed():
    """Lift this process's soft core limit, so what the children show is their own doing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


# The pool child's limit here: over what a fresh child needs for its first ordinary job with a
# margin, under what the outlier needs. A bare process's VmData after its first job (a 96x64 photo,
# the network at 640x960) measured 1346-1421 MB across runs and trees on run L's Zen 4, and the
# pool child carries Celery on top: at 1500 MB that job failed `out_of_memory` once in a full suite.
CHILD_LIMIT_MB = 1800


def test_processes_harden_themselves_and_an_outlier_fails_alone(core_dumps_allowed, stack_factory):
    stack = stack_factory(
        workers=1, M2FP_CHILD_MEMORY_LIMIT_MB=str(CHILD_LIMIT_MB), M2FP_MAX_DECODE_MB="200"
    )
    gunicorn_workers = psutil.Process(stack.gateway.pid).children()
    worker = psutil.Process(stack.workers[0].pid)
    pool = [psutil.Process(pid) for pid in stack.child_pids()]  # from their heartbeats
    assert gunicorn_workers and pool
    assert all(worker in child.parents() for child in pool)
    for process in [
        psutil.Process(stack.gateway.pid),
        *gunicorn_workers,
        worker,
        *pool,
    ]:  # master too
        assert _limit(process.pid, "Max core file size") == ("0", "0"), process.cmdline()
    _assert_hardened(pool)

    # 40 MP of flat RGBA: a small PNG within every upload limit and the decode budget (160 MB
    # decoded), but decoding, compositing and parsing it needs more than CHILD_LIMIT_MB in all.
    big = io.BytesIO()
    Image.fromarray(np.full((6300, 6300, 4), 128, np.uint8)).save(big, format="PNG")
    job = submit(stack, big.getvalue(), "big.png").json()
    failed = poll_until(stack, job, timeout=300)
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory", failed
    small = submit(stack, photo_jpeg(96, 64, seed=3)).json()
    outcome = poll_until(stack, small, timeout=180)
    assert outcome["status"] == "done", (outcome, stack.log("worker1")[-3000:])

    # The child that ran out left after reporting its job (no lost worker, no redelivery), and
    # the pool forked a new one, hardened like the first, which did the small job.
    _wait_gone(pool)
    log = stack.log("worker1")
    assert '"child_retiring"' in log and "WorkerLostError" not in log, log[-3000:]
    assert worker.is_running()
    fresh = [psutil.Process(pid) for pid in stack.child_pids()]
    assert fresh and not {child.pid for child in fresh} & {child.pid for child in pool}
    _assert_hardened(fresh)
    assert all(worker in child.parents() for child in fresh)


def _assert_hardened(children: list[psutil.Process]) -> None:
    for child in children:
        assert _limit(child.pid, "Max core file size") == ("0", "0")
        assert _limit(child.pid, "Max data size")[0] == str(CHILD_LIMIT_MB << 20)  # soft limit


def _wait_gone(children: list[psutil.Process], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
            return
        time.sleep(0.2)
    raise AssertionError("the child that ran out of memory is still running")
