"""Fixtures shared by every test speed.

- `settings_env` / `settings`: a complete, valid environment (fresh keyring) for unit tests.
- `redis_server`: a real `redis-server` on a free loopback port, with a password and no
  persistence, started once per session (integration tests). `redis_url` is its URL; each test
  that asks for `clean_redis` gets it flushed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from scripts import redis_server as redis_helper
from shared.config import load_settings
from shared.crypto import generate_key
from tests.helpers import METRICS_TOKEN

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM one process we started (by its pid), SIGKILL it if it outlives `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def settings_env(tmp_path) -> dict[str, str]:
    """A minimal valid environment for load_settings()."""
    return {
        "M2FP_REDIS_URL": "redis://:secret-password@127.0.0.1:6399/0",
        "M2FP_DATA_KEYS": f"k1:{generate_key()}",
    }


@pytest.fixture
def settings(settings_env):
    return load_settings(settings_env)


def start_redis(
    workdir: Path, port: int | None = None, password: str | None = None, *extra: str
) -> dict:
    """Start a real redis-server with the helper `make run` uses (scripts/redis_server.py):
    password, loopback, no persistence, config on stdin; `extra` are its arguments."""
    try:
        server = redis_helper.start(workdir, port=port, password=password, args=extra)
    except redis_helper.RedisServerError as exc:
        pytest.fail(f"{exc}; .ci/run installs it")
    return server.as_dict()


def stop_redis(server: dict) -> None:
    """Stop a server started by start_redis."""
    stop_process(server["process"])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the session."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server["url"]


@pytest.fixture
def clean_redis(redis_server):
    """A Redis client on a flushed database."""
    client = redis.Redis.from_url(redis_server["url"])
    client.flushall()
    yield client
    client.close()


def make_service_env(redis_url: str) -> dict[str, str]:
    """Environment for processes of the stack (gateway, workers): this process's, minus any
    M2FP_* of the developer's, plus the test Redis and a fresh keyring."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    env.update(
        {
            "M2FP_REDIS_URL": redis_url,
            "M2FP_DATA_KEYS": f"k1:{generate_key()}",
            "M2FP_LOG_LEVEL": "INFO",
            "M2FP_METRICS_TOKEN": METRICS_TOKEN,
            "PYTHONPATH": str(REPO),
        }
    )
    return env


@pytest.fixture
def service_env(redis_url) -> dict[str, str]:
    return make_service_env(redis_url)
