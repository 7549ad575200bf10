"""The real stack for integration tests: redis-server, Celery worker processes, gunicorn gateway.

Nothing is faked: workers are `python -m worker` processes running the real M2FP network (random
weights, asked for explicitly), the gateway is gunicorn serving `api.wsgi:app`, and they talk
through the session's real redis-server. `live_stack` is shared by a test module; tests that
need to stop, kill or delay workers build their own with `StackFactory`.

The gateway without processes: `make_app(**env)` builds the Flask app in this process on the
session's real Redis with a real Celery producer (`shared.queue.make_celery`), from an env dict
through `load_settings` (never by hand); `app` and `client` are the default one and its test
client. Tests drive it with Flask's test client and the helpers of tests/helpers.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from api import create_app
from shared.config import load_settings
from shared.crypto import generate_key
from shared.queue import make_celery
from tests.conftest import REPO, free_port, make_service_env, stop_process, wait_for
from tests.helpers import METRICS_TOKEN

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
STACK_ENV = {
    "M2FP_WEIGHTS": "random",
    "M2FP_SUBMIT_LIMIT": "1000/minute",
    "M2FP_SUBMIT_ATTEMPT_LIMIT": "1000/minute",
    "M2FP_MAX_JOBS_PER_CLIENT": "100",
    "M2FP_POLL_LIMIT": "100000/minute",
    "M2FP_BAN_AFTER": "0",
    "M2FP_TORCH_THREADS": "2",
    "M2FP_INFER_MAX_SIDE": "1920",
}


@dataclass
class Stack:
    """Handles on the processes of one test stack and its logs."""

    env: dict[str, str]
    logdir: Path
    base_url: str = ""
    workers: list[subprocess.Popen] = field(default_factory=list)
    gateway: subprocess.Popen | None = None
    _logs: list = field(default_factory=list)

    @property
    def worker_metrics_url(self) -> str:
        """The /metrics URL of the most recently started worker."""
        return f"http://127.0.0.1:{self.env['M2FP_WORKER_METRICS_PORT']}/metrics"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115  (closed in stop())
        self._logs.append(log)
        return subprocess.Popen(
            argv,
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_gateway(self) -> None:
        """Start gunicorn on a free port and wait for /healthz."""
        port = free_port()
        self.env["M2FP_PORT"] = str(port)
        self.base_url = f"http://127.0.0.1:{port}"
        self.gateway = self._spawn(
            "gateway",
            [sys.executable, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api.wsgi:app"],
        )

        def healthy():
            if self.gateway.poll() is not None:
                pytest.fail(f"gateway exited: {self.log('gateway')[-2000:]}")
            try:
                return requests.get(self.base_url + "/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(healthy, 30, what="the gateway")

    def start_worker(self, preflight: bool = False) -> subprocess.Popen:
        """Start one `python -m worker` process (its pool child loads the model)."""
        index = len(self.workers) + 1
        argv = [sys.executable, "-m", "worker"] + ([] if preflight else ["--no-preflight"])
        argv += ["--", "--hostname", f"test{index}-{os.getpid()}@%h"]
        self.env["M2FP_WORKER_METRICS_PORT"] = str(free_port())
        proc = self._spawn(f"worker{index}", argv)
        self.workers.append(proc)
        return proc

    def wait_ready(self, workers: int = 1, timeout: float = 180) -> dict:
        """Wait until /readyz reports at least `workers` live workers."""

        def ready():
            for proc in self.workers:
                if proc.poll() is not None:
                    pytest.fail(f"worker exited: {self.log('worker1')[-3000:]}")
            try:
                reply = requests.get(self.base_url + "/readyz", timeout=2)
            except requests.ConnectionError:
                return None
            body = reply.json()
            return body if reply.status_code == 200 and body.get("workers", 0) >= workers else None

        return wait_for(ready, timeout, interval=0.5, what="workers to be ready")

    def child_pids(self) -> list[int]:
        """PIDs of the workers' pool children (where the model runs)."""
        from shared import heartbeat

        client = redis.Redis.from_url(self.env["M2FP_REDIS_URL"])
        return [beat.pid for beat in heartbeat.live(client) if beat.pid]

    def stop_workers(self) -> None:
        """Warm-stop every worker (SIGTERM to its process group)."""
        for proc in self.workers:
            _terminate(proc)
        self.workers.clear()

    def log(self, name: str) -> str:
        """The captured output of one process."""
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        """Every captured log of this stack, concatenated."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("*.log")))

    def stop(self) -> None:
        """Stop everything this stack started."""
        self.stop_workers()
        if self.gateway is not None:
            _terminate(self.gateway)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.env.get("PROMETHEUS_MULTIPROC_DIR", ""), ignore_errors=True)


def _terminate(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


_databases = itertools.cycle(range(1, 16))


class StackFactory:
    """Builds stacks on the session's Redis with per-test environment overrides.

    Each stack gets its own Redis database (1..15, flushed first), so a module's long-lived
    stack and a test's own stack never consume each other's queue.
    """

    def __init__(self, service_env: dict[str, str], tmp_path_factory):
        self.base_env = {**service_env, **STACK_ENV}
        self.tmp = tmp_path_factory
        self.stacks: list[Stack] = []

    def __call__(self, *, workers: int = 1, wait: bool = True, **overrides: str) -> Stack:
        url = self.base_env["M2FP_REDIS_URL"].rsplit("/", 1)[0] + f"/{next(_databases)}"
        redis.Redis.from_url(url).flushdb()
        env = {**self.base_env, "M2FP_REDIS_URL": url, **overrides}
        stack = Stack(env=env, logdir=self.tmp.mktemp("stack"))
        # Metrics files live in memory (tmpfs), as under `make run`.
        stack.env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="m2fp-test-prom-", dir=SHM)
        self.stacks.append(stack)
        stack.start_gateway()
        for _ in range(workers):
            stack.start_worker()
        if wait and workers:
            stack.wait_ready(workers)
        return stack

    def stop_all(self) -> None:
        for stack in self.stacks:
            stack.stop()


@pytest.fixture
def stack_factory(service_env, tmp_path_factory, redis_server):
    """Make stacks for one test; stops everything afterwards."""
    factory = StackFactory(service_env, tmp_path_factory)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def live_stack(redis_server, tmp_path_factory):
    """One running stack (1 worker, random weights) shared by a test module."""
    factory = StackFactory(make_service_env(redis_server["url"]), tmp_path_factory)
    stack = factory()
    yield stack
    factory.stop_all()


# --- the gateway app in this process, on the session's Redis --------------------------------
@pytest.fixture
def make_app(redis_url, clean_redis):
    """Factory: make_app(M2FP_SUBMIT_LIMIT="2/minute", ...) -> a gateway app on the test Redis."""
    made = []

    def factory(**overrides: str):
        env = {
            "M2FP_REDIS_URL": redis_url,
            "M2FP_DATA_KEYS": f"k1:{generate_key()}",
            "M2FP_SUBMIT_LIMIT": "1000/minute",
            "M2FP_POLL_LIMIT": "1000/minute",
            "M2FP_SUBMIT_ATTEMPT_LIMIT": "1000/minute",
            "M2FP_BAN_AFTER": "0",
            "M2FP_METRICS_TOKEN": METRICS_TOKEN,
        }
        env.update(overrides)
        settings = load_settings(env)
        celery_app = make_celery(settings)
        app = create_app(settings, celery_app=celery_app)
        made.append(app)
        return app

    yield factory
    for app in made:
        gw = app.extensions["m2fp"]
        gw.celery.close()
        gw.redis.close()
        gw.redis.connection_pool.disconnect()


@pytest.fixture
def app(make_app):
    """A gateway app (limits raised and bans off, so tests are not throttled)."""
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@contextlib.contextmanager
def nginx_proxy(tmp_path: Path, gateway_port: int | str):
    """deploy/nginx.conf as shipped, run by Debian's nginx on loopback in front of a gateway.

    Only the addresses change: listen ports, the upstream, the certificate and the /tmp paths
    (which become `tmp_path`). Yields (https_base_url, http_port, https_port); stops nginx by pid.
    """
    import requests as _requests
    import urllib3

    from bench.load_bench import render_nginx_conf

    http_port, https_port = free_port(), free_port()
    render_nginx_conf(tmp_path, http_port, https_port, gateway_port)
    proc = subprocess.Popen(
        [
            NGINX,
            "-c",
            str(tmp_path / "nginx.conf"),
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            "daemon off;",
        ],
        stderr=subprocess.PIPE,
    )
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    https = f"https://127.0.0.1:{https_port}"
    try:

        def up():
            if proc.poll() is not None:
                pytest.fail(f"nginx exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                return _requests.get(https + "/healthz", verify=False, timeout=2).status_code == 200
            except _requests.ConnectionError:
                return False

        wait_for(up, 20, what="nginx")
        yield https, http_port, https_port
    finally:
        stop_process(proc)
        proc.stderr.close()  # unread once nginx served; an unclosed pipe is a ResourceWarning


def submit(stack: Stack, data: bytes, filename: str = "photo.jpg", **kwargs) -> requests.Response:
    """POST /v1/jobs with one file."""
    return requests.post(
        stack.base_url + "/v1/jobs", files={"image": (filename, data)}, timeout=30, **kwargs
    )


def poll_until(
    stack: Stack, job: dict, statuses=("done", "failed", "expired"), timeout=240
) -> dict:
    """Poll a job's status URL until it reaches one of `statuses`."""
    headers = {"Authorization": f"Bearer {job['token']}"}

    def reached():
        body = requests.get(stack.base_url + job["status_url"], headers=headers, timeout=10).json()
        return body if body.get("status") in statuses else None

    return wait_for(reached, timeout, interval=0.25, what=f"job to reach {statuses}")


