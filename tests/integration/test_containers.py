"""The images built and the compose stack run, for real, on this machine's own Docker engine.

No image registry is reachable here, so `deploy/images/build.sh` makes everything locally: a
debootstrap'd Debian base, Redis and nginx from Debian's packages on it, and Dockerfile.api /
Dockerfile.worker FROM that base with wheels from the host's pip indexes (CPU torch). Then the
real docker-compose.yml runs with `--scale worker=2` and the TLS profile, in a scratch project
folder (its own secrets, .env and a TEST-ONLY override: random weights, explicit subnets, free
loopback ports), and the test checks:

- the gateway image has no torch; the worker image has the compiled deformable-attention op and
  the workers say in their start log that they use it;
- a photo goes through the API end to end (submit, poll, fetch once, second fetch 410), directly
  and through the TLS proxy;
- from inside every running container: the root filesystem refuses writes, the user is not root,
  `/tmp` is a tmpfs; Redis answers NOAUTH to a client without credentials on the compose network.

dockerd is started by the test when none runs (and stopped by its pid afterwards); the test skips,
saying why, only when dockerd cannot run on the machine at all.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import urllib3

from tests.conftest import REPO, free_port, stop_process, wait_for
from tests.helpers import self_signed_certificate
from tests.integration.conftest import photo_jpeg

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

BUILD_TIMEOUT = 3000  # seconds: a first build on a fresh 2-core machine (debootstrap, torch, op)
TAG = "test"
IMAGES = {
    "M2FP_BASE_IMAGE": "m2fp/debian-base:bookworm",
    "M2FP_REDIS_IMAGE": "m2fp/redis:bookworm",
    "M2FP_NGINX_IMAGE": "m2fp/nginx:bookworm",
    "M2FP_API_IMAGE": f"m2fp-serve-api:{TAG}",
    "M2FP_WORKER_IMAGE": f"m2fp-serve-worker:{TAG}",
}
# TEST ONLY: untrained weights (announced loudly by the worker) instead of a pinned checkpoint.
# compose's `${M2FP_WEIGHTS_SHA256:?}` still has to be satisfied, so the compose process gets a
# dummy pin, and the worker's own environment clears it (random weights take no pin).
DUMMY_PIN = "0" * 64


def run(argv, timeout=120, check=True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def docker_answers() -> bool:
    try:
        return run(["docker", "info"], timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """A running dockerd: the machine's own, or one this fixture starts (and stops by its pid)."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client (scripts/bootstrap.sh installs Debian's docker.io as root)")
    if docker_answers():
        yield
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("dockerd is not installed (scripts/bootstrap.sh installs docker.io as root)")
    if os.geteuid() != 0:
        pytest.skip("no dockerd runs and starting one needs root")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [dockerd, "--host", "unix:///var/run/docker.sock"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not docker_answers():
        time.sleep(0.5)
    if not docker_answers():
        stop_process(proc, grace=20)
        tail = log_path.read_text(errors="replace")[-2000:]
        pytest.skip(f"dockerd cannot run on this machine (exit {proc.returncode}):\n{tail}")
    try:
        yield
    finally:
        stop_process(proc, grace=30)


@pytest.fixture(scope="session")
def compose_cmd(docker_engine) -> list[str]:
    """`docker compose` (v2 plugin) where present, else Debian's docker-compose (v1)."""
    if run(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor docker-compose (scripts/bootstrap.sh installs it)")


@pytest.fixture(scope="session")
def images(docker_engine) -> dict[str, str]:
    """Every image of the stack, built once per session by deploy/images/build.sh (layer cache)."""
    started = time.monotonic()
    proc = run(
        ["bash", str(REPO / "deploy/images/build.sh")],
        timeout=BUILD_TIMEOUT,
        check=False,
        env={**os.environ, **IMAGES},
        cwd=REPO,
    )
    if proc.returncode != 0:
        pytest.fail(f"image build failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    steps = dict(re.findall(r"build_images: (\w+) (\d+) s", proc.stderr))
    sizes = {
        name: int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout)
        for name, image in IMAGES.items()
    }
    print(
        f"\nimages built in {time.monotonic() - started:.0f} s (steps: {steps}); sizes (MB): "
        + ", ".join(f"{IMAGES[name]} {size / 1e6:.0f}" for name, size in sizes.items())
    )
    return IMAGES


def test_gateway_image_has_no_torch_and_worker_image_has_the_op(images):
    api, worker = images["M2FP_API_IMAGE"], images["M2FP_WORKER_IMAGE"]
    no_torch = run(
        ["docker", "run", "--rm", "--network", "none", api, "python", "-c", "import torch"],
        check=False,
    )
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    flask_ok = run(
        ["docker", "run", "--rm", "--network", "none", api, "python", "-c", "import flask, flower"]
    )
    assert flask_ok.returncode == 0
    probe = (
        "import json, torch; from worker.m2fp import ops; s = ops.status(); "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, **s}))"
    )
    status = json.loads(
        run(["docker", "run", "--rm", "--network", "none", worker, "python", "-c", probe]).stdout
    )
    assert status["loaded"] is True, status
    assert status["cuda"] is None and status["torch"].endswith("+cpu"), status
    no_flask = run(
        ["docker", "run", "--rm", "--network", "none", worker, "python", "-c", "import flask"],
        check=False,
    )
    assert no_flask.returncode != 0


