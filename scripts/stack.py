"""`make run`: the whole stack on localhost in the foreground, stopped cleanly by Ctrl-C/SIGTERM.

Starts, in order: its own Redis (config with a random password and Flower's read-only ACL user
given on stdin, loopback, no persistence, noeviction) unless `M2FP_REDIS_URL` points elsewhere;
`M2FP_WORKERS` Celery workers (default 1, threads split so workers x threads <= cores); the
gateway under gunicorn on `M2FP_HOST:M2FP_PORT`; Flower on 127.0.0.1:`M2FP_FLOWER_PORT` with
basic auth. Secrets it generates (Redis passwords, data key, Flower password) live only in
memory and in the children's environments: never on a command line (`ps` shows argv to every
user) and never on disk. Every child starts with RLIMIT_CORE 0; the Python ones also make
themselves non-dumpable (shared.hardening). With no `M2FP_WEIGHTS` and no checkpoint at
weights/cihp/pytorch_model.pt it runs the real network with random weights and says so loudly.

Supervision: a worker or Flower that exits is restarted with backoff (1 s, doubling to 30 s,
back to 1 s once it has stayed up a minute) while the rest keeps serving; the queue lives in
Redis, so jobs wait for the worker's return. Redis or the gateway exiting stops the whole stack
with a loud message and exit status 1: without them nothing can be served, and a Redis restart
would have lost every job anyway (no persistence, by design). Flower is only a window on the
workers, so it is restarted like a worker rather than taking the service down.

Why not a process manager from PyPI: honcho (Foreman's model) stops every process as soon as
one exits and has no restart policy, which is exactly the behaviour to remove. supervisor
restarts well, but it reads its programs from a config file (secrets for Redis would then be on
disk or on argv, since it cannot feed a child's stdin), gives up on a program after
`startretries` quick failures (FATAL) with a linear delay, needs an event listener to stop
everything when Redis dies, and runs its own control server. The policy needed here is ~60
lines (`Child`/`Stack` below) and is tested end to end (tests/integration/test_make_run.py).
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(REPO))
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0


def banner(lines: list[str], char: str = "=") -> None:
    """Print a framed block to the console."""
    width = max(len(line) for line in lines) + 4
    print(char * width, *(f"{char} {line}" for line in lines), char * width, sep="\n", flush=True)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on host:port."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def pick_port(preferred: int) -> int:
    """`preferred` if free, else any free loopback port."""
    if port_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _no_core_dumps() -> None:
    """In each child before exec: no core file, whatever the program does after."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class Child:
    """One supervised process: how to start it, and its restart state."""

    name: str
    argv: list[str]
    env: dict[str, str]
    stdin: str | None = None
    critical: bool = True  # its exit stops the stack; otherwise it is restarted
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None
    restarts: int = 0
    history: list[int] = field(default_factory=list)


