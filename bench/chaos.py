"""Chaos and soak harness: the real stack under steady load while its processes die.

Starts redis-server (scripts/redis_server.py: password, loopback, no persistence), gunicorn
(api/gunicorn_conf.py) and `--workers` `python -m worker` processes, each in its own process
group, running the test-only network (M2FP_VARIANT=tiny M2FP_TEST_NETWORK=1
M2FP_WEIGHTS=random: untrained, never a speed figure), and drives them through the HTTP API only.
Every job: submit at a fixed rate (open loop), poll until final, fetch the result once, fetch
it again (must be 410). Scenarios, each bounded in jobs and time:

- `child-kill`: a pool child of one worker (found under the worker's pid) SIGKILLed every 10 s;
- `worker-kill`: a whole worker process group SIGKILLed every 10 s, restarted 3 s later;
- `redis-restart`: Redis stopped mid-load for `--outage` s and started on the same port, empty
  (no persistence, as the service runs it); recovery measured without restarting anything;
- `soak`: 2000 jobs, Redis memory and keys at baseline / after / after the TTLs, worker RSS.

    python bench/chaos.py --scenario child-kill --jobs 300 --out docs/bench/chaos-child-kill.json

Per scenario: done, failed by code, lost (never final by the deadline), expired, processed
twice (more than one `job_done` for a job id in the workers' JSON logs), delivered twice (a
second fetch that succeeded), p50/p99 submit-to-done, and every HTTP status seen by kind.
Figures and commands: docs/RELIABILITY.md. tests/integration/test_chaos.py runs a small one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.load_bench import Processes, cpu_description, free_port, percentile  # noqa: E402
from scripts import redis_server  # noqa: E402
from shared.constants import QUEUE, job_key  # noqa: E402
from shared.queue import UNACKED_KEY, message_job_id  # noqa: E402

PY = sys.executable
TEST_NETWORK = {"M2FP_VARIANT": "tiny", "M2FP_TEST_NETWORK": "1", "M2FP_WEIGHTS": "random"}
UNTHROTTLED = {  # the harness is one client: its limits must not be what is measured
    "M2FP_SUBMIT_LIMIT": "1000000/minute",
    "M2FP_SUBMIT_ATTEMPT_LIMIT": "1000000/minute",
    "M2FP_POLL_LIMIT": "10000000/minute",
    "M2FP_MAX_JOBS_PER_CLIENT": "0",
    "M2FP_BAN_AFTER": "0",
    "M2FP_MAX_QUEUE": "100000",
    "M2FP_WORKER_METRICS_PORT": "0",
}
FINAL = ("done", "failed", "expired")
POLL_CAP = 1.0  # seconds between two polls of one job at most (backoff from 50 ms)
SCENARIOS = ("child-kill", "worker-kill", "redis-restart", "soak")
REAPER_EVENTS = ("jobs_of_dead_workers_requeued", "reaper_failed")  # worker/process.py


# --- the stack -------------------------------------------------------------------------------
@dataclass
class StackConfig:
    """How many workers of which concurrency, and extra settings for every process."""

    workers: int = 2
    concurrency: int = 1
    env: dict[str, str] = field(default_factory=dict)


class ChaosStack:
    """Redis, the gateway and the workers of one run; worker `i` may be killed and restarted."""

    def __init__(self, workdir: Path, config: StackConfig):
        self.workdir, self.config = workdir, config
        self.procs = Processes(workdir)
        self.redis: redis_server.RedisServer | None = None
        self.workers: dict[int, subprocess.Popen] = {}
        self.incarnation: dict[int, str] = {}  # worker index -> its current log name
        self.generation: Counter = Counter()
        self.base_url, self.env = "", {}

    def start(self, timeout: float = 180) -> None:
        """Redis, gateway, workers; returns when /readyz counts every worker's pool children."""
        from shared.crypto import generate_key

        self.redis = redis_server.start(self.workdir)
        port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
        self.env.update({**UNTHROTTLED, **TEST_NETWORK, **self.config.env})
        self.env.update(
            M2FP_REDIS_URL=self.redis.url,
            M2FP_DATA_KEYS=f"k1:{generate_key()}",
            M2FP_PORT=str(port),
            M2FP_WORKER_CONCURRENCY=str(self.config.concurrency),
            M2FP_TORCH_THREADS="1",
            PYTHONPATH=str(REPO),
            PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="m2fp-chaos-prom-", dir=_shm()),
        )
        self.base_url = f"http://127.0.0.1:{port}"
        gunicorn = [PY, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api.wsgi:app"]
        self.procs.start("gateway", gunicorn, self.env)
        for index in range(self.config.workers):
            self.start_worker(index)
        self.wait_ready(timeout)

    def start_worker(self, index: int) -> subprocess.Popen:
        """Start (or restart) worker `index`, in its own process group, logging to its own file."""
        self.generation[index] += 1
        name = f"worker{index}-{self.generation[index]}"
        argv = [PY, "-m", "worker", "--no-preflight", "--", "--hostname"]
        argv.append(f"chaos{index}g{self.generation[index]}-{os.getpid()}@%h")
        self.workers[index] = self.procs.start(name, argv, self.env)
        self.incarnation[index] = name
        return self.workers[index]

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /readyz reports every worker's pool processes; SystemExit after timeout."""
        want, start = self.config.workers * self.config.concurrency, time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                reply = requests.get(self.base_url + "/readyz", timeout=2)
                if reply.status_code == 200 and reply.json().get("workers", 0) >= want:
                    return time.monotonic() - start
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.25)
        raise SystemExit(f"chaos: the stack was not ready within {timeout:g} s ({self.workdir})")

    def kill_worker(self, index: int) -> str:
        """SIGKILL worker `index`'s whole process group (main process and pool children)."""
        proc = self.workers[index]
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this harness created for it
        except ProcessLookupError:
            pass
        proc.wait(30)
        return self.incarnation[index]

    def kill_child(self, index: int) -> int:
        """SIGKILL one pool child of worker `index` (a child of its main pid); 0 if none."""
        try:
            children = psutil.Process(self.workers[index].pid).children()
        except psutil.NoSuchProcess:
            return 0
        if not children:
            return 0
        victim = children[0].pid
        os.kill(victim, signal.SIGKILL)
        return victim

    def restart_redis(self, outage: float) -> tuple[float, float]:
        """Stop Redis (its data is lost: no persistence), wait `outage` s, start it on the same
        port and password; returns the wall-clock times it went down and answered again."""
        assert self.redis is not None
        down = time.time()
        redis_server.stop(self.redis)
        time.sleep(outage)
        old = self.redis
        self.redis = redis_server.start(self.workdir, port=old.port, password=old.password)
        return down, time.time()

    def worker_rss(self) -> int:
        """Resident bytes of every live worker tree (main process and pool children)."""
        total = 0
        for proc in self.workers.values():
            try:
                main = psutil.Process(proc.pid)
                total += sum(p.memory_info().rss for p in [main, *main.children(recursive=True)])
            except psutil.NoSuchProcess:
                continue
        return total

    def redis_figures(self) -> dict[str, int]:
        """Redis `used_memory` and `DBSIZE` now."""
        assert self.redis is not None
        client = redis.Redis.from_url(self.redis.url)
        try:
            return {"used_memory": client.info("memory")["used_memory"], "keys": client.dbsize()}
        finally:
            client.close()

    def events(self) -> list[dict]:
        """Every JSON log line with a job id, from every worker incarnation's log."""
        lines = []
        for path in sorted(self.workdir.glob("worker*.log")):
            for raw in path.read_text(errors="replace").splitlines():
                if raw.startswith("{") and '"job_id"' in raw:
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        continue
                    lines.append({**line, "log": path.stem})
        return lines

    def log_events(self, names: tuple[str, ...]) -> dict[str, int]:
        """How many times each of `names` appears in the workers' JSON logs, and the sum of its
        `count` field as `<name>.count` (e.g. the reaper's `jobs_of_dead_workers_requeued`)."""
        counts: Counter = Counter()
        for path in sorted(self.workdir.glob("worker*.log")):
            for raw in path.read_text(errors="replace").splitlines():
                if not raw.startswith("{") or not any(name in raw for name in names):
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if line.get("event") in names:
                    counts[line["event"]] += 1
                    counts[line["event"] + ".count"] += int(line.get("count") or 0)
        return dict(counts)

    def event_times(self, name: str) -> list[float]:
        """Wall-clock times of every `name` event in the workers' JSON logs, in order."""
        times = []
        for path in sorted(self.workdir.glob("worker*.log")):
            for raw in path.read_text(errors="replace").splitlines():
                if raw.startswith("{") and f'"{name}"' in raw:
                    try:
                        times.append(float(json.loads(raw)["ts"]))
                    except (ValueError, KeyError):
                        continue
        return sorted(times)

    def stop(self) -> None:
        """Stop every process this stack started, by pid / process group."""
        self.procs.stop()
        if self.redis is not None:
            redis_server.stop(self.redis)
        shutil.rmtree(self.env.get("PROMETHEUS_MULTIPROC_DIR", ""), ignore_errors=True)


