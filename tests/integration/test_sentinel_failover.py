"""Redis Sentinel failover on the real stack (issue 12): real processes only.

A master and a replica `redis-server` and 3 sentinels (`redis-server <conf> --sentinel`, with a
password, down-after 1 s) on free loopback ports; the real gateway (gunicorn) and a real worker
(`python -m worker`, the test-only tiny network), configured only through the sentinel
variables: `M2FP_REDIS_URL`'s host is a name that does not resolve, so nothing reaches Redis
except through the sentinels.

The test pushes jobs through, then cuts the replication link (the replica's ACL user is switched
off on the master), submits jobs whose encrypted payload is therefore only on the master, and
SIGKILLs the master by its pid. It asserts: while no master answers, the gateway answers only
503 JSON with Retry-After, for a few seconds at most; the sentinels promote the replica; new
jobs then end `done`; jobs that were in flight end with a clear outcome (done, failed, expired
or 404 `not_found` for the ones only the dead master knew), never `queued` or `running`.
The measured figures are printed (run with -s) and recorded in docs/OPERATIONS.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import requests

from scripts import redis_server
from tests.conftest import free_port, make_service_env, stop_process, wait_for
from tests.integration.conftest import SHM, STACK_ENV, Stack, photo_jpeg, poll_until, submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MASTER_NAME = "m2fp-test"
DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS = 1000, 4000
REPL_USER = "repl"
OUTAGE_BOUND = 10.0  # seconds the gateway may answer 503 after the master's death
FINAL = ("done", "failed", "expired")


@dataclass
class Cluster:
    """A master, its replica and three sentinels, all on loopback."""

    workdir: Path
    password: str = "master-pass-0123456789"
    repl_password: str = "repl-pass-0123456789"
    sentinel_password: str = "sentinel-pass-0123456789"
    master: redis_server.RedisServer | None = None
    replica: redis_server.RedisServer | None = None
    sentinel_ports: list[int] = field(default_factory=list)
    sentinels: list[subprocess.Popen] = field(default_factory=list)

    def client(self, server: redis_server.RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, password=self.password, socket_timeout=2)

    def sentinel(self, index: int) -> redis.Redis:
        port = self.sentinel_ports[index]
        return redis.Redis(port=port, password=self.sentinel_password, socket_timeout=1)

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for index in range(len(self.sentinels)):
            try:
                address = self.sentinel(index).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(address[1]) if address else None
            except redis.RedisError:
                continue
        return None

    def stop(self) -> None:
        for proc in self.sentinels:
            stop_process(proc)
        for server in (self.replica, self.master):
            if server is not None:
                redis_server.stop(server)


def start_data_servers(cluster: Cluster) -> None:
    """The master, and its replica, which replicates as an ACL user of its own."""
    repl_user = f"user {REPL_USER} on >{cluster.repl_password} +psync +replconf +ping"
    master_dir, replica_dir = cluster.workdir / "master", cluster.workdir / "replica"
    master_dir.mkdir()
    replica_dir.mkdir()
    cluster.master = redis_server.start(
        master_dir, password=cluster.password, extra_config=(repl_user,)
    )
    cluster.replica = redis_server.start(
        replica_dir,
        password=cluster.password,
        extra_config=(
            repl_user,
            f"replicaof 127.0.0.1 {cluster.master.port}",
            f"masteruser {REPL_USER}",
            f'masterauth "{cluster.repl_password}"',
        ),
    )
    replica = cluster.client(cluster.replica)
    wait_for(
        lambda: replica.info("replication").get("master_link_status") == "up",
        20,
        what="the replica to sync",
    )


def sentinel_config(cluster: Cluster, port: int, folder: Path) -> str:
    """One sentinel's config: its password, the master to watch, short failure detection."""
    return "\n".join(
        [
            f"port {port}",
            "bind 127.0.0.1",
            f'dir "{folder}"',
            f'logfile "{folder / "sentinel.log"}"',
            f'requirepass "{cluster.sentinel_password}"',
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {cluster.master.port} 2",
            f'sentinel auth-pass {MASTER_NAME} "{cluster.password}"',
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
    )


def start_sentinels(cluster: Cluster, count: int = 3) -> None:
    """`count` sentinels; a sentinel rewrites its config file, so each gets one in a folder of
    its own (0700: the rewrite recreates the file 0644; in memory where /dev/shm exists), never
    its password on the command line."""
    for _ in range(count):
        port = free_port()
        folder = Path(tempfile.mkdtemp(prefix="m2fp-sentinel-", dir=SHM))
        conf = folder / "sentinel.conf"
        conf.touch(mode=0o600)
        conf.write_text(sentinel_config(cluster, port, folder) + "\n")
        cluster.sentinel_ports.append(port)
        cluster.sentinels.append(
            subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def all_know_each_other() -> bool:
        try:
            return all(
                len(cluster.sentinel(i).sentinel_sentinels(MASTER_NAME)) == count - 1
                and len(cluster.sentinel(i).sentinel_slaves(MASTER_NAME)) == 1
                for i in range(count)
            )
        except redis.RedisError:
            return False

    wait_for(all_know_each_other, 40, interval=0.2, what="the sentinels to find each other")


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path)
    try:
        start_data_servers(made)
        start_sentinels(made)
        yield made
    finally:
        made.stop()
        for proc_dir in {Path(p.args[1]).parent for p in made.sentinels}:
            for path in proc_dir.iterdir():
                path.unlink()
            proc_dir.rmdir()


@pytest.fixture
def sentinel_stack(cluster, tmp_path):
    """Gateway and one worker that know Redis only through the sentinels."""
    password_file = tmp_path / "sentinel_password"
    password_file.touch(mode=0o600)
    password_file.write_text(cluster.sentinel_password)
    env = make_service_env(f"redis://:{quote(cluster.password)}@master.invalid:1/0")
    env.update(STACK_ENV)
    env.update(
        M2FP_VARIANT="tiny",
        M2FP_TEST_NETWORK="1",
        M2FP_WEIGHTS="random",
        M2FP_DEVICE="cpu",
        M2FP_TORCH_THREADS="1",
        M2FP_REDIS_SENTINELS=",".join(f"127.0.0.1:{p}" for p in cluster.sentinel_ports),
        M2FP_REDIS_SENTINEL_MASTER=MASTER_NAME,
        M2FP_REDIS_SENTINEL_PASSWORD_FILE=str(password_file),
        PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="m2fp-test-prom-", dir=SHM),
    )
    stack = Stack(env=env, logdir=tmp_path)
    try:
        stack.start_gateway()
        stack.start_worker()
        stack.wait_ready(1)
        yield stack
    finally:
        stack.stop()


