"""`make run`'s stack (scripts/stack.py) as a person runs it: everything up, a photo parsed,
Flower behind auth, untrained weights announced, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
import requests

from tests.conftest import REPO, free_port, wait_for
from tests.integration.conftest import Stack, photo_jpeg, poll_until, submit

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_stack_runs_and_stops_cleanly(tmp_path, stop_signal):
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    port = free_port()
    env.update(M2FP_PORT=str(port), M2FP_REDIS_PORT=str(free_port()), M2FP_FLOWER_PORT=str(free_port()),
               M2FP_WORKER_METRICS_PORT=str(free_port()), M2FP_WORKERS="1",
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    log = open(tmp_path / "stack.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "scripts/stack.py"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            if proc.poll() is not None:
                pytest.fail((tmp_path / "stack.log").read_text()[-3000:])
            try:
                reply = requests.get(base + "/readyz", timeout=2)
            except requests.ConnectionError:
                return None
            return reply.json() if reply.status_code == 200 else None

        readiness = wait_for(ready, 180, interval=0.5, what="make run's stack")
        assert readiness["untrained"] is True and readiness["warnings"]
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        for part in ("redis-server", "-m worker", "gunicorn", "flower"):
            assert part in names, part
        stack = Stack(env=env, logdir=tmp_path, base_url=base)
        job = submit(stack, photo_jpeg(128, 96)).json()
        assert poll_until(stack, job)["status"] == "done"
        flower = requests.get(f"http://127.0.0.1:{env['M2FP_FLOWER_PORT']}/", timeout=5)
        assert flower.status_code == 401
        output = (tmp_path / "stack.log").read_text()
        assert "UNTRAINED MODEL" in output and "password" in output
        proc.send_signal(stop_signal)
        assert proc.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