def _shm() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


# --- the load --------------------------------------------------------------------------------
@dataclass
class Job:
    """One job as the client saw it."""

    index: int
    due: float  # monotonic time the submit was due (latencies count from here)
    sent: float = 0.0  # wall-clock time the submit was sent
    submit: str = ""  # "202", or "<status>:<code>", or "error:<exception>"
    job_id: str = ""
    final: str = ""  # "done", "failed:<code>", "expired:<code>", "404:<code>"; "" never final
    latency: float | None = None
    fetches: list[str] = field(default_factory=list)


class Load:
    """`jobs` jobs submitted `rate` per second; each followed until final or the deadline."""

    def __init__(self, base: str, photo: bytes, jobs: int, rate: float, drain: float):
        self.base, self.photo, self.jobs, self.rate, self.drain = base, photo, jobs, rate, drain
        self.replies: Counter = Counter()  # "<kind> <status> <code>" -> count
        self.records: list[Job] = []
        self.deadline = 0.0
        self._lock, self._local = threading.Lock(), threading.local()
        self.done = threading.Event()

    def call(self, kind: str, method: str, path: str, **kwargs) -> requests.Response | None:
        """One request, counted by kind, status and error code; None on a connection error."""
        session = getattr(self._local, "session", None) or requests.Session()
        self._local.session = session
        try:
            reply = session.request(method, self.base + path, timeout=30, **kwargs)
        except requests.RequestException as exc:
            self._count(f"{kind} error {type(exc).__name__}")
            return None
        label = f"{kind} {reply.status_code} {_code(reply)}"
        if reply.status_code in (429, 503) and "Retry-After" not in reply.headers:
            label += " no-retry-after"
        self._count(label)
        return reply

    def _count(self, label: str) -> None:
        with self._lock:
            self.replies[label] += 1

    def run(self) -> list[Job]:
        """Submit on the schedule, follow every job; returns when all are final or at deadline."""
        start = time.monotonic()
        self.deadline = start + self.jobs / self.rate + self.drain
        with ThreadPoolExecutor(max_workers=min(self.jobs, 256)) as pool:
            for index in range(self.jobs):
                job = Job(index, start + index / self.rate)
                self.records.append(job)
                time.sleep(max(0.0, job.due - time.monotonic()))
                pool.submit(self.one, job)
        self.done.set()
        return self.records

    def one(self, job: Job) -> None:
        """Submit, poll until final, fetch the result once, then once more (must be 410)."""
        job.sent = time.time()
        files = {"image": ("photo.jpg", self.photo, "image/jpeg")}
        reply = self.call("submit", "POST", "/v1/jobs", files=files)
        job.submit = "error" if reply is None else _label(reply)
        if reply is None or reply.status_code != 202:
            return
        body = reply.json()
        job.job_id = body["job_id"]
        auth = {"Authorization": f"Bearer {body['token']}"}
        self.follow(job, body["status_url"], auth)
        if job.final == "done":
            for _ in range(2):
                fetched = self.call("result", "GET", body["result_url"], headers=auth)
                job.fetches.append("error" if fetched is None else str(fetched.status_code))

    def follow(self, job: Job, url: str, auth: dict[str, str]) -> None:
        """Poll with backoff (50 ms doubling to POLL_CAP) until final, 404, or the deadline."""
        interval = 0.05
        while time.monotonic() < self.deadline:
            time.sleep(interval)
            interval = min(interval * 2, POLL_CAP)
            reply = self.call("status", "GET", url, headers=auth)
            if reply is None or reply.status_code not in (200, 404):
                continue  # 503 while Redis is away, a refused connection: ask again
            if reply.status_code == 404:
                job.final = f"404:{_code(reply)}"
                return
            body = reply.json()
            if body.get("status") == "done":
                job.final, job.latency = "done", time.monotonic() - job.due
                return
            if body.get("status") in ("failed", "expired"):
                job.final = f"{body['status']}:{(body.get('error') or {}).get('code', '?')}"
                return


