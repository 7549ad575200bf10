"""The deployment files do what docs/SECURITY.md says, checked for real where this machine can.

- docker-compose.yml / Dockerfiles: every container non-root, read-only root filesystem, tmpfs
  /tmp, no capabilities; Redis and Flower not published beyond loopback; no torch in the gateway
  image. (No Docker engine runs here, so these are checked as configuration.)
- scripts/make_secrets.sh + deploy/redis.conf: a real redis-server with the generated ACL file:
  the default user is off, each role authenticates with its own password, and the job store and
  a Celery producer work as the gateway and worker users; healthcheck can only PING.
- deploy/nginx.conf: a real nginx (Debian's) in front of a real gateway: HTTP redirects to HTTPS,
  no server version, and a client's X-Forwarded-For is replaced, so with M2FP_TRUSTED_PROXIES=1 a
  spoofed header still changes nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
import urllib3
import yaml

from shared.constants import QUEUE
from shared.crypto import hash_secret, new_job_id
from shared.jobstore import JobStore
from tests.conftest import REPO, free_port, wait_for
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
    for line in ('save ""', "appendonly no", "maxmemory-policy noeviction", "aclfile /etc/redis/users.acl"):
        assert line in conf


@pytest.fixture
def acl_redis(tmp_path):
    """redis-server with deploy/redis.conf and a users.acl from scripts/make_secrets.sh."""
    workdir = tmp_path / "deploy"
    shutil.copytree(REPO / "scripts", workdir / "scripts")
    subprocess.run(["bash", str(workdir / "scripts/make_secrets.sh")], cwd=workdir, check=True,
                   capture_output=True)
    secrets = workdir / "secrets"
    port = free_port()
    conf = (REPO / "deploy/redis.conf").read_text()
    conf = conf.replace("bind 0.0.0.0", "bind 127.0.0.1").replace("port 6379", f"port {port}")
    conf = conf.replace("/etc/redis/users.acl", str(secrets / "users.acl")) + f"\ndir {tmp_path}\n"
    (tmp_path / "redis.conf").write_text(conf)
    proc = subprocess.Popen(["redis-server", str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL)

    def url(role: str) -> str:
        return (secrets / f"redis_url_{role}").read_text().strip().replace("@redis:6379", f"@127.0.0.1:{port}")

    def up():
        try:
            return redis.Redis.from_url(url("api")).ping()
        except redis.ConnectionError:
            return False

    wait_for(up, 10, what="redis with ACLs")
    yield port, url, secrets
    proc.terminate()
    proc.wait(10)


def test_redis_acl_roles(acl_redis):
    port, url, secrets = acl_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()                           # default user is off
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).get("m2fp:job:x")
    with pytest.raises(redis.AuthenticationError):              # a role's name with a wrong password
        redis.Redis(port=port, username="gateway", password="guess").ping()
    gateway, worker = redis.Redis.from_url(url("api")), redis.Redis.from_url(url("worker"))
    store = lambda client: JobStore(client, input_ttl=60, result_ttl=60, job_ttl=300,  # noqa: E731
                                    max_attempts=2, claim_input_ttl=120)
    job_id = new_job_id()
    store(gateway).create(job_id, token_hash=hash_secret("t"), key_id="k", wrapped_key=b"w",
                          sealed_input=b"sealed")
    assert store(worker).claim(job_id, "w1").outcome == "ok"
    assert store(worker).store_result(job_id, b"result")
    assert store(gateway).fetch_result(job_id).sealed_result == b"result"
    for client in (gateway, worker):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("FLUSHALL")                  # @dangerous denied to every role
    health = redis.Redis(port=port, username="healthcheck", password="healthcheck")
    assert health.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.get("m2fp:job:x")
    flower = redis.Redis.from_url(url("flower"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.set("m2fp:in:x", b"y")                           # Flower reads, never writes jobs
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.get("m2fp:in:x")
    assert flower.llen(QUEUE) == 0
    assert (secrets / "data_keys").stat().st_mode & 0o077 == 0


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (bootstrap installs it)")
def test_nginx_tls_proxy_in_front_of_the_gateway(stack_factory, tmp_path):
    stack = stack_factory(workers=0, M2FP_TRUSTED_PROXIES="1", M2FP_SUBMIT_LIMIT="2/minute")
    gateway_port = stack.base_url.rsplit(":", 1)[1]
    with nginx_proxy(tmp_path, gateway_port) as (https, http_port, _):
        plain = requests.get(f"http://127.0.0.1:{http_port}/v1/jobs", allow_redirects=False, timeout=5)
        assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
        reply = requests.get(https + "/healthz", verify=False, timeout=5)
        assert not re.search(r"\d", reply.headers.get("Server", ""))   # no version anywhere
        assert reply.headers["Strict-Transport-Security"].count("max-age") == 1
        statuses = []
        for spoof in ("1.1.1.1", "2.2.2.2", "3.3.3.3"):          # a new "client" each time?
            statuses.append(requests.post(https + "/v1/jobs", verify=False, timeout=30,
                                          headers={"X-Forwarded-For": spoof},
                                          files={"image": ("p.jpg", photo_jpeg(64, 64))}).status_code)
        assert statuses == [202, 202, 429]                      # no: the proxy replaced the header
