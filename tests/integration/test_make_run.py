"""`make run`'s stack (scripts/stack.py) as a person runs it: everything up, a photo parsed,
Flower behind auth, untrained weights announced, and Ctrl-C stops every process it started; no
secret on any process's command line, no core dumps; a SIGKILLed worker is restarted while the
rest serves, and a dead Redis stops the whole stack loudly."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import requests

from tests.conftest import REPO, free_port, wait_for
from tests.integration.conftest import Stack, photo_jpeg, poll_until, submit

pytestmark = pytest.mark.integration


def _start_stack(tmp_path, **extra: str):
    """scripts/stack.py as `make run` runs it, with free ports, its core limit raised first.

    The test process lifts its own soft RLIMIT_CORE to the hard limit for the child, so a core
    limit of 0 seen in the stack's processes is the stack's doing, not an inherited default.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    port = free_port()
    env.update(
        M2FP_PORT=str(port),
        M2FP_REDIS_PORT=str(free_port()),
        M2FP_FLOWER_PORT=str(free_port()),
        M2FP_WORKER_METRICS_PORT=str(free_port()),
        M2FP_WORKERS="1",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        **extra,
    )
    log = open(tmp_path / "stack.log", "wb")  # noqa: SIM115  (closed by the caller)
    # The child inherits the limit at fork: lift ours around the spawn (no preexec_fn, which is
    # unsafe in a process with threads), then put it back.
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        proc = subprocess.Popen(
            [sys.executable, "scripts/stack.py"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    return proc, env, f"http://127.0.0.1:{port}", log


def _ready(proc, tmp_path, base, timeout=180):
    def ready():
        if proc.poll() is not None:
            pytest.fail((tmp_path / "stack.log").read_text()[-3000:])
        try:
            reply = requests.get(base + "/readyz", timeout=2)
        except requests.ConnectionError:
            return None
        return (
            reply.json()
            if reply.status_code == 200 and reply.json().get("workers", 0) >= 1
            else None
        )

    return wait_for(ready, timeout, interval=0.5, what="make run's stack")


def _worker_parent(stack_pid: int) -> psutil.Process:
    """The `python -m worker` process the stack started (a direct child of the stack)."""
    workers = [c for c in psutil.Process(stack_pid).children() if "worker" in c.cmdline()[1:3]]
    assert len(workers) == 1, [c.cmdline() for c in psutil.Process(stack_pid).children()]
    return workers[0]


def _core_limit(pid: int) -> tuple[str, str]:
    line = next(
        line
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
        if line.startswith("Max core file size")
    )
    return tuple(line.split()[4:6])


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_stack_runs_and_stops_cleanly(tmp_path, stop_signal):
    proc, env, base, log = _start_stack(tmp_path)
    try:
        readiness = _ready(proc, tmp_path, base)
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
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _stack_secrets(gateway_pid: int, tmp_path) -> list[str]:
    """The secrets the stack generated, read (as root) from the gateway's environment and the
    stack's log, and the flags that would carry one."""
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{gateway_pid}/environ").read_bytes().decode().split("\0")
        if "=" in item
    )
    redis_password = urlparse(environ["M2FP_REDIS_URL"]).password
    data_key = environ["M2FP_DATA_KEYS"].split(":", 1)[1]
    log = (tmp_path / "stack.log").read_text()
    flower_password = re.search(r"password (\S+)", log).group(1)
    return [redis_password, data_key, flower_password, "redis://", "requirepass", "--pass"]


def _assert_no_secret_on_a_command_line_and_no_cores(processes, secrets_: list[str]) -> None:
    """No process of the stack has a secret on its command line, and none may dump core."""
    for child in processes:
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().decode(errors="replace")
        for secret in secrets_:
            assert secret not in cmdline, (child.pid, cmdline.replace("\0", " ")[:200])
        # every process of the stack, Redis and Flower included: no core file, ever
        assert _core_limit(child.pid) == ("0", "0"), (child.pid, child.cmdline())


def _assert_a_killed_worker_is_restarted(proc, env, tmp_path, base) -> None:
    """SIGKILL the worker (its own pid, from the stack's children): the stack restarts it while
    the rest serves on, and a job queued meanwhile is done by the replacement."""
    worker = _worker_parent(proc.pid)
    os.kill(worker.pid, signal.SIGKILL)
    stack = Stack(env=env, logdir=tmp_path, base_url=base)
    wait_for(
        lambda: "restarting it in 1 s" in (tmp_path / "stack.log").read_text(),
        30,
        what="the stack to notice the dead worker",
    )
    assert proc.poll() is None
    assert requests.get(base + "/healthz", timeout=5).status_code == 200  # the rest serves on
    job = submit(stack, photo_jpeg(96, 64, seed=5)).json()  # queued meanwhile
    assert poll_until(stack, job)["status"] == "done"
    replacement = _worker_parent(proc.pid)
    assert replacement.pid != worker.pid and replacement.is_running()


def _assert_a_dead_redis_stops_the_stack(proc, children, tmp_path) -> None:
    """Redis is critical: its death stops the whole stack, loudly, with status 1."""
    redis_server = next(
        c for c in psutil.Process(proc.pid).children() if "redis-server" in c.name()
    )
    os.kill(redis_server.pid, signal.SIGKILL)
    assert proc.wait(90) == 1
    output = (tmp_path / "stack.log").read_text()
    assert "redis" in output and "stopping the whole stack" in output
    _, alive = psutil.wait_procs(children, timeout=30)
    assert [p for p in alive if p.is_running()] == []


def test_no_secret_on_a_command_line_no_core_dumps_and_a_dead_worker_is_restarted(tmp_path):
    proc, env, base, log = _start_stack(tmp_path)
    try:
        _ready(proc, tmp_path, base)
        children = psutil.Process(proc.pid).children(recursive=True)
        gateway = next(c for c in children if "gunicorn" in " ".join(c.cmdline()))
        _assert_no_secret_on_a_command_line_and_no_cores(
            [psutil.Process(proc.pid), *children], _stack_secrets(gateway.pid, tmp_path)
        )
        _assert_a_killed_worker_is_restarted(proc, env, tmp_path, base)
        _assert_a_dead_redis_stops_the_stack(proc, children, tmp_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