def _code(reply: requests.Response) -> str:
    try:
        error = reply.json().get("error")
    except ValueError:
        return "non-json"
    return str(error.get("code") if isinstance(error, dict) else error or "")


def _label(reply: requests.Response) -> str:
    return "202" if reply.status_code == 202 else f"{reply.status_code}:{_code(reply)}"


# --- chaos -----------------------------------------------------------------------------------
@dataclass
class Chaos:
    """What was done to the stack during a run, with wall-clock times."""

    kills: list[dict] = field(default_factory=list)
    redis_down: float = 0.0
    redis_up: float = 0.0


def kill_loop(stack: ChaosStack, load: Load, chaos: Chaos, plan: dict) -> None:
    """Every `plan['every']` s while the load runs, the next of `plan['kills']` ("child": a
    pool child, "worker": a whole worker tree, restarted `restart_after` s later), alternating
    workers."""
    for round_, kind in enumerate(plan["kills"]):
        if load.done.wait(plan["every"]):
            return
        index = round_ % stack.config.workers
        if kind == "child":
            pid = stack.kill_child(index)
            chaos.kills.append({"ts": time.time(), "kind": "child", "worker": index, "pid": pid})
            continue
        name = stack.kill_worker(index)
        chaos.kills.append({"ts": time.time(), "kind": "worker", "worker": index, "log": name})
        time.sleep(plan.get("restart_after", 3.0))
        stack.start_worker(index)