class Stack:
    """The child processes of the stack, each in its own process group, and their supervision."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        stdin: str | None = None,
        critical: bool = True,
    ) -> subprocess.Popen:
        """Start one child; its output goes to this console."""
        child = Child(name, argv, env, stdin, critical)
        self.children.append(child)
        return self._spawn(child)

    def _spawn(self, child: Child) -> subprocess.Popen:
        proc = subprocess.Popen(
            child.argv,
            env=child.env,
            cwd=REPO,
            start_new_session=True,
            preexec_fn=_no_core_dumps,  # noqa: PLW1509  (no threads here)
            stdin=subprocess.PIPE if child.stdin is not None else subprocess.DEVNULL,
        )
        if child.stdin is not None:
            proc.stdin.write(child.stdin.encode())
            proc.stdin.close()
        child.proc, child.started_at, child.restart_at = proc, time.monotonic(), None
        child.history.append(proc.pid)
        print(f"stack: {child.name} started (pid {proc.pid})", file=sys.stderr, flush=True)
        return proc

    def supervise(self) -> Child | None:
        """One pass: schedule or perform restarts; returns a critical child that exited, if any."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)
                continue
            status = child.proc.poll()
            if status is None:
                if now - child.started_at >= HEALTHY_AFTER:
                    child.backoff = BACKOFF_FIRST
                continue
            if child.critical:
                return child
            try:  # its orphans (a worker's pool children) go with it
                os.killpg(child.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if now - child.started_at >= HEALTHY_AFTER:
                child.backoff = BACKOFF_FIRST
            child.restart_at = now + child.backoff
            print(
                f"stack: {child.name} (pid {child.proc.pid}) exited with status {status}; "
                f"restarting it in {child.backoff:g} s; the rest keeps serving",
                file=sys.stderr,
                flush=True,
            )
            child.backoff = min(child.backoff * 2, BACKOFF_MAX)
        return None

    def stop(self) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL stragglers."""
        running = [
            c for c in reversed(self.children) if c.proc is not None and c.proc.poll() is None
        ]
        for child in running:
            try:
                os.killpg(child.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for child in running:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"stack: {child.name} did not stop in time; killing it", file=sys.stderr)
                try:
                    os.killpg(child.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.proc.wait()


def start_redis(stack: Stack, env: dict[str, str]) -> tuple[str, str]:
    """Own Redis, config on stdin (not argv, so `ps` shows no password), no persistence.

    Returns the URL of the services' user and the URL of Flower's read-only ACL user.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(
            "stack: redis-server is not installed; run `make install` as root or apt-get install redis-server"
        )
    port = pick_port(int(env.get("M2FP_REDIS_PORT", "6380")))
    from shared.constants import FLOWER_ACL_RULES

    password, flower_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    config = (
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                "protected-mode yes",
                f'requirepass "{password}"',
                f"user flower on >{flower_password} {FLOWER_ACL_RULES}",
                'save ""',
                "appendonly no",
                "maxmemory-policy noeviction",
                "maxmemory 1gb",
                "dir /tmp",
                "loglevel warning",
                'rename-command CONFIG ""',
                'rename-command DEBUG ""',
            ]
        )
        + "\n"
    )
    stack.start("redis", [binary, "-"], env, stdin=config)
    url = f"redis://:{quote(password)}@127.0.0.1:{port}/0"
    flower_url = f"redis://flower:{quote(flower_password)}@127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return url, flower_url
        except redis.ConnectionError:
            time.sleep(0.1)
    sys.exit("stack: redis-server did not start")


def resolve_weights(env: dict[str, str]) -> tuple[str, bool]:
    """M2FP_WEIGHTS, else the default checkpoint place (shared.config's), else explicit random weights."""
    from shared.config import DEFAULT_WEIGHTS_DIR

    if env.get("M2FP_WEIGHTS"):
        return env["M2FP_WEIGHTS"], env["M2FP_WEIGHTS"] == "random"
    if (REPO / DEFAULT_WEIGHTS_DIR / "pytorch_model.pt").is_file():
        return DEFAULT_WEIGHTS_DIR, False
    return "random", True


