"""`make run`: the whole stack on localhost in the foreground, stopped cleanly by Ctrl-C/SIGTERM.

Starts, in order: its own Redis (config with a random password and Flower's read-only ACL user
given on stdin, loopback, no persistence, noeviction) unless `M2FP_REDIS_URL` points elsewhere
or `M2FP_REDIS_SENTINELS` names the sentinels of one (then Flower follows them too);
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(REPO))
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0

# After the path insert: `python scripts/stack.py` finds the repository's packages.
from shared.config import (  # noqa: E402  (needs the sys.path entry above)
    StackSettings,
    environment,
    find_weights,
    load_stack_settings,
    torch_threads_per_child,
)
from shared.constants import RANDOM_WEIGHTS  # noqa: E402  (as above)


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


# Lines make run adds to scripts/redis_server.py's config: Flower's read-only ACL user, a memory
# cap and no CONFIG/DEBUG (the tests' servers keep CONFIG, to simulate a full Redis).
REDIS_HARDENING = (
    "protected-mode yes",
    "maxmemory 1gb",
    'rename-command CONFIG ""',
    'rename-command DEBUG ""',
)


def start_redis(stack: Stack, settings: StackSettings, env: dict[str, str]) -> tuple[str, str]:
    """Own Redis through scripts/redis_server.py (the tests' helper), supervised by `stack`.

    Returns the URL of the services' user and the URL of Flower's read-only ACL user.
    """
    from scripts import redis_server
    from shared.constants import FLOWER_ACL_RULES

    flower_password = secrets.token_urlsafe(24)
    try:
        server = redis_server.start(
            Path("/tmp"),
            port=pick_port(settings.redis_port),
            password=secrets.token_urlsafe(24),
            extra_config=(
                *REDIS_HARDENING,
                f"user flower on >{flower_password} {FLOWER_ACL_RULES}",
            ),
            spawn=lambda argv, config: stack.start("redis", argv, env, stdin=config),
        )
    except redis_server.RedisServerError as exc:
        sys.exit(f"stack: {exc}")
    return server.url, f"redis://flower:{quote(flower_password)}@127.0.0.1:{server.port}/0"


def resolve_weights(settings: StackSettings) -> tuple[str, bool]:
    """M2FP_WEIGHTS, else the default checkpoint (shared.config's resolver), else random weights."""
    weights = find_weights(settings.weights, REPO) or RANDOM_WEIGHTS
    return weights, weights == RANDOM_WEIGHTS


def service_env(stack: Stack, settings: StackSettings) -> tuple[dict[str, str], str, bool]:
    """The services' environment (own Redis and keyring when none is given, weights, threads).

    Returns it, Flower's broker URL and whether the model is untrained.
    """
    from shared.crypto import generate_key
    from shared.redis_conn import flower_broker_url

    env = environment()
    env["PYTHONPATH"] = str(REPO)
    flower_broker = flower_broker_url(settings.redis_url or "", settings.redis_ca_file)
    if settings.redis_sentinel is not None:  # Redis is the master the sentinels name
        from shared.redis_conn import celery_broker

        flower_broker = celery_broker(settings)[0]  # sentinel:// URLs; Flower adds master_name
    elif not settings.redis_url:
        env["M2FP_REDIS_URL"], flower_broker = start_redis(stack, settings, env)
    if not settings.has_data_keys:
        env["M2FP_DATA_KEYS"] = f"run{int(time.time())}:{generate_key()}"
    if not settings.has_metrics_token:
        env["M2FP_METRICS_TOKEN"] = secrets.token_urlsafe(24)
    weights, untrained = resolve_weights(settings)
    env["M2FP_WEIGHTS"] = weights
    threads = torch_threads_per_child(
        settings.torch_threads, settings.workers * settings.worker_concurrency
    )
    env["M2FP_TORCH_THREADS"] = str(threads)
    env["M2FP_HOST"], env["M2FP_PORT"] = settings.host, str(settings.port)
    return env, flower_broker, untrained


def start_workers(stack: Stack, settings: StackSettings, env: dict[str, str]) -> list[int]:
    """`settings.workers` supervised workers, each with its own metrics port; returns the ports."""
    metrics_ports = []
    for index in range(settings.workers):
        metrics_ports.append(pick_port(settings.worker_metrics_port + index))
        stack.start(
            f"worker-{index + 1}",
            [PY, "-m", "worker", "--", "--hostname", f"worker{index + 1}@%h"],
            dict(env, M2FP_WORKER_METRICS_PORT=str(metrics_ports[-1])),
            critical=False,
        )
    return metrics_ports


def start_gateway(stack: Stack, env: dict[str, str]) -> Path:
    """The gateway under gunicorn, its metrics files in memory; returns their directory."""
    from shared.config import PROMETHEUS_MULTIPROC_VARIABLE, prometheus_multiproc_dir

    prom_dir = Path(prometheus_multiproc_dir(env) or f"/dev/shm/m2fp-prom-{os.getpid()}")
    env[PROMETHEUS_MULTIPROC_VARIABLE] = str(prom_dir)
    prom_dir.mkdir(parents=True, exist_ok=True)
    stack.start(
        "gateway", [PY, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api.wsgi:app"], env
    )
    return prom_dir


def start_flower(
    stack: Stack, settings: StackSettings, env: dict[str, str], broker: str
) -> tuple[int, str]:
    """Flower on loopback with basic auth, read-only; returns its port and password."""
    port = pick_port(settings.flower_port)
    password = settings.flower_password or secrets.token_urlsafe(12)
    # Flower gets only its read-only Redis user, by environment (never argv), and not the keys.
    flower_env = {k: v for k, v in env.items() if not k.startswith("M2FP_")}
    flower_env.update(
        FLOWER_BASIC_AUTH=f"{settings.flower_user}:{password}",
        FLOWER_UNAUTHENTICATED_API="false",
        CELERY_BROKER_URL=broker,
    )
    # With Redis Sentinel, Flower follows the sentinels too (shared.flower_readonly).
    flower_env.update({k: v for k, v in env.items() if k.startswith("M2FP_REDIS_SENTINEL")})
    argv = [PY, "-m", "shared.flower_readonly", "flower", "--address=127.0.0.1", f"--port={port}"]
    argv += ["--purge_offline_workers=60", "--max_tasks=1000", "--natural_time=False"]
    stack.start("flower", [*argv, "--enable_events=False"], flower_env, critical=False)
    return port, password


UNTRAINED_BANNER = [
    "UNTRAINED MODEL: no checkpoint found, running M2FP with RANDOM weights.",
    "Results have the right shape but mean nothing. To use the real model:",
    "  put the ModelScope checkpoint at weights/cihp/pytorch_model.pt, or",
    "  set M2FP_WEIGHTS=/path/to/model_dir (see README 'Model weights').",
]


def ready_banner(
    settings: StackSettings, env: dict[str, str], flower: tuple[int, str], metrics_ports: list[int]
) -> list[str]:
    """The lines printed once everything is started: URLs, Flower's login, how to submit."""
    host, port = settings.host, settings.port
    weights = env["M2FP_WEIGHTS"]
    token = env.get("M2FP_METRICS_TOKEN") or "<M2FP_METRICS_TOKEN_FILE's token>"
    flower_port, flower_password = flower
    shown = "RANDOM (untrained)" if weights == RANDOM_WEIGHTS else weights
    return [
        f"m2fp-serve is starting: {settings.workers} worker(s), weights: {shown}",
        f"  web page + API : http://{host}:{port}/   (ready when /readyz says so)",
        f"  Flower         : http://127.0.0.1:{flower_port}/  user {settings.flower_user}  "
        f"password {flower_password}",
        f"  metrics        : http://{host}:{port}/metrics  with 'Authorization: Bearer {token}'",
        "  worker metrics : " + " ".join(f"http://127.0.0.1:{p}/metrics" for p in metrics_ports),
        f"  submit         : curl -F image=@photo.jpg http://{host}:{port}/v1/jobs",
        "Ctrl-C stops every process.",
    ]


def supervise_until_stopped(stack: Stack, stopping: Callable[[], bool]) -> None:
    """Restart what may restart until a signal asks to stop or a critical child exits."""
    while not stopping():
        dead = stack.supervise()
        if dead is not None:
            banner(
                [
                    f"stack: {dead.name} (pid {dead.proc.pid}) exited with status {dead.proc.returncode}.",
                    "Nothing can be served without it: stopping the whole stack.",
                ],
                "!",
            )
            return
        time.sleep(0.5)


def main() -> int:
    """Start everything, wait for Ctrl-C/SIGTERM or a child's exit, stop everything."""
    from shared.config import ConfigError
    from shared.hardening import disable_core_dumps

    disable_core_dumps()  # this process holds every generated secret
    try:
        settings = load_stack_settings()
    except ConfigError as exc:
        sys.exit(f"stack: {exc}")
    stack, signalled, prom_dir = Stack(), [], None
    signal.signal(signal.SIGINT, lambda *_: signalled.append(True))
    signal.signal(signal.SIGTERM, lambda *_: signalled.append(True))
    try:
        env, flower_broker, untrained = service_env(stack, settings)
        if untrained:
            banner(UNTRAINED_BANNER, "!")
        metrics_ports = start_workers(stack, settings, env)
        prom_dir = start_gateway(stack, env)
        flower = start_flower(stack, settings, env, flower_broker)
        banner(ready_banner(settings, env, flower, metrics_ports))
        supervise_until_stopped(stack, lambda: bool(signalled))
    finally:
        print("stack: stopping...", file=sys.stderr, flush=True)
        stack.stop()
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0 if signalled else 1


if __name__ == "__main__":
    sys.exit(main())