def redis_loop(stack: ChaosStack, load: Load, chaos: Chaos, plan: dict) -> None:
    """Once, `plan['at']` s into the load: Redis down for `plan['outage']` s, then back empty."""
    if load.done.wait(plan["at"]):
        return
    chaos.redis_down, chaos.redis_up = stack.restart_redis(plan["outage"])


def run_load(stack: ChaosStack, jobs: int, rate: float, plan: dict) -> tuple:
    """The load plus the plan's chaos thread (kills, or a Redis outage); returns (load, chaos)."""

    load = Load(stack.base_url, _photo(), jobs, rate, plan.get("drain", 120))
    chaos = Chaos()
    target = kill_loop if plan.get("kills") else redis_loop if plan.get("outage") else None
    thread = None
    if target is not None:
        thread = threading.Thread(target=target, args=(stack, load, chaos, plan), daemon=True)
        thread.start()
    load.run()
    if thread is not None:
        thread.join(plan.get("drain", 120) + 60)
    return load, chaos


# --- figures ---------------------------------------------------------------------------------
def job_figures(load: Load, events: list[dict]) -> dict:
    """Done / failed by code / lost / processed twice / delivered twice / latency percentiles."""
    admitted = [job for job in load.records if job.submit == "202"]
    finals = Counter(job.final or "lost" for job in admitted)
    done_per_job = Counter(e["job_id"] for e in events if e.get("event") == "job_done")
    starts_per_job = Counter(e["job_id"] for e in events if e.get("event") == "job_started")
    latencies = [job.latency for job in admitted if job.latency is not None]
    return {
        "submitted": len(load.records),
        "admitted": len(admitted),
        "refused_by_code": dict(Counter(j.submit for j in load.records if j.submit != "202")),
        "done": finals["done"],
        "failed_by_code": {k[7:]: v for k, v in finals.items() if k.startswith("failed:")},
        "expired": sum(v for k, v in finals.items() if k.startswith("expired")),
        "not_found": sum(v for k, v in finals.items() if k.startswith("404")),
        "lost": finals["lost"],
        "processed_twice": sum(1 for n in done_per_job.values() if n > 1),
        "started_more_than_once": sum(1 for n in starts_per_job.values() if n > 1),
        "delivered_twice": sum(1 for j in admitted if j.fetches[1:2] == ["200"]),
        "first_fetch_not_200": sum(1 for j in admitted if j.fetches and j.fetches[0] != "200"),
        "second_fetch": dict(Counter(j.fetches[1] for j in admitted if len(j.fetches) > 1)),
        "latency_p50_s": _round(percentile(latencies, 50)),
        "latency_p99_s": _round(percentile(latencies, 99)),
        "latency_max_s": _round(max(latencies, default=None)),
        "replies": dict(sorted(load.replies.items())),
        "unhandled_5xx": sum(
            n for k, n in load.replies.items() if _is_5xx(k) and not _is_503_with_retry(k)
        ),
    }


