"""Load benchmark of the gateway, side by side with the seed's design, on this machine.

Each scenario starts its own processes (redis-server, `python -m worker` x N running the real
M2FP network with random weights, gunicorn with api/gunicorn_conf.py, and Debian's nginx with
deploy/nginx.conf for `ours-nginx`; `bench/seed_baseline.py` under one sync gunicorn worker for
`seed`), drives them with the same open-loop asyncio client, and stops them by pid.

The load: `--clients` clients (default 50), each from its own loopback address (127.0.0.x, so
each is its own client to the limits), each submitting a 512x512 JPEG every `--interval` s on a
fixed schedule whether or not earlier requests have returned (open loop: a latency is measured
from the moment the request was due, so a stalled server cannot hide behind fewer requests),
following each admitted job (status every 2 s, then the one result fetch); a prober asks
`/healthz` 20 times a second from another address. Workers are saturated within seconds: the
queue fills, and the gateway answers the rest with its intended 429 (limits, in-flight cap)
and 503 (queue full), each with Retry-After. With `--trickle N`, N more connections (each from
its own address) announce a 1 MB upload and send it a byte every 2 s, reconnecting when cut.

    python bench/load_bench.py --scenarios ours,ours-trickle,ours-nginx-trickle,seed,seed-trickle \
        --seconds 60 --json docs/bench/load.json

An error is anything but a 2xx or an intended 429/503 with Retry-After: another status, a
refused or reset connection, or no answer within 30 s. Results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.helpers import self_signed_certificate  # noqa: E402 (after the path is set)

PY = sys.executable
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
REQUEST_TIMEOUT = 30.0


# --- machine ---------------------------------------------------------------------------------
def cpu_description() -> dict[str, object]:
    """The CPU model, core count and the flags that matter (one reader: worker/m2fp/cpu.py)."""
    from worker.m2fp.cpu import cpu_summary

    return cpu_summary()


# --- processes -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render_nginx_conf(
    workdir: Path, http_port: int, https_port: int, upstream_port: int | str
) -> Path:
    """deploy/nginx.conf with loopback ports, a fresh self-signed certificate, paths in workdir."""
    tls = workdir / "tls"
    self_signed_certificate(tls)
    conf = (REPO / "deploy/nginx.conf").read_text()
    conf = (
        conf.replace("/tmp/", f"{workdir}/")
        .replace("listen 8080;", f"listen 127.0.0.1:{http_port};")
        .replace("listen 8443 ssl", f"listen 127.0.0.1:{https_port} ssl")
        .replace("/etc/nginx/tls/", f"{tls}/")
        .replace("/dev/stdout", f"{workdir}/access.log")
        .replace("http://gateway-tls:8000", f"http://127.0.0.1:{upstream_port}")
    )
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


class Processes:
    """Children of one scenario, each in its own process group, stopped by pid."""

    def __init__(self, workdir: Path):
        self.workdir, self.children = workdir, []

    def start(
        self, name: str, argv: list[str], env: dict[str, str], nice: int = 0
    ) -> subprocess.Popen:
        if nice:  # nice(1) execs the command: same pid, and no preexec_fn in a threaded parent
            argv = ["nice", "-n", str(nice), *argv]
        # The child holds its own copy of the log's descriptor: ours closes once it is started.
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children.append((name, proc))
        return proc

    def stop(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.children):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                print(f"bench: {name} did not stop; killing it", file=sys.stderr)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_http(url: str, until, timeout: float, what: str) -> None:
    context = ssl._create_unverified_context()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                if until(reply.status, json.loads(reply.read() or b"{}")):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"bench: timed out waiting for {what} ({url})")


def start_redis(procs: Processes) -> str:
    """A password-protected, non-persisting redis-server on a free loopback port; returns its URL."""
    port, password = free_port(), secrets.token_hex(16)
    redis = shutil.which("redis-server") or "redis-server"
    procs.start(
        "redis",
        [
            redis,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(procs.workdir),
        ],
        dict(os.environ),
    )
    return f"redis://:{password}@127.0.0.1:{port}/0"


def service_env(redis_url: str, port: int, workers: int, nginx: bool, gateway: str) -> dict:
    """The environment of the gateway and the workers: no M2FP_* of ours, random weights, the
    machine's cores shared among the workers, `gateway` ("WORKERSxTHREADS") when given."""
    from shared.crypto import generate_key

    prometheus = tempfile.mkdtemp(
        prefix="m2fp-bench-prom-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    env.update(
        M2FP_REDIS_URL=redis_url,
        M2FP_DATA_KEYS=f"k1:{generate_key()}",
        M2FP_WEIGHTS="random",
        M2FP_PORT=str(port),
        PYTHONPATH=str(REPO),
        PROMETHEUS_MULTIPROC_DIR=prometheus,
        M2FP_TORCH_THREADS=str(max(1, (os.cpu_count() or 1) // workers)),
        M2FP_TRUSTED_PROXIES="1" if nginx else "0",
    )
    if gateway:  # "WORKERSxTHREADS"; default: api/gunicorn_conf.py's (shared.config)
        env["M2FP_GATEWAY_WORKERS"], env["M2FP_GATEWAY_THREADS"] = gateway.split("x")
    return env


def start_workers(procs: Processes, env: dict, workers: int, nice: int) -> None:
    """`workers` Celery workers (`python -m worker`), each with its own metrics port."""
    for index in range(workers):
        worker_env = dict(env, M2FP_WORKER_METRICS_PORT=str(free_port()))
        procs.start(
            f"worker{index}",
            [
                PY,
                "-m",
                "worker",
                "--no-preflight",
                "--",
                "--hostname",
                f"bench{index}-{os.getpid()}@%h",
            ],
            worker_env,
            nice=nice,
        )


def start_nginx(procs: Processes, upstream_port: int) -> str:
    """nginx with deploy/nginx.conf in front of the gateway; returns its HTTPS base URL."""
    http_port, https_port = free_port(), free_port()
    conf = render_nginx_conf(procs.workdir, http_port, https_port, upstream_port)
    procs.start(
        "nginx",
        [
            NGINX,
            "-c",
            str(conf),
            "-p",
            str(procs.workdir),
            "-e",
            str(procs.workdir / "error.log"),
            "-g",
            "daemon off;",
        ],
        dict(os.environ),
    )
    base = f"https://127.0.0.1:{https_port}"
    wait_http(base + "/healthz", lambda status, body: status == 200, 30, "nginx")
    return base


def start_ours(
    procs: Processes, workers: int, nginx: bool, worker_nice: int, gateway: str = ""
) -> str:
    """Redis, `workers` workers, the gateway (and nginx in front); returns the base URL."""
    redis_url, port = start_redis(procs), free_port()
    env = service_env(redis_url, port, workers, nginx, gateway)
    time.sleep(0.5)
    procs.start(
        "gateway", [PY, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api.wsgi:app"], env
    )
    start_workers(procs, env, workers, worker_nice)
    base = f"http://127.0.0.1:{port}"
    wait_http(
        base + "/readyz",
        lambda status, body: status == 200 and body.get("workers", 0) >= workers,
        300,
        "the workers",
    )
    return start_nginx(procs, port) if nginx else base


def start_seed(procs: Processes) -> str:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), M2FP_BENCH_THREADS=str(os.cpu_count() or 1))
    procs.start(
        "seed",
        [
            PY,
            "-m",
            "gunicorn",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "--timeout",
            "600",
            "bench.seed_baseline:app",
        ],
        env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz", lambda status, body: status == 200, 120, "the seed baseline")
    return base


# --- the client ------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


_POOLS: dict[tuple[str, str], list] = {}  # idle keep-alive connections per (server, source)


async def _open(base: str, source: str):
    scheme, _, hostport = base.partition("://")
    host, port = hostport.rsplit(":", 1)
    context = ssl._create_unverified_context() if scheme == "https" else None
    return await asyncio.open_connection(host, int(port), ssl=context, local_addr=(source, 0))


async def _exchange(reader, writer, request: bytes) -> tuple[Reply, bool]:
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    if not head[0].startswith("HTTP/"):
        raise ConnectionError("no HTTP response")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in head[1:] if ": " in line)}
    if "content-length" in fields:
        payload = await reader.readexactly(int(fields["content-length"]))
        keep = fields.get("connection", "").lower() != "close"
    else:
        payload, keep = await reader.read(), False
    return Reply(int(head[0].split()[1]), fields, payload), keep