def status_of(stack: Stack, job: dict) -> tuple[int, str]:
    """(HTTP status, job status or error code) of one job's status URL."""
    reply = requests.get(
        stack.base_url + job["status_url"],
        headers={"Authorization": f"Bearer {job['token']}"},
        timeout=10,
    )
    body = reply.json()
    return reply.status_code, body.get("status") or body.get("error", "")


def cut_replication(cluster: Cluster) -> None:
    """From now on writes reach the master only: the replica's user is off, its link killed."""
    master = cluster.client(cluster.master)
    master.acl_setuser(REPL_USER, enabled=False)
    master.client_kill_filter(user=REPL_USER)
    replica = cluster.client(cluster.replica)
    wait_for(
        lambda: replica.info("replication").get("master_link_status") == "down",
        10,
        what="the replication link to drop",
    )


@dataclass
class Probe:
    """What the gateway answered, every 100 ms from the master's death on (seconds after it)."""

    cluster: Cluster
    watched: list[dict]  # jobs in flight at the kill
    killed_at: float = field(default_factory=time.monotonic)
    refusals: list[tuple[float, int, dict, str | None]] = field(default_factory=list)
    promoted_at: float | None = None
    accepted: dict | None = None  # the first job accepted after the kill
    accepted_at: float | None = None
    accepted_done_at: float | None = None
    first_done_at: float | None = None  # the first job, in flight or new, done after the kill

    def elapsed(self) -> float:
        return time.monotonic() - self.killed_at

    def note(self, reply: requests.Response) -> bool:
        """Record a refusal; True if `reply` was one."""
        if reply.status_code in (200, 202):
            return False
        retry_after = reply.headers.get("Retry-After")
        self.refusals.append((self.elapsed(), reply.status_code, reply.json(), retry_after))
        return True

    @property
    def last_refusal_at(self) -> float:
        return self.refusals[-1][0] if self.refusals else 0.0