JOB_FIELDS = ("status", "attempts", "worker", "started", "requeued", "resent", "error_code")


def unfinished_report(stack: ChaosStack, load: Load, chaos: Chaos) -> dict:
    """What a `lost` verdict needs to be read: per admitted job with no final state, its record
    in Redis (state fields only, no key material), where its messages are (queued / unacked) and
    its worker log events; with the kills' times."""
    stuck = [job for job in load.records if job.submit == "202" and not job.final]
    if not stuck:
        return {}
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        places: defaultdict[str, list[str]] = defaultdict(list)
        for raw in client.lrange(QUEUE, 0, -1):
            places[str(message_job_id(json.loads(raw)))].append("queued")
        for raw in client.hvals(UNACKED_KEY):
            places[str(message_job_id(json.loads(raw)[0]))].append("unacked")
        records = {
            job.job_id: dict(
                zip(JOB_FIELDS, client.hmget(job_key(job.job_id), JOB_FIELDS), strict=True)
            )
            for job in stuck
        }
    finally:
        client.close()
    events = [e for e in stack.events() if e.get("job_id") in records]
    keep = ("ts", "event", "log", "outcome", "attempt", "worker", "pid", "code")
    return {
        "kills": chaos.kills,
        "jobs": [
            {
                "job_id": job.job_id,
                "sent": job.sent,
                "record": records[job.job_id],
                "messages": places.get(str(job.job_id), []),
                "events": [
                    {k: e[k] for k in keep if k in e} for e in events if e["job_id"] == job.job_id
                ],
            }
            for job in stuck
        ],
    }


def verdict(
    figures: dict, *, allow_data_loss: bool = False, expected: tuple[str, ...] = ("worker_lost",)
) -> list[str]:
    """What went wrong, as short sentences; [] when every target holds. `allow_data_loss`: jobs
    that Redis lost may end expired or 404, failed with any public code (the redis-restart
    scenario); otherwise a job may fail only with an `expected` code (killed past the bound)."""
    from shared.errors import JOB_ERRORS

    unexpected = {k: n for k, n in figures["failed_by_code"].items() if k not in expected}
    problems = [] if allow_data_loss or not unexpected else [f"failed {unexpected}"]
    problems += [
        f"{figures[key]} {key.replace('_', ' ')}"
        for key in ("lost", "processed_twice", "delivered_twice", "unhandled_5xx")
        if figures[key]
    ]
    if not allow_data_loss:
        problems += [f"{figures[k]} {k}" for k in ("expired", "not_found") if figures[k]]
    private = sorted(set(figures["failed_by_code"]) - set(JOB_ERRORS))
    if private:
        problems.append(f"failed with codes that are not public: {private}")
    if figures["first_fetch_not_200"]:
        problems.append(f"{figures['first_fetch_not_200']} done jobs whose one fetch failed")
    return problems


def _is_5xx(label: str) -> bool:
    return label.split()[1].startswith("5")