def photo_jpeg(width: int = 512, height: int = 512, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth background, two person-shaped figures, sensor noise."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([120 + 60 * x / width, 140 + 40 * y / height, 170 - 50 * x / width], axis=2)
    image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    for index, cx in enumerate((width * 0.3, width * 0.68)):
        scale = height / 512
        draw.ellipse(
            [cx - 28 * scale, 60 * scale, cx + 28 * scale, 125 * scale], fill=(224, 172, 140)
        )
        draw.rectangle(
            [cx - 55 * scale, 130 * scale, cx + 55 * scale, 290 * scale],
            fill=((200, 30, 40), (30, 60, 190))[index],
        )
        draw.rectangle(
            [cx - 50 * scale, 290 * scale, cx + 50 * scale, 460 * scale], fill=(40, 40, 60)
        )
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@contextlib.contextmanager
def tiny_worker_loaded(settings_env: dict[str, str], redis_client, caplog, **env: str):
    """A pool child's model load (tiny random network, `env` on top of `settings_env`) against
    the test Redis; yields (its `model_loaded` log record, its heartbeat's fields), then stops."""
    import dataclasses
    import logging

    from shared.constants import worker_key
    from shared.jobstore import JobStore
    from worker.process import WorkerProcess

    settings = dataclasses.replace(
        load_settings({**settings_env, **env}), weights="random", variant="tiny"
    )
    process = WorkerProcess(settings)
    process.store = JobStore.from_settings(settings, client=redis_client)
    with caplog.at_level(logging.INFO, logger="worker.process"):
        process._load_model()
    try:
        assert process.load_error is None, process.load_error
        loaded = [record for record in caplog.records if record.getMessage() == "model_loaded"]
        assert loaded, "no model_loaded event"
        fields = wait_for(
            lambda: redis_client.hgetall(worker_key(process.name)), timeout=10, what="the heartbeat"
        )
        yield loaded[0], fields
    finally:
        process.stop()
