"""Workers on other hosts: Redis, the gateway and two worker hosts, each in its own network
namespace, joined by veth pairs to a bridge in a "switch" namespace this test creates, TLS to
Redis everywhere and one Redis ACL user per role (scripts/make_secrets.sh: gateway, worker,
flower, healthcheck).

The test itself reaches the stack only over the virtual network too (a veth from its own
namespace to the switch): it pushes jobs through the gateway's HTTP API (bench/chaos.py's
`Load`: submit, poll, fetch once, fetch again), then cuts worker host B off mid-load (its port on
the switch goes down, then its processes are killed by pid). Host B's running job is requeued by
host A's reaper once B's heartbeat lapses, and finishes on A; no job is lost or delivered twice;
/readyz counts one worker and the heartbeat index names only host A; a real Flower (read-only
Redis user, gateway namespace) shows B's worker offline. Redis requires TLS: a plain-TCP client
is refused, a client that does not trust the test's CA too. Measured and printed: seconds from the
cut to the requeue, to /readyz and Flower noticing, and to every job done (docs/OPERATIONS.md
"Scaling out" records them). The namespaces are deleted even when the test fails; it skips, loudly,
only where `ip netns` cannot run (no root, no network namespaces).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
import redis
import requests

from bench.chaos import (
    PY,
    TEST_NETWORK,
    UNTHROTTLED,
    ChaosStack,
    Load,
    StackConfig,
    job_figures,
    verdict,
)
from shared import heartbeat
from shared.crypto import generate_key
from shared.redis_conn import flower_broker_url
from tests.conftest import REPO, wait_for
from tests.helpers import certificate_authority
from tests.integration.conftest import photo_jpeg

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# /24s this test may take for its virtual network: the first that no route of this machine uses.
SUBNETS = ("10.213.77", "10.213.78", "10.213.79")
REDIS_HOST, GATEWAY_HOST, HOST_A, HOST_B = 2, 10, 21, 22  # last octets
REDIS_PORT, GATEWAY_PORT, FLOWER_PORT = 6379, 8000, 5555
FLOWER_LOGIN = ("ops", "multi-host-test")
JOBS, RATE = 16, 2.0  # about 1.3 s of one core a job: the queue backs up, both hosts stay busy


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`, bounded in time; fails the test with its stderr when `check`."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class VirtualNetwork:
    """Namespaces on one bridge: `switch` holds the bridge, every host a veth to it. Only what
    this object created is touched, and `destroy` removes all of it."""

    tag: str
    subnet: str
    namespaces: list[str] = field(default_factory=list)
    host_link: str = ""

    @property
    def switch(self) -> str:
        return f"{self.tag}-switch"

    def add_namespace(self, name: str) -> str:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def create(self) -> None:
        self.add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, role: str, octet: int) -> str:
        """A namespace `tag-role` with eth0 at subnet.octet on the bridge (switch port p-role)."""
        name = self.add_namespace(f"{self.tag}-{role}")
        port = f"p-{role}"
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "eth0", "netns", name)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", name, "addr", "add", f"{self.subnet}.{octet}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        return name

    def join_from_here(self, octet: int) -> None:
        """A veth from this test's own namespace to the switch, so the test talks over it too."""
        self.host_link = f"m2fpmh{os.getpid() % 100000}"
        ip("link", "add", self.host_link, "type", "veth", "peer", "p-test", "netns", self.switch)
        ip("-n", self.switch, "link", "set", "p-test", "master", "br0", "up")
        ip("addr", "add", f"{self.subnet}.{octet}/24", "dev", self.host_link)
        ip("link", "set", self.host_link, "up")

    def cut(self, role: str) -> None:
        """Unplug a host: its port on the switch goes down (its processes keep running)."""
        ip("-n", self.switch, "link", "set", f"p-{role}", "down")

    def destroy(self) -> None:
        if self.host_link:
            ip("link", "del", self.host_link, check=False)  # gone already with the switch's peer
        for name in reversed(self.namespaces):
            ip("netns", "del", name, check=False)
        self.namespaces.clear()


def free_subnet() -> str:
    routes = ip("-o", "route", "show", "table", "all").stdout + ip("-o", "addr").stdout
    for subnet in SUBNETS:
        if f" {subnet}." not in routes:
            return subnet
    pytest.skip(f"every subnet this test may use ({', '.join(SUBNETS)}) is taken here")