def _is_503_with_retry(label: str) -> bool:
    return label.split()[1] == "503" and "no-retry-after" not in label


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def requeue_delays(chaos: Chaos, events: list[dict]) -> list[float]:
    """For each whole-worker kill: seconds from the kill until each job that was running in the
    killed worker shows up again in another worker's log (started, done, or not run)."""
    by_job: dict[str, list[dict]] = defaultdict(list)
    for line in sorted(events, key=lambda e: e.get("ts", 0)):
        by_job[line["job_id"]].append(line)
    delays = []
    for kill in (k for k in chaos.kills if k["kind"] == "worker"):
        for lines in by_job.values():
            mine = [e for e in lines if e["log"] == kill["log"] and e["ts"] <= kill["ts"]]
            if not mine or mine[-1].get("event") != "job_started":
                continue
            later = [e["ts"] for e in lines if e["log"] != kill["log"] and e["ts"] > kill["ts"]]
            delays.append(round(min(later) - kill["ts"], 1) if later else float("inf"))
    return delays


def reaper_delays(chaos: Chaos, requeues: list[float]) -> list[float]:
    """Seconds from each whole-worker kill to the reaper's requeue of its jobs: the i-th kill
    paired with the i-th `jobs_of_dead_workers_requeued` event (each kill hits at most one
    running job with concurrency 1; a kill of an idle worker leaves nothing to requeue, so
    compare the counts before trusting the pairing)."""
    kills = [kill["ts"] for kill in chaos.kills if kill["kind"] == "worker"]
    return [round(requeued - killed, 1) for killed, requeued in zip(kills, requeues, strict=False)]


def redis_recovery(load: Load, chaos: Chaos, events: list[dict]) -> dict:
    """While Redis was away: submits by status; after it answered again: seconds until the
    gateway admitted a job and until a worker finished a job submitted after the restart."""
    down, up = chaos.redis_down, chaos.redis_up
    during = Counter(j.submit for j in load.records if down <= j.sent < up)
    after = sorted((j for j in load.records if j.sent >= up), key=lambda j: j.sent)
    first_202 = next((j.sent for j in after if j.submit == "202"), None)
    late_ids = {j.job_id for j in after if j.job_id}
    late = [e for e in events if e["job_id"] in late_ids]
    done_ts = [e["ts"] for e in late if e.get("event") == "job_done"]
    start_ts = [e["ts"] for e in late if e.get("event") == "job_started"]
    before = [j for j in load.records if j.sent < down and j.submit == "202"]
    return {
        "outage_s": round(up - down, 2),
        "persistence": "none (data lost)",
        "submits_during_outage": dict(during),
        "gateway_recovery_s": _round(first_202 - up if first_202 else None),
        "non_202_after_up": sum(1 for j in after if j.submit != "202"),
        "worker_first_start_s": _round(min(start_ts) - up if start_ts else None),
        "worker_recovery_s": _round(min(done_ts) - up if done_ts else None),
        "jobs_before_outage_by_final": dict(Counter(j.final or "lost" for j in before)),
    }