def probe_tick(stack: Stack, probe: Probe, image: bytes) -> None:
    """One tick: the sentinels' master, /readyz, a submit until one is accepted, job states."""
    if probe.promoted_at is None and probe.cluster.master_port() == probe.cluster.replica.port:
        probe.promoted_at = probe.elapsed()
    probe.note(requests.get(stack.base_url + "/readyz", timeout=10))
    if probe.accepted is None:
        reply = submit(stack, image)
        if not probe.note(reply):
            probe.accepted, probe.accepted_at = reply.json(), probe.elapsed()
    elif probe.accepted_done_at is None and status_of(stack, probe.accepted)[1] == "done":
        probe.accepted_done_at = probe.elapsed()
    if probe.first_done_at is None:
        jobs = probe.watched + ([probe.accepted] if probe.accepted else [])
        if any(status_of(stack, job)[1] == "done" for job in jobs):
            probe.first_done_at = probe.elapsed()


def probe_until_recovered(stack: Stack, probe: Probe, image: bytes, bound: float = 90) -> None:
    """Probe every 100 ms until the job accepted after the kill is done and nothing was refused
    for 2 s (bounded)."""
    while probe.elapsed() < bound:
        started = time.monotonic()
        probe_tick(stack, probe, image)
        if probe.accepted_done_at is not None and probe.elapsed() - probe.last_refusal_at > 2:
            return
        time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    pytest.fail(f"not recovered within {bound} s: {probe}")


def assert_refusals_are_503_with_retry_after(probe: Probe) -> None:
    for _, status, body, retry_after in probe.refusals:
        assert status == 503, (status, body)
        assert body.get("error") == "unavailable" or body.get("status") == "unavailable", body
        assert retry_after is not None and int(retry_after) >= 1


def test_failover_to_the_replica(cluster, sentinel_stack):
    stack, image = sentinel_stack, photo_jpeg(96, 96, seed=3)
    for _ in range(2):  # the service works through the sentinels
        assert poll_until(stack, submit(stack, image).json(), timeout=120)["status"] == "done"
    replicated = [submit(stack, image).json() for _ in range(3)]  # in flight at the kill
    assert cluster.client(cluster.master).wait(1, 5000) == 1  # ... and on the replica
    cut_replication(cluster)
    stranded = [submit(stack, image).json() for _ in range(3)]  # only on the master
    os.kill(cluster.master.process.pid, signal.SIGKILL)
    probe = Probe(cluster, watched=replicated)
    probe_until_recovered(stack, probe, image)
    assert probe.promoted_at is not None, "the sentinels never named the replica"
    assert_refusals_are_503_with_retry_after(probe)
    assert probe.refusals and probe.last_refusal_at <= OUTAGE_BOUND, probe.refusals

    after = [submit(stack, image).json() for _ in range(3)]
    assert [poll_until(stack, job, timeout=120)["status"] for job in after] == ["done"] * 3
    outcomes = final_outcomes(stack, replicated + stranded)
    print(
        f"\nsentinel failover: replica promoted {probe.promoted_at:.2f} s after the kill; "
        f"503 until {probe.last_refusal_at:.2f} s ({len(probe.refusals)} refusals); first job "
        f"done at {probe.first_done_at:.2f} s; first job submitted after the kill accepted at "
        f"{probe.accepted_at:.2f} s, done at {probe.accepted_done_at:.2f} s; in flight "
        f"(replicated) {outcomes[:3]}, only on the old master {outcomes[3:]}"
    )
    assert all(outcome in (*FINAL, "not_found") for outcome in outcomes), outcomes
    assert outcomes[3:] == ["not_found"] * 3, "their records existed only on the dead master"


def final_outcomes(stack: Stack, jobs: list[dict], bound: float = 120) -> list[str]:
    """Each job's outcome once none is queued or running any more (bounded)."""

    def settled() -> list[str] | None:
        outcomes = [status_of(stack, job)[1] for job in jobs]
        return outcomes if all(o in (*FINAL, "not_found") for o in outcomes) else None

    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        outcomes = settled()
        if outcomes is not None:
            return outcomes
        time.sleep(0.5)
    return [status_of(stack, job)[1] for job in jobs]