def free_subnets(count: int) -> list[str]:
    """/24s in 10.213.0.0/16 that neither a host route nor a Docker network uses."""
    used = []
    try:
        routes = run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    except OSError:  # no iproute2: the Docker networks below are still avoided
        routes = ""
    for token in re.findall(r"\d+\.\d+\.\d+\.\d+(?:/\d+)?", routes):
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(token, strict=False))
    for net_id in run(["docker", "network", "ls", "-q"]).stdout.split():
        inspect = run(["docker", "network", "inspect", "-f", "{{json .IPAM.Config}}", net_id])
        for config in json.loads(inspect.stdout) or []:
            if config.get("Subnet"):
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(config["Subnet"], strict=False))
    found = []
    for third in range(32, 250):
        candidate = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            found.append(str(candidate))
            if len(found) == count:
                return found
    pytest.fail("no free /24 in 10.213.0.0/16 for the test networks")


OVERRIDE = """\
# TEST ONLY (tests/integration/test_containers.py): never use this file for a deployment.
# Random (untrained) weights instead of the pinned checkpoint, one torch thread per worker on
# this 2-core machine, and explicit subnets for the two networks the test creates.
services:
  worker:
    environment:
      M2FP_WEIGHTS: random
      M2FP_WEIGHTS_SHA256: ""
      M2FP_TORCH_THREADS: "1"
networks:
  backend:
    ipam: {{config: [{{subnet: "{backend}"}}]}}
  frontend:
    ipam: {{config: [{{subnet: "{frontend}"}}]}}
"""


class Compose:
    """One compose project in a scratch folder, driven by the compose CLI."""

    def __init__(self, cmd: list[str], folder: Path, env: dict[str, str]):
        self.project = "m2fpct" + uuid.uuid4().hex[:8]
        self.folder, self.env = folder, env
        self.base = [
            *cmd,
            "--project-name",
            self.project,
            "--project-directory",
            str(folder),
            "-f",
            str(folder / "docker-compose.yml"),
            "-f",
            str(folder / "compose.test.yml"),
            "--profile",
            "tls",
        ]

    def __call__(self, *args: str, timeout=300, check=True) -> subprocess.CompletedProcess:
        return run([*self.base, *args], timeout=timeout, check=check, env=self.env, cwd=self.folder)

    def containers(self) -> dict[str, list[str]]:
        """service -> names of its running containers."""
        listing = run(
            [
                "docker",
                "ps",
                "--filter",
                f"label=com.docker.compose.project={self.project}",
                "--format",
                '{{.Names}} {{.Label "com.docker.compose.service"}}',
            ]
        ).stdout
        services: dict[str, list[str]] = {}
        for line in listing.splitlines():
            name, service = line.split()
            services.setdefault(service, []).append(name)
        return services

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "60", check=False, timeout=60).stdout