# --- scenarios -------------------------------------------------------------------------------
def scenario_plan(args: argparse.Namespace) -> dict:
    """The chaos of one scenario: how often, how many times, how long to drain."""
    count = max(1, int(args.jobs / args.rate // args.every))
    kind = {"child-kill": "child", "worker-kill": "worker"}.get(args.scenario)
    return {
        "every": args.every,
        "kills": [kind] * count if kind else [],
        "restart_after": args.restart_after,
        "at": args.redis_at,
        "outage": args.outage if args.scenario == "redis-restart" else 0,
        "drain": args.drain,
    }


def soak_env(args: argparse.Namespace) -> dict[str, str]:
    """A short result TTL for the soak, so that 'after the TTLs' is minutes away, not an hour."""
    if args.scenario != "soak":
        return {}
    return {  # an input may wait this long in the queue: longer than the backlog can grow
        "M2FP_INPUT_TTL": "1800",
        "M2FP_RESULT_TTL": str(args.ttl),
        "M2FP_SOFT_TIME_LIMIT": "20",
        "M2FP_HARD_TIME_LIMIT": "30",
    }


def run_scenario(args: argparse.Namespace) -> dict:
    """Start the stack, run one scenario, measure, stop everything."""
    workdir = Path(tempfile.mkdtemp(prefix=f"m2fp-chaos-{args.scenario}-"))
    stack = ChaosStack(workdir, StackConfig(args.workers, args.concurrency, soak_env(args)))
    plan = scenario_plan(args)
    try:
        stack.start()
        memory = {"redis_baseline": stack.redis_figures()}
        if args.scenario == "soak":
            memory.update(warm_up(stack))
        load, chaos = run_load(stack, args.jobs, args.rate, plan)
        memory["redis_after"], memory["worker_rss_end"] = stack.redis_figures(), stack.worker_rss()
        if args.scenario == "soak":
            memory.update(after_ttls(stack, args.ttl))
        events = stack.events()
        figures = job_figures(load, events)
        return {
            **describe(args, plan),
            **figures,
            "verdict": verdict(figures, allow_data_loss=args.scenario == "redis-restart"),
            "kills": chaos.kills,
            "requeue_delays_s": requeue_delays(chaos, events),
            "reaper_delays_s": reaper_delays(chaos, stack.event_times(REAPER_EVENTS[0])),
            "reaper_events": stack.log_events(REAPER_EVENTS),
            "redis_restart": redis_recovery(load, chaos, events) if chaos.redis_up else None,
            "memory": memory,
        }
    finally:
        stack.stop()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


def warm_up(stack: ChaosStack, jobs: int = 20) -> dict:
    """A few jobs first (first-job allocations), then the start figures of the soak."""
    Load(stack.base_url, _photo(), jobs, 5.0, 60).run()
    time.sleep(2)
    return {"redis_after_warmup": stack.redis_figures(), "worker_rss_start": stack.worker_rss()}


def after_ttls(stack: ChaosStack, ttl: int) -> dict:
    """Redis once every TTL has passed: job records live result TTL + 300 s after done."""
    wait = ttl + 300 + 15
    print(f"chaos: waiting {wait} s for the TTLs", flush=True)
    time.sleep(wait)
    return {"redis_after_ttls": stack.redis_figures(), "waited_for_ttls_s": wait}


def _photo() -> bytes:
    from tests.integration.conftest import photo_jpeg

    return photo_jpeg(96, 96, seed=1)


def describe(args: argparse.Namespace, plan: dict) -> dict:
    """The run's parameters, the network and the machine."""
    return {
        "scenario": args.scenario,
        "network": "tiny, random weights (M2FP_TEST_NETWORK=1): untrained, no speed figure",
        "workers": args.workers,
        "concurrency": args.concurrency,
        "rate_per_s": args.rate,
        "plan": plan,
        "cpu": cpu_description(),
        "revision": args.revision or _revision(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _revision() -> str:
    """The commit the code under test is at, `+dirty` when tracked files differ from it."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            check=False,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"


def print_table(result: dict) -> None:
    """One row of the summary table."""
    print(
        "| scenario | submitted | done | failed by code | lost | expired | 404 | processed "
        "twice | delivered twice | p50 s | p99 s | unhandled 5xx |"
    )
    print(
        f"| {result['scenario']} | {result['submitted']} | {result['done']} | "
        f"{result['failed_by_code']} | {result['lost']} | {result['expired']} | "
        f"{result['not_found']} | {result['processed_twice']} | {result['delivered_twice']} | "
        f"{result['latency_p50_s']} | {result['latency_p99_s']} | {result['unhandled_5xx']} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, required=True)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rate", type=float, default=4.0, help="submits per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--restart-after", type=float, default=3.0)
    parser.add_argument("--redis-at", type=float, default=20.0, help="outage starts at (s)")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds Redis is away")
    parser.add_argument("--drain", type=float, default=120.0, help="s after the last submit")
    parser.add_argument("--ttl", type=int, default=30, help="soak: result TTL (s)")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--revision", default="", help="commit of an exported tree (no .git)")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the stack is stopped by pid."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    result = run_scenario(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cpu",)}, indent=1))
    print_table(result)
    print("chaos: " + ("; ".join(result["verdict"]) or "every target held"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