def require_netns() -> None:
    """Skip, loudly, where network namespaces cannot be made (no root, no `ip`, a sandbox)."""
    probe = f"m2fp-probe-{os.getpid()}"
    if shutil.which("ip") is None:
        pytest.skip("MULTI-HOST TEST NOT RUN: iproute2 (`ip`) is not installed")
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"MULTI-HOST TEST NOT RUN: `ip netns add` fails here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20, check=False)


def deploy_secrets(workdir: Path) -> Path:
    """scripts/make_secrets.sh run for real in a scratch folder: the ACL users and role URLs."""
    shutil.copytree(REPO / "scripts", workdir / "scripts")
    subprocess.run(
        ["bash", str(workdir / "scripts" / "make_secrets.sh")],
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return workdir / "secrets"


class MultiHostStack(ChaosStack):
    """bench/chaos.py's stack, spread over namespaces: Redis (TLS only, ACL users), the gateway
    (and Flower) and worker hosts A (index 0) and B (index 1), each started by `ip netns exec`
    (which execs: the pid kept is the real process's)."""

    def __init__(self, workdir: Path, net: VirtualNetwork):
        super().__init__(workdir, StackConfig(workers=2, concurrency=1))
        self.net = net
        self.secrets = deploy_secrets(workdir / "deploy")
        self.redis_ip = f"{net.subnet}.{REDIS_HOST}"
        self.ca, cert, key = certificate_authority(
            workdir / "tls", "redis", ip_addresses=(self.redis_ip,), dns_names=("redis",)
        )
        self.tls_files = (cert, key)
        self.host_env: dict[int, dict[str, str]] = {}
        self.flower_url = f"http://{net.subnet}.{GATEWAY_HOST}:{FLOWER_PORT}"

    def url(self, role: str, **query: str) -> str:
        """The role's rediss:// URL (make_secrets.sh's, pointed at the Redis host), `query` added."""
        plain = (self.secrets / f"redis_url_{role}").read_text().strip()
        url = plain.replace("redis://", "rediss://").replace(
            "@redis:6379", f"@{self.redis_ip}:6379"
        )
        return f"{url}?{urlencode(query)}" if query else url

    def client(self, role: str = "api", **options) -> redis.Redis:
        """A client from the test's namespace, as `role`, over TLS: the CA and the certificate
        check in the URL's query, the other way redis-py (and kombu) take them."""
        url = self.url(role, ssl_ca_certs=str(self.ca), ssl_cert_reqs="required")
        return redis.Redis.from_url(url, socket_timeout=5, **options)

    def start(self, timeout: float = 240) -> None:
        """Redis, the gateway, both worker hosts; returns when /readyz counts both workers."""
        self.start_redis()
        base = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
        base.update({**UNTHROTTLED, **TEST_NETWORK, "PYTHONPATH": str(REPO)})
        base.update(M2FP_DATA_KEYS=f"k1:{generate_key()}", M2FP_TORCH_THREADS="1")
        gateway_ip = f"{self.net.subnet}.{GATEWAY_HOST}"
        # The services trust the CA through M2FP_REDIS_CA_FILE (shared.redis_conn.tls_options).
        base["M2FP_REDIS_CA_FILE"] = str(self.ca)
        self.env = dict(base, M2FP_REDIS_URL=self.url("api"), M2FP_HOST=gateway_ip)
        self.env.update(M2FP_PORT=str(GATEWAY_PORT), M2FP_GATEWAY_WORKERS="1")
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(self.workdir / "prometheus")
        os.makedirs(self.env["PROMETHEUS_MULTIPROC_DIR"])
        self.base_url = f"http://{gateway_ip}:{GATEWAY_PORT}"
        gunicorn = [PY, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api.wsgi:app"]
        self.spawn("gateway", self.netns("gateway", gunicorn), self.env)
        for index in (0, 1):
            self.host_env[index] = dict(base, M2FP_REDIS_URL=self.url("worker"))
            self.start_worker(index)
        self.wait_ready(timeout)

    def start_redis(self) -> None:
        """redis-server on the Redis host: TLS port only, the deployment's ACL file."""
        cert, key = self.tls_files
        lines = [
            "port 0",
            f"tls-port {REDIS_PORT}",
            f"bind {self.redis_ip}",
            f"tls-cert-file {cert}",
            f"tls-key-file {key}",
            f"tls-ca-cert-file {self.ca}",
            "tls-auth-clients no",  # clients prove who they are with their ACL user's password
            'tls-protocols "TLSv1.2 TLSv1.3"',
            f"aclfile {self.secrets / 'users.acl'}",
            'save ""',
            "appendonly no",
            "maxmemory-policy noeviction",
            f"dir {self.workdir}",
        ]
        conf = self.workdir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self.spawn("redis", self.netns("redis", ["redis-server", str(conf)]), {})

        def up():
            try:
                return self.client("api", socket_connect_timeout=1).ping()
            except redis.ConnectionError:
                return False

        wait_for(up, 20, interval=0.2, what="Redis over TLS on its host")

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start `argv` in its own process group, logging to `name`.log, stopped with the rest
        (bench's `Processes`, which closes its copy of the log once the child holds it)."""
        return self.procs.start(name, argv, env)

    def netns(self, role: str, argv: list[str], hostname: str | None = None) -> list[str]:
        """`argv` run in the role's namespace, under its own host name when given (a UTS
        namespace: heartbeats and Flower name the host); each wrapper execs, keeping the pid."""
        if hostname:
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv]
        return ["ip", "netns", "exec", f"{self.net.tag}-{role}", *argv]

    def host(self, index: int) -> str:
        return "host-a" if index == 0 else "host-b"

    def start_worker(self, index: int) -> subprocess.Popen:
        """`python -m worker` on host A (0) or B (1), logging to worker<index>-<n>.log."""
        self.generation[index] += 1
        name = f"worker{index}-{self.generation[index]}"
        # Celery's default node name, celery@<host name>: the worker ACL's keys are celery*, and
        # its remote-control queue is named after the node.
        argv = [PY, "-m", "worker", "--no-preflight"]
        wrapped = self.netns(self.host(index), argv, hostname=f"m2fp-{self.host(index)}")
        self.workers[index] = self.spawn(name, wrapped, self.host_env[index])
        self.incarnation[index] = name
        return self.workers[index]

    def start_flower(self) -> None:
        """A real Flower in the gateway's namespace, logged in to Redis as the read-only user."""
        broker = flower_broker_url(self.url("flower"), str(self.ca))  # as make run gives it
        env = dict(self.env, CELERY_BROKER_URL=broker)
        env.update(FLOWER_BASIC_AUTH=":".join(FLOWER_LOGIN), FLOWER_UNAUTHENTICATED_API="false")
        argv = [PY, "-m", "shared.flower_readonly", "flower", f"--port={FLOWER_PORT}"]
        argv += [f"--address={self.net.subnet}.{GATEWAY_HOST}", "--enable_events=False"]
        self.spawn("flower", self.netns("gateway", argv), env)

    def flower_workers(self) -> dict[str, bool]:
        """Flower's worker list: hostname -> online."""
        try:
            reply = requests.get(
                self.flower_url + "/workers", params={"json": 1}, auth=FLOWER_LOGIN, timeout=5
            )
        except requests.RequestException:
            return {}
        if reply.status_code != 200:
            return {}
        return {w["hostname"]: bool(w.get("status")) for w in reply.json().get("data", [])}

    def unfinished_on(self, index: int) -> set[str]:
        """Jobs the worker's current incarnation started and has not finished (from its log)."""
        mine = [e for e in self.events() if e["log"] == self.incarnation[index]]
        started = {e["job_id"] for e in mine if e.get("event") == "job_started"}
        ended = {e["job_id"] for e in mine if e.get("event") in ("job_done", "job_failed")}
        return started - ended


@pytest.fixture
def multi_host(tmp_path):
    require_netns()
    net = VirtualNetwork(f"m2fpmh{os.getpid() % 100000}", free_subnet())
    stack = None
    try:
        net.create()
        for role, octet in (("redis", REDIS_HOST), ("gateway", GATEWAY_HOST)):
            net.add_host(role, octet)
        net.add_host("host-a", HOST_A)
        net.add_host("host-b", HOST_B)
        net.join_from_here(1)
        stack = MultiHostStack(tmp_path, net)
        stack.start()
        yield stack
    finally:
        try:
            if stack is not None:
                stack.stop()
        finally:
            net.destroy()
    assert not [n for n in ip("netns", "list").stdout.split() if n.startswith(net.tag)]


def assert_redis_requires_tls(stack: MultiHostStack) -> None:
    """No plain TCP, no untrusted certificate, each role's rights; healthcheck may only PING."""
    plain = redis.Redis.from_url(
        stack.url("api").replace("rediss://", "redis://"), socket_timeout=5
    )
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # the TLS port resets a plain-text client
    untrusted = redis.Redis.from_url(stack.url("api"), socket_timeout=5)  # system CAs only
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.ping()
    password = quote((stack.secrets / "redis_healthcheck").read_text().strip(), safe="")
    health = redis.Redis.from_url(
        f"rediss://healthcheck:{password}@{stack.redis_ip}:{REDIS_PORT}/0",
        ssl_ca_certs=str(stack.ca),
        socket_timeout=5,
    )
    assert health.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.get("m2fp:job:x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        stack.client("flower").set("m2fp:job:x", "y")  # Flower reads, never writes
    for client in (plain, untrusted, health):
        client.close()


def live_names(stack: MultiHostStack) -> set[str]:
    """The live workers' names in the heartbeat index (what /readyz reads)."""
    client = stack.client("api")
    try:
        return {beat.name for beat in heartbeat.live(client)}
    finally:
        client.close()


def test_a_worker_host_cut_off_mid_load_loses_no_job(multi_host):
    stack = multi_host
    assert_redis_requires_tls(stack)
    assert {name.split(":")[0] for name in live_names(stack)} == {"m2fp-host-a", "m2fp-host-b"}
    stack.start_flower()
    hosts = {index: f"celery@m2fp-{stack.host(index)}" for index in (0, 1)}
    wait_for(
        lambda: all(stack.flower_workers().get(name) for name in hosts.values()),
        90,
        interval=1,
        what="Flower to see both worker hosts online",
    )
    load = Load(stack.base_url, photo_jpeg(96, 96, seed=5), jobs=JOBS, rate=RATE, drain=180)
    runner = threading.Thread(target=load.run, daemon=True)
    runner.start()
    wait_for(lambda: stack.unfinished_on(1), 60, interval=0.1, what="host B to run a job")
    cut = time.time()
    stack.net.cut("host-b")
    figures = watch_host_leave(stack, hosts, cut)
    stack.kill_worker(1)  # then the host's processes, by pid (its process group)
    orphans = stack.unfinished_on(1)  # started on B, never finished there
    assert orphans, "host B had no job running when it was cut off"
    figures["orphaned_by_cut"] = len(orphans)
    runner.join(JOBS / RATE + 240)
    assert not runner.is_alive(), "the load did not finish"
    jobs = job_figures(load, stack.events())
    assert verdict(jobs) == [], jobs
    assert jobs["done"] == JOBS, jobs
    figures.update(requeue_figures(stack, orphans, cut))
    figures["jobs"] = {k: jobs[k] for k in ("done", "lost", "processed_twice", "delivered_twice")}
    logs = "".join(path.read_text(errors="replace") for path in stack.workdir.glob("*.log"))
    assert "insecure SSL" not in logs  # kombu's warning when it would accept any certificate
    print(f"\nmulti-host figures: {json.dumps(figures)}")
    assert figures["cut_to_requeue_s"] < 75, figures  # heartbeat TTL 30 s + reaper passes


def watch_host_leave(stack: MultiHostStack, hosts: dict[int, str], cut: float) -> dict:
    """After host B's cut, every half second: /readyz's count, the heartbeat index's names and
    Flower's status; seconds from the cut until each showed B gone (A still there)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(seen) < 3 and time.monotonic() < deadline:
        reply = requests.get(stack.base_url + "/readyz", timeout=5)
        if reply.status_code == 200 and reply.json()["workers"] == 1:
            seen.setdefault("readyz_one_worker_s", time.time())
        names = {name.split(":")[0] for name in live_names(stack)}
        if names == {"m2fp-host-a"}:
            seen.setdefault("heartbeats_host_a_only_s", time.time())
        flower = stack.flower_workers()
        if flower.get(hosts[1]) is False and flower.get(hosts[0]) is True:
            seen.setdefault("flower_offline_s", time.time())
        time.sleep(0.5)
    assert len(seen) == 3, f"after 120 s only these showed host B gone: {sorted(seen)}"
    return {key: round(when - cut, 1) for key, when in seen.items()}


def requeue_figures(stack: MultiHostStack, orphans: set[str], cut: float) -> dict:
    """B's unfinished jobs ended done on A; seconds from the cut to the reaper's requeue and to
    the last job done."""
    events = stack.events()
    on_a = [e for e in events if e["log"].startswith("worker0-")]
    for job_id in orphans:
        assert any(e["job_id"] == job_id and e.get("event") == "job_done" for e in on_a), job_id
    requeues = [t for t in stack.event_times("jobs_of_dead_workers_requeued") if t > cut]
    assert requeues, "host A's reaper never requeued B's job"
    done = [e["ts"] for e in events if e.get("event") == "job_done"]
    return {
        "cut_to_requeue_s": round(requeues[0] - cut, 1),
        "cut_to_all_done_s": round(max(done) - cut, 1),
        "requeued": stack.log_events(("jobs_of_dead_workers_requeued",)),
    }