def project_folder(folder: Path) -> None:
    """The files docker-compose.yml refers to: configs, secrets (as make_secrets.sh writes them),
    a self-signed certificate for the proxy, .env from .env.example."""
    shutil.copy(REPO / "docker-compose.yml", folder / "docker-compose.yml")
    (folder / "deploy").mkdir()
    for name in ("redis.conf", "nginx.conf"):
        shutil.copy(REPO / "deploy" / name, folder / "deploy" / name)
    (folder / "scripts").mkdir()
    shutil.copy(REPO / "scripts/make_secrets.sh", folder / "scripts/make_secrets.sh")
    run(["bash", str(folder / "scripts/make_secrets.sh")], cwd=folder)
    secrets = folder / "secrets"
    # The script's own modes: the folder closed on the host, the files readable to the
    # containers' non-root users (Docker bind-mounts file secrets with the host's owner and mode).
    assert secrets.stat().st_mode & 0o777 == 0o700
    modes = {path.name: path.stat().st_mode & 0o777 for path in secrets.iterdir() if path.is_file()}
    assert modes and set(modes.values()) == {0o444}, modes
    assert {"data_keys", "users.acl", "metrics_token", "redis_url_api"} <= set(modes)
    for path in self_signed_certificate(secrets / "tls"):  # what the operator adds, as documented
        path.chmod(0o444)
    (folder / ".env").write_text((REPO / ".env.example").read_text())
    (folder / "weights").mkdir()