def main() -> int:
    """Start everything, wait for Ctrl-C/SIGTERM or a child's exit, stop everything."""
    from shared.hardening import disable_core_dumps

    disable_core_dumps()  # this process holds every generated secret
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    stack = Stack()
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        flower_broker = env.get("M2FP_REDIS_URL")
        if not env.get("M2FP_REDIS_URL"):
            env["M2FP_REDIS_URL"], flower_broker = start_redis(stack, env)
        if not env.get("M2FP_DATA_KEYS") and not env.get("M2FP_DATA_KEYS_FILE"):
            from shared.crypto import generate_key

            env["M2FP_DATA_KEYS"] = f"run{int(time.time())}:{generate_key()}"
        weights, untrained = resolve_weights(env)
        env["M2FP_WEIGHTS"] = weights
        workers = int(env.get("M2FP_WORKERS", "1"))
        if workers < 1:
            sys.exit("stack: M2FP_WORKERS must be >= 1")
        concurrency = int(env.get("M2FP_WORKER_CONCURRENCY", "1"))
        env.setdefault(
            "M2FP_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // (workers * concurrency)))
        )
        host, port = env.setdefault("M2FP_HOST", "127.0.0.1"), env.setdefault("M2FP_PORT", "8000")
        flower_port = pick_port(int(env.get("M2FP_FLOWER_PORT", "5555")))
        flower_user = env.get("M2FP_FLOWER_USER", "admin")
        flower_password = env.get("M2FP_FLOWER_PASSWORD") or secrets.token_urlsafe(12)

        if untrained:
            banner(
                [
                    "UNTRAINED MODEL: no checkpoint found, running M2FP with RANDOM weights.",
                    "Results have the right shape but mean nothing. To use the real model:",
                    "  put the ModelScope checkpoint at weights/cihp/pytorch_model.pt, or",
                    "  set M2FP_WEIGHTS=/path/to/model_dir (see README 'Model weights').",
                ],
                "!",
            )
        metrics_ports = []
        for index in range(workers):
            metrics_ports.append(
                pick_port(int(env.get("M2FP_WORKER_METRICS_PORT", "9100")) + index)
            )
            worker_env = dict(env, M2FP_WORKER_METRICS_PORT=str(metrics_ports[-1]))
            stack.start(
                f"worker-{index + 1}",
                [PY, "-m", "worker", "--", "--hostname", f"worker{index + 1}@%h"],
                worker_env,
                critical=False,
            )
        prom_dir = Path(
            env.setdefault("PROMETHEUS_MULTIPROC_DIR", f"/dev/shm/m2fp-prom-{os.getpid()}")
        )
        prom_dir.mkdir(parents=True, exist_ok=True)
        stack.start(
            "gateway", [PY, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api.wsgi:app"], env
        )
        # Flower gets only its read-only Redis user, by environment (never argv), and not the keys.
        flower_env = {k: v for k, v in env.items() if not k.startswith("M2FP_")}
        flower_env.update(
            FLOWER_BASIC_AUTH=f"{flower_user}:{flower_password}",
            FLOWER_UNAUTHENTICATED_API="false",
            CELERY_BROKER_URL=flower_broker,
        )
        stack.start(
            "flower",
            [
                PY,
                "-m",
                "shared.flower_readonly",
                "flower",
                "--address=127.0.0.1",
                f"--port={flower_port}",
                "--purge_offline_workers=60",
                "--max_tasks=1000",
                "--natural_time=False",
                "--enable_events=False",
            ],
            flower_env,
            critical=False,
        )
        banner(
            [
                f"m2fp-serve is starting: {workers} worker(s), weights: "
                f"{'RANDOM (untrained)' if untrained else weights}",
                f"  web page + API : http://{host}:{port}/   (ready when /readyz says so)",
                f"  Flower         : http://127.0.0.1:{flower_port}/  user {flower_user}  "
                f"password {flower_password}",
                f"  metrics        : http://{host}:{port}/metrics  workers: "
                + " ".join(f"http://127.0.0.1:{p}/metrics" for p in metrics_ports),
                "  submit         : curl -F image=@photo.jpg http://%s:%s/v1/jobs" % (host, port),
                "Ctrl-C stops every process.",
            ]
        )
        while not stopping:
            dead = stack.supervise()
            if dead is not None:
                banner(
                    [
                        f"stack: {dead.name} (pid {dead.proc.pid}) exited with status {dead.proc.returncode}.",
                        "Nothing can be served without it: stopping the whole stack.",
                    ],
                    "!",
                )
                break
            time.sleep(0.5)
    finally:
        print("stack: stopping...", file=sys.stderr, flush=True)
        stack.stop()
        if "prom_dir" in locals():
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