async def http(
    base: str,
    method: str,
    path: str,
    *,
    source: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Reply:
    """One HTTP/1.1 request from `source`, on a kept-alive connection when one is idle (as a
    browser would), else a new one; a reused connection the server has closed is retried once."""
    hostport = base.partition("://")[2]
    head = [f"{method} {path} HTTP/1.1", f"Host: {hostport}", f"Content-Length: {len(body)}"]
    request = (
        "\r\n".join(head + [f"{k}: {v}" for k, v in (headers or {}).items()]) + "\r\n\r\n"
    ).encode() + body
    idle = _POOLS.setdefault((base, source), [])
    while True:
        reused = bool(idle)
        reader, writer = idle.pop() if reused else await _open(base, source)
        try:
            reply, keep = await _exchange(reader, writer, request)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            if reused:
                continue
            raise
        except BaseException:
            writer.close()
            raise
        if keep:
            idle.append((reader, writer))
        else:
            writer.close()
        return reply


def multipart(data: bytes, name: str = "photo.jpg") -> tuple[bytes, dict[str, str]]:
    boundary = secrets.token_hex(12)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@dataclass
class Record:
    """What one scenario saw."""

    latencies: defaultdict = field(default_factory=lambda: defaultdict(list))
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    completed: int = 0
    trickle_cuts: int = 0
    timeline: defaultdict = field(
        default_factory=lambda: defaultdict(list)
    )  # (due, latency) of 2xx

    def outcome(self, kind: str, reply: Reply | None, error: str | None = None) -> str:
        if reply is None:
            self.errors[f"{kind}:{error}"] += 1
            return "error"
        if 200 <= reply.status < 300:
            label = "ok"
        elif reply.status in (429, 503) and "retry-after" in reply.headers:
            label = f"{reply.status}:{_code(reply)}"
        else:
            self.errors[f"{kind}:{reply.status}:{_code(reply)}"] += 1
            label = "error"
        self.outcomes[f"{kind}:{label}"] += 1
        return label


def _code(reply: Reply) -> str:
    try:
        return str(json.loads(reply.body).get("error", "?"))
    except ValueError:
        return "non-json"


async def timed(record: Record, kind: str, due: float, call) -> Reply | None:
    """Run one request; record its latency from `due` (open loop) and its outcome."""
    try:
        reply = await asyncio.wait_for(call(), REQUEST_TIMEOUT)
    except TimeoutError:
        record.outcome(kind, None, "timeout")
        return None
    except OSError as exc:
        record.outcome(kind, None, type(exc).__name__)
        return None
    elapsed = time.monotonic() - due
    record.latencies[kind].append(elapsed)
    if record.outcome(kind, reply) == "ok":
        record.latencies[f"{kind}_ok"].append(elapsed)
        record.timeline[kind].append((round(due, 3), round(elapsed, 4)))
    return reply


async def follow(
    base: str, source: str, job: dict, submitted: float, record: Record, stop: float
) -> None:
    """Poll an admitted job every 2 s until it ends, then fetch its result once."""
    auth = {"Authorization": f"Bearer {job['token']}"}
    while time.monotonic() < stop + 60:
        await asyncio.sleep(2)
        reply = await timed(
            record,
            "poll",
            time.monotonic(),
            lambda: http(base, "GET", job["status_url"], source=source, headers=auth),
        )
        status = (
            json.loads(reply.body).get("status")
            if reply is not None and reply.status == 200
            else None
        )
        if status == "done":
            result = await timed(
                record,
                "result",
                time.monotonic(),
                lambda: http(base, "GET", job["result_url"], source=source, headers=auth),
            )
            if result is not None and result.status == 200:
                record.completed += 1
                record.latencies["job"].append(time.monotonic() - submitted)
            return
        if status in ("failed", "expired"):
            record.outcomes[f"job:{status}"] += 1
            return


async def client(
    base: str,
    seed: bool,
    index: int,
    photo: bytes,
    interval: float,
    stop: float,
    record: Record,
    tasks: set,
) -> None:
    source = f"127.0.0.{10 + index}"
    body, headers = multipart(photo)
    due = time.monotonic() + interval * index / 50
    while due < stop:
        await asyncio.sleep(max(0.0, due - time.monotonic()))

        async def one(due=due):
            path = "/parse" if seed else "/v1/jobs"
            reply = await timed(
                record,
                "submit",
                due,
                lambda: http(base, "POST", path, source=source, body=body, headers=headers),
            )
            if seed and reply is not None and reply.status == 200:
                record.completed += 1
                record.latencies["job"].append(time.monotonic() - due)
            elif not seed and reply is not None and reply.status == 202:
                await follow(base, source, json.loads(reply.body), due, record, stop)

        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        due += interval


async def prober(base: str, stop: float, record: Record, tasks: set) -> None:
    due = time.monotonic()
    while due < stop:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        task = asyncio.create_task(
            timed(record, "healthz", due, lambda: http(base, "GET", "/healthz", source="127.0.0.2"))
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        due += 0.05


async def trickler(base: str, index: int, stop: float, record: Record) -> None:
    """Announce a 1 MB upload and send it a byte every 2 s; reconnect whenever the server cuts it."""
    scheme, _, hostport = base.partition("://")
    host, port = hostport.rsplit(":", 1)
    source = f"127.0.1.{10 + index}"
    while time.monotonic() < stop:
        context = ssl._create_unverified_context() if scheme == "https" else None
        try:
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=context, local_addr=(source, 0)
            )
        except OSError:
            await asyncio.sleep(1)
            continue
        writer.write(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000\r\n\r\n--b\r\n"
        )
        try:
            while time.monotonic() < stop:
                writer.write(b"x")
                await writer.drain()
                try:
                    if not await asyncio.wait_for(reader.read(4096), 2):
                        break
                except TimeoutError:
                    continue
                break  # the server answered (408) and will close
            else:
                return
        except OSError:
            pass
        finally:
            writer.close()
        record.trickle_cuts += 1


async def run_load(
    base: str, seed: bool, clients: int, seconds: float, interval: float, trickle: int
) -> Record:
    from tests.integration.conftest import photo_jpeg

    photo, record, tasks = photo_jpeg(512, 512), Record(), set()
    _POOLS.clear()
    stop = time.monotonic() + seconds
    background = [asyncio.create_task(trickler(base, i, stop, record)) for i in range(trickle)]
    if trickle:
        await asyncio.sleep(2)  # the slow connections are in place before the load starts
        stop += 2
    drivers = [
        asyncio.create_task(client(base, seed, i, photo, interval, stop, record, tasks))
        for i in range(clients)
    ]
    drivers.append(asyncio.create_task(prober(base, stop, record, tasks)))
    await asyncio.gather(*drivers, *background)
    # Requests still out get their full time; followed jobs get until the end of the queue's work.
    pending = [t for t in tasks if not t.done()]
    _, still = (
        await asyncio.wait(pending, timeout=REQUEST_TIMEOUT + 5) if pending else (set(), set())
    )
    for task in still:
        task.cancel()
    # Followers of admitted jobs still queued when the run ends (the queue outlasts it): not errors.
    record.outcomes["jobs_still_queued_at_end"] = len(still)
    return record


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def milliseconds(seconds: float | None) -> float | None:
    """Seconds as milliseconds to 0.1, None kept."""
    return None if seconds is None else round(seconds * 1000, 1)


def summarise(name: str, record: Record, seconds: float) -> dict[str, object]:
    return {
        "scenario": name,
        "seconds": seconds,
        "submit_p50_ms": milliseconds(percentile(record.latencies["submit"], 50)),
        "submit_p99_ms": milliseconds(percentile(record.latencies["submit"], 99)),
        "submit_accepted_p99_ms": milliseconds(percentile(record.latencies["submit_ok"], 99)),
        "healthz_p50_ms": milliseconds(percentile(record.latencies["healthz"], 50)),
        "healthz_p99_ms": milliseconds(percentile(record.latencies["healthz"], 99)),
        "completed_jobs": record.completed,
        "job_p50_s": percentile(record.latencies["job"], 50),
        "errors": sum(record.errors.values()),
        "error_kinds": dict(record.errors),
        "outcomes": dict(record.outcomes),
        "trickle_cuts": record.trickle_cuts,
    }


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, object]:
    seed, nginx, trickle = (
        name.startswith("seed"),
        "nginx" in name,
        args.trickle if "trickle" in name else 0,
    )
    workdir = Path(tempfile.mkdtemp(prefix=f"m2fp-bench-{name}-"))
    procs = Processes(workdir)
    try:
        base = (
            start_seed(procs)
            if seed
            else start_ours(procs, args.workers, nginx, args.worker_nice, args.gateway)
        )
        print(
            f"bench: {name}: {base}, {args.clients} clients for {args.seconds} s, trickle {trickle}",
            flush=True,
        )
        record = asyncio.run(
            run_load(base, seed, args.clients, args.seconds, args.interval, trickle)
        )
    finally:
        procs.stop()
    summary = summarise(name, record, args.seconds)
    summary["gateway"] = args.gateway or "default"
    summary["worker_nice"] = args.worker_nice
    if nginx:
        summary["nginx_spooled_to_disk"] = (
            "buffered to a temporary file" in (workdir / "error.log").read_text()
        )
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios", default="ours,ours-trickle,ours-nginx-trickle,seed,seed-trickle"
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--interval", type=float, default=4.0, help="seconds between one client's submits"
    )
    parser.add_argument("--trickle", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="niceness of the worker processes (the gateway stays at 0)",
    )
    parser.add_argument(
        "--gateway", default="", help="gateway processes x threads, e.g. 2x16 (default: config's)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {
        "cpu": cpu_description(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "scenarios": [run_scenario(name, args) for name in args.scenarios.split(",")],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{results['cpu']}")
    print("| scenario | submit p50 / p99 ms | /healthz p50 / p99 ms | errors | completed jobs |")
    for row in results["scenarios"]:
        print(
            f"| {row['scenario']} | {row['submit_p50_ms']} / {row['submit_p99_ms']} | "
            f"{row['healthz_p50_ms']} / {row['healthz_p99_ms']} | {row['errors']} | {row['completed_jobs']} |"
        )


if __name__ == "__main__":
    main()