@pytest.fixture(scope="module")
def stack(images, compose_cmd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose")
    project_folder(folder)
    backend, frontend = free_subnets(2)
    (folder / "compose.test.yml").write_text(OVERRIDE.format(backend=backend, frontend=frontend))
    ports = {name: free_port() for name in ("api", "flower", "http", "https")}
    env = {
        **os.environ,
        **images,
        "M2FP_WEIGHTS_SHA256": DUMMY_PIN,
        "M2FP_API_HOST_PORT": str(ports["api"]),
        "M2FP_FLOWER_HOST_PORT": str(ports["flower"]),
        "M2FP_PROXY_HTTP": f"127.0.0.1:{ports['http']}",
        "M2FP_PROXY_HTTPS": f"127.0.0.1:{ports['https']}",
    }
    compose = Compose(compose_cmd, folder, env)
    compose.ports = ports
    compose.base_url = f"http://127.0.0.1:{ports['api']}"
    started = time.monotonic()
    try:
        compose("up", "-d", "--no-build", "--scale", "worker=2", timeout=600)

        def ready():
            with contextlib.suppress(requests.RequestException):
                reply = requests.get(compose.base_url + "/readyz", timeout=5)
                return reply.status_code == 200 and reply.json()["workers"] == 2
            return False

        try:
            wait_for(ready, 420, interval=2, what="the gateway to see 2 workers")
        except BaseException:
            print(compose.logs(), file=sys.stderr)
            raise
        compose.ready_seconds = time.monotonic() - started
        print(f"\ncompose up -> 2 workers ready in {compose.ready_seconds:.0f} s")
        yield compose
    finally:
        compose(
            "down", "--volumes", "--remove-orphans", "--timeout", "20", check=False, timeout=300
        )


def auth(job: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {job['token']}"}


def through(
    base_url: str, data: bytes, **kwargs
) -> tuple[dict, requests.Response, requests.Response]:
    """Submit a photo, poll it to an end state, fetch its result twice."""
    reply = requests.post(
        base_url + "/v1/jobs", files={"image": ("photo.jpg", data)}, timeout=30, **kwargs
    )
    assert reply.status_code == 202, reply.text
    job = reply.json()

    def finished():
        body = requests.get(
            base_url + job["status_url"], headers=auth(job), timeout=10, **kwargs
        ).json()
        return body if body.get("status") in ("done", "failed", "expired") else None

    status = wait_for(finished, 300, interval=0.5, what="the job to finish")
    first = requests.get(base_url + job["result_url"], headers=auth(job), timeout=30, **kwargs)
    second = requests.get(base_url + job["result_url"], headers=auth(job), timeout=30, **kwargs)
    return status, first, second


def test_photo_end_to_end_through_the_compose_stack(stack):
    started = time.monotonic()
    status, first, second = through(stack.base_url, photo_jpeg(512, 384))
    assert status["status"] == "done", status
    assert first.status_code == 200, first.text
    result = first.json()
    assert (result["width"], result["height"]) == (512, 384)
    assert result["untrained"] is True  # the test-only random weights, said in every result
    assert second.status_code == 410, second.text
    print(f"\nphoto end to end (direct) in {time.monotonic() - started:.1f} s")


def test_photo_through_the_tls_proxy(stack):
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    https = f"https://127.0.0.1:{stack.ports['https']}"
    plain = requests.get(
        f"http://127.0.0.1:{stack.ports['http']}/healthz", allow_redirects=False, timeout=10
    )
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
    # The proxy's Host header carries the published port: the gateway's same-origin check sees it.
    status, first, second = through(https, photo_jpeg(256, 256, seed=1), verify=False)
    assert status["status"] == "done", status
    assert first.status_code == 200 and second.status_code == 410
    assert first.headers.get("Server") in (None, "nginx")


def test_workers_use_the_compiled_op(stack):
    workers = stack.containers()["worker"]
    assert len(workers) == 2
    for name in workers:
        proc = run(["docker", "logs", name])
        logs = proc.stdout + proc.stderr
        loaded = [line for line in logs.splitlines() if "model_loaded" in line]
        assert loaded, logs[-3000:]
        assert re.search(r"deform_op\W+op\b", loaded[-1]), loaded[-1]
        assert "untrained" in logs  # random weights are announced


def test_every_container_is_hardened(stack):
    services = stack.containers()
    assert {"redis", "api", "worker", "flower", "gateway-tls", "proxy"} <= set(services), services
    checked = []
    for service, names in services.items():
        for name in names:
            uid = run(["docker", "exec", name, "id", "-u"]).stdout.strip()
            assert uid != "0", (service, uid)
            write = run(["docker", "exec", name, "sh", "-c", "echo x > /probe"], check=False)
            assert write.returncode != 0 and "Read-only file system" in write.stderr, (
                service,
                write.stderr,
            )
            mounts = run(["docker", "exec", name, "cat", "/proc/mounts"]).stdout
            assert re.search(r"^\S+ /tmp tmpfs ", mounts, re.M), (service, mounts)
            checked.append(f"{service}:{uid}")
    print("\nnon-root, read-only root, tmpfs /tmp: " + ", ".join(sorted(checked)))


def test_redis_refuses_unauthenticated_clients_on_the_compose_network(stack):
    services = stack.containers()
    # A raw RESP client (redis-py would open with HELLO and get HELLO's own refusal).
    probe = (
        "import socket\n"
        "s = socket.create_connection(('redis', 6379), 5)\n"
        "s.sendall(b'*2\\r\\n$3\\r\\nGET\\r\\n$10\\r\\nm2fp:job:x\\r\\n')\n"
        "print(s.recv(200).decode())\n"
    )
    for service in ("api", "worker"):
        out = run(["docker", "exec", services[service][0], "python", "-c", probe]).stdout
        assert out.startswith("-NOAUTH Authentication required"), (service, out)
    # And redis-cli, as the healthcheck would without its password.
    cli = run(["docker", "exec", services["redis"][0], "redis-cli", "-h", "redis", "ping"])
    assert "NOAUTH" in cli.stdout + cli.stderr


def test_flower_answers_with_its_login(stack):
    login = (stack.folder / "secrets/flower_auth").read_text().strip().split(":", 1)
    url = f"http://127.0.0.1:{stack.ports['flower']}/workers"
    assert requests.get(url, timeout=10).status_code == 401
    reply = requests.get(url, auth=tuple(login), timeout=10)
    assert reply.status_code == 200


def test_gateway_metrics_need_the_scraper_token_and_the_proxy_hides_them(stack):
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    token = (stack.folder / "secrets/metrics_token").read_text().strip()
    url = stack.base_url + "/metrics"
    refused = requests.get(url, timeout=10)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    scraped = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert scraped.status_code == 200 and "m2fp_jobs_submitted_total" in scraped.text
    https = f"https://127.0.0.1:{stack.ports['https']}/metrics"
    hidden = requests.get(
        https, headers={"Authorization": f"Bearer {token}"}, verify=False, timeout=10
    )
    assert hidden.status_code == 404 and "m2fp_" not in hidden.text
