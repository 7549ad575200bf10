"""The deployment files do what docs/SECURITY.md says, checked for real where this machine can.

- docker-compose.yml / Dockerfiles: every container non-root, read-only root filesystem, tmpfs
  /tmp, no capabilities; Redis and Flower not published beyond loopback; no torch in the gateway
  image. (No Docker engine runs here, so these are checked as configuration.)
- scripts/make_secrets.sh + deploy/redis.conf: a real redis-server with the generated ACL file:
  the default user is off, each role authenticates with its own password, and the job store and
  a Celery producer work as the gateway and worker users; healthcheck can only PING, with its
  generated password; Flower's user cannot PUBLISH (no remote control), CLIENT KILL/PAUSE,
  CONFIG, FLUSH* or touch a job key, and a real Flower still sees worker events with it.
- compose: mem_limit, pids_limit and no core dumps for every service; no secret on a command line.
- deploy/nginx.conf: a real nginx (Debian's) in front of a real gateway: HTTP redirects to HTTPS,
  no server version, and a client's X-Forwarded-For is replaced, so with M2FP_TRUSTED_PROXIES=1 a
  spoofed header still changes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import redis
import requests
import yaml

from shared.constants import FLOWER_ACL_RULES, QUEUE
from shared.crypto import hash_secret, new_job_id
from shared.jobstore import JobStore
from tests.conftest import REPO, free_port, stop_process, wait_for
from tests.helpers import metrics_headers
from tests.integration.conftest import NGINX, nginx_proxy, photo_jpeg

pytestmark = pytest.mark.integration


def test_compose_services_are_hardened():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        assert service.get("read_only") is True, name
        assert any(str(t).startswith("/tmp") for t in service.get("tmpfs", [])), name
        if name != "proxy":
            assert service.get("cap_drop") == ["ALL"], name
            assert "no-new-privileges:true" in service.get("security_opt", []), name
        for port in service.get("ports", []):
            if name != "proxy":
                assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "ports" not in compose["services"]["redis"]
    assert compose["networks"]["backend"]["internal"] is True
    assert compose["services"]["worker"]["volumes"] == ["./weights:/weights:ro"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_images_run_as_non_root(dockerfile):
    text = (REPO / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    if dockerfile == "Dockerfile.api":
        instructions = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert "torch" not in instructions and "worker/" not in instructions
        requirements = (REPO / "requirements/api.txt").read_text().splitlines()
        assert not [line for line in requirements if line.lower().startswith("torch")]


def test_redis_conf_has_no_persistence():
    conf = (REPO / "deploy/redis.conf").read_text()
    for line in (
        'save ""',
        "appendonly no",
        "maxmemory-policy noeviction",
        "aclfile /etc/redis/users.acl",
    ):
        assert line in conf


@pytest.fixture
def acl_redis(tmp_path):
    """redis-server with deploy/redis.conf and a users.acl from scripts/make_secrets.sh."""
    workdir = tmp_path / "deploy"
    shutil.copytree(REPO / "scripts", workdir / "scripts")
    subprocess.run(
        ["bash", str(workdir / "scripts/make_secrets.sh")],
        cwd=workdir,
        check=True,
        capture_output=True,
    )
    secrets = workdir / "secrets"
    port = free_port()
    conf = (REPO / "deploy/redis.conf").read_text()
    conf = conf.replace("bind 0.0.0.0", "bind 127.0.0.1").replace("port 6379", f"port {port}")
    conf = conf.replace("/etc/redis/users.acl", str(secrets / "users.acl")) + f"\ndir {tmp_path}\n"
    (tmp_path / "redis.conf").write_text(conf)
    proc = subprocess.Popen(
        ["redis-server", str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL
    )

    def url(role: str) -> str:
        return (
            (secrets / f"redis_url_{role}")
            .read_text()
            .strip()
            .replace("@redis:6379", f"@127.0.0.1:{port}")
        )

    def up():
        try:
            return redis.Redis.from_url(url("api")).ping()
        except redis.ConnectionError:
            return False

    wait_for(up, 10, what="redis with ACLs")
    yield port, url, secrets
    proc.terminate()
    proc.wait(10)


def job_store(client) -> JobStore:
    """A job store on `client` with short TTLs (the ACLs, not the TTLs, are under test)."""
    return JobStore(
        client,
        input_ttl=60,
        result_ttl=60,
        job_ttl=300,
        max_attempts=2,
        claim_input_ttl=120,
    )


def assert_the_roles_run_a_job(gateway, worker) -> None:
    """The gateway's and the worker's users together can create, claim, finish and fetch a job,
    and neither may run a @dangerous command."""
    job_id = new_job_id()
    job_store(gateway).create(
        job_id, token_hash=hash_secret("t"), key_id="k", wrapped_key=b"w", sealed_input=b"sealed"
    )
    assert job_store(worker).claim(job_id, "w1").outcome == "ok"
    assert job_store(worker).store_result(job_id, b"result")
    assert job_store(gateway).fetch_result(job_id).sealed_result == b"result"
    for client in (gateway, worker):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("FLUSHALL")  # @dangerous denied to every role


def assert_healthcheck_and_flower_cannot_read_jobs(port: int, url, secrets) -> None:
    """The healthcheck user (its generated password only) may ping and nothing more; Flower's may
    neither read nor write a job's keys, only see the queue."""
    with pytest.raises(redis.AuthenticationError):  # no more fixed healthcheck password
        redis.Redis(port=port, username="healthcheck", password="healthcheck").ping()
    health = redis.Redis(
        port=port,
        username="healthcheck",
        password=(secrets / "redis_healthcheck").read_text().strip(),
    )
    assert health.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.get("m2fp:job:x")
    flower = redis.Redis.from_url(url("flower"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.set("m2fp:in:x", b"y")  # Flower reads, never writes jobs
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.get("m2fp:in:x")
    assert flower.llen(QUEUE) == 0


def test_redis_acl_roles(acl_redis):
    port, url, secrets = acl_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()  # default user is off
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).get("m2fp:job:x")
    with pytest.raises(redis.AuthenticationError):  # a role's name with a wrong password
        redis.Redis(port=port, username="gateway", password="guess").ping()
    assert_the_roles_run_a_job(
        redis.Redis.from_url(url("api")), redis.Redis.from_url(url("worker"))
    )
    assert_healthcheck_and_flower_cannot_read_jobs(port, url, secrets)
    # make_secrets.sh leaves the files 0444 (each container's own non-root user reads its
    # bind-mounted secrets) inside a 0700 folder: the folder keeps the keyring from other users.
    assert secrets.stat().st_mode & 0o077 == 0
    assert (secrets / "data_keys").stat().st_mode & 0o777 == 0o444


def test_compose_limits_every_service_and_keeps_secrets_off_command_lines():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        assert service.get("mem_limit"), name  # an outlier fails alone, not Redis
        assert 0 < int(service.get("pids_limit", 0)) <= 1024, name
        assert service.get("ulimits", {}).get("core") == {"soft": 0, "hard": 0}, name
        text = yaml.safe_dump(service)
        assert "--broker" not in text and "--pass" not in text and "redis://" not in text, name
    health = " ".join(compose["services"]["redis"]["healthcheck"]["test"])
    assert "REDISCLI_AUTH" in health and "/run/secrets/redis_healthcheck" in health
    flower = " ".join(compose["services"]["flower"]["command"])
    assert "CELERY_BROKER_URL" in flower and "shared.flower_readonly" in flower
    assert "--enable_events=False" in flower
    # The checkpoint pin is required: compose stops with this message when it is unset.
    assert compose["services"]["worker"]["environment"]["M2FP_WEIGHTS_SHA256"].startswith(
        "${M2FP_WEIGHTS_SHA256:?"
    )


def test_flower_acl_is_read_only_for_real(acl_redis):
    _, url, secrets = acl_redis
    line = next(
        line
        for line in (secrets / "users.acl").read_text().splitlines()
        if line.startswith("user flower ")
    )
    assert line.split(" ", 4)[4] == FLOWER_ACL_RULES  # make run's Flower has the same rules
    flower = redis.Redis.from_url(url("flower"))
    refused = [
        ("PUBLISH", "/0.celery.pidbox", "{}"),  # Celery remote control (shutdown...)
        ("PUBLISH", "/0.celeryev/worker.heartbeat", "{}"),  # not even fake events
        ("CLIENT", "KILL", "ID", "1"),
        ("CLIENT", "PAUSE", "1000"),
        ("CLIENT", "LIST"),
        ("CONFIG", "GET", "*"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("KEYS", "*"),
        ("SHUTDOWN",),
        ("DEL", QUEUE),
        ("LPUSH", QUEUE, "x"),
        ("GET", "m2fp:job:x"),
        ("HGETALL", "m2fp:job:x"),
        ("SET", "m2fp:in:x", "y"),
        ("DEL", "_kombu.binding.m2fp"),
        ("ACL", "LIST"),
    ]
    for command in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            flower.execute_command(*command)
    control = flower.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):  # nor listen to the control channel
        control.psubscribe("/0.celery.pidbox")
        control.get_message(timeout=1)
    control.close()
    assert flower.llen(QUEUE) == 0  # what Flower needs: queue length,
    events = flower.pubsub()
    events.psubscribe("/0.celeryev/*")  # ...and the event stream
    assert events.get_message(timeout=2)["type"] == "psubscribe"
    events.close()


def start_readonly_flower(broker_url: str, port: int, log) -> subprocess.Popen:
    """shared.flower_readonly's Flower on `port` with basic auth ops:pw, events not enabled."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2FP_", "CELERY_"))}
    env.update(CELERY_BROKER_URL=broker_url, FLOWER_BASIC_AUTH="ops:pw", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.flower_readonly",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            "--enable_events=False",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def flower_lists_a_sent_task(base: str, worker_url: str):
    """A callable for wait_for: send a worker's heartbeat and a task-received event (as a worker
    does) with the worker's user, then whether Flower's /api/tasks lists that task."""
    from celery import Celery

    app = Celery("deploy-test", broker=worker_url, set_as_current=False)

    def task_seen():
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, hostname="w1@deploy", enabled=True)
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0)
            dispatcher.send(
                "task-received", uuid="t-deploy", name="m2fp.parse", args="['job']", kwargs="{}"
            )
        try:
            reply = requests.get(base + "/api/tasks", auth=("ops", "pw"), timeout=10)
        except requests.RequestException:  # a busy machine: ask again
            return False
        return reply.status_code == 200 and "t-deploy" in reply.json()

    return task_seen


def test_real_flower_sees_worker_events_with_its_read_only_user(acl_redis, tmp_path):
    _, url, _ = acl_redis
    flower_port = free_port()
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115  (closed in the finally below)
    proc = start_readonly_flower(url("flower"), flower_port, log)
    base = f"http://127.0.0.1:{flower_port}"
    try:

        def up():
            try:
                return requests.get(base + "/healthcheck", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, 60, what="flower")
        wait_for(
            flower_lists_a_sent_task(base, url("worker")),
            60,
            interval=1,
            what="flower to see a task event",
        )
        output = (tmp_path / "flower.log").read_text()
        assert "Failed to capture events" not in output
        assert "Failed to enable events" not in output  # it never tried to publish
    finally:
        # Flower's SIGTERM handler raises SystemExit, which is lost when the signal lands inside a
        # weakref callback ("Exception ignored"): then it keeps running, so kill it after a grace.
        stop_process(proc)
        log.close()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (bootstrap installs it)")
def test_nginx_tls_proxy_in_front_of_the_gateway(stack_factory, tmp_path):
    stack = stack_factory(workers=0, M2FP_TRUSTED_PROXIES="1", M2FP_SUBMIT_LIMIT="2/minute")
    gateway_port = stack.base_url.rsplit(":", 1)[1]
    with nginx_proxy(tmp_path, gateway_port) as (https, http_port, _):
        plain = requests.get(
            f"http://127.0.0.1:{http_port}/v1/jobs", allow_redirects=False, timeout=5
        )
        assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
        reply = requests.get(https + "/healthz", verify=False, timeout=5)
        assert not re.search(r"\d", reply.headers.get("Server", ""))  # no version anywhere
        assert reply.headers["Strict-Transport-Security"].count("max-age") == 1
        # /metrics is never served through the public proxy, not even with the scraper's token.
        hidden = requests.get(
            https + "/metrics", headers=metrics_headers(), verify=False, timeout=5
        )
        assert hidden.status_code == 404 and hidden.json()["error"] == "not_found"
        assert "m2fp_" not in hidden.text
        statuses = []
        for spoof in ("1.1.1.1", "2.2.2.2", "3.3.3.3"):  # a new "client" each time?
            statuses.append(
                requests.post(
                    https + "/v1/jobs",
                    verify=False,
                    timeout=30,
                    headers={"X-Forwarded-For": spoof},
                    files={"image": ("p.jpg", photo_jpeg(64, 64))},
                ).status_code
            )
        assert statuses == [202, 202, 429]  # no: the proxy replaced the header
