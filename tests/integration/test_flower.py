"""Flower, started as `make run` starts it: basic auth required, internal bind, no image data."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.conftest import REPO, free_port, stop_process, wait_for
from tests.integration.conftest import photo_jpeg, poll_until, submit

pytestmark = pytest.mark.integration


AUTH = ("ops", "correct-horse")


def start_flower(stack, port: int) -> subprocess.Popen:
    """Flower as `make run` starts it, for `stack`'s broker, with basic auth `AUTH`."""
    # The broker URL (with its password) by environment, never on the command line.
    env = dict(
        stack.env,
        FLOWER_BASIC_AUTH=":".join(AUTH),
        FLOWER_UNAUTHENTICATED_API="false",
        CELERY_BROKER_URL=stack.env["M2FP_REDIS_URL"],
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.flower_readonly",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            "--max_tasks=1000",
            "--enable_events=False",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_until_listening(base: str) -> None:
    """Wait for Flower to serve, then to have heard the worker's own events.

    Flower only learns a task's name and argument from the task-received event; a task finished
    before Flower subscribed to the event stream shows up bare. So submit only once Flower has
    heard the worker's own events: it is listening.
    """

    def up():
        try:
            return requests.get(base + "/healthcheck", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def listening():
        reply = requests.get(base + "/workers", params={"json": 1}, auth=AUTH, timeout=5)
        return reply.status_code == 200 and any(w.get("status") for w in reply.json()["data"])

    wait_for(up, 60, what="flower")
    wait_for(listening, 60, what="flower to hear the worker's events")


def test_flower_requires_auth_and_shows_only_job_ids(stack_factory):
    stack = stack_factory(workers=1)
    port = free_port()
    flower = start_flower(stack, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_listening(base)
        job = submit(stack, photo_jpeg(96, 96, seed=11)).json()
        poll_until(stack, job)
        assert requests.get(base + "/", timeout=5).status_code == 401
        assert requests.get(base + "/api/tasks", timeout=5).status_code == 401
        assert requests.get(base + "/", auth=("ops", "wrong"), timeout=5).status_code == 401

        def task_seen():
            reply = requests.get(base + "/api/tasks", auth=AUTH, timeout=5)
            return reply.json() if reply.status_code == 200 and reply.json() else None

        tasks = wait_for(task_seen, 60, what="flower to see the task")
        shown = " ".join(str(task) for task in tasks.values())
        assert job["job_id"] in shown  # the argument is the id...
        assert job["token"] not in shown  # ...and nothing else of value
        assert "JFIF" not in shown and "base64" not in shown
        page = requests.get(base + "/tasks", auth=AUTH, timeout=5)
        assert page.status_code == 200
    finally:
        # Flower can lose its SIGTERM's SystemExit (raised inside a weakref callback): kill after a grace.
        stop_process(flower)
