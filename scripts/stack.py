"""`make run`: the whole stack on localhost in the foreground, stopped cleanly by Ctrl-C/SIGTERM.

Starts, in order: its own Redis (random password given on stdin, loopback, no persistence,
noeviction) unless `M2FP_REDIS_URL` points elsewhere; `M2FP_WORKERS` Celery workers (default 1,
threads split so workers x threads <= cores); the gateway under gunicorn on
`M2FP_HOST:M2FP_PORT`; Flower on 127.0.0.1:`M2FP_FLOWER_PORT` with basic auth. Secrets it
generates (Redis password, data key, Flower password) live only in memory and in the children's
environments. With no `M2FP_WEIGHTS` and no checkpoint at weights/cihp/pytorch_model.pt it runs
the real network with random weights and says so loudly.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(REPO))


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


class Stack:
    """The child processes of the stack, each in its own process group."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], stdin: str | None = None):
        """Start one child; its output goes to this console."""
        proc = subprocess.Popen(argv, env=env, cwd=REPO, start_new_session=True,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
        if stdin is not None:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        self.children.append((name, proc))
        return proc

    def stop(self) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL stragglers."""
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for name, proc in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"stack: {name} did not stop in time; killing it", file=sys.stderr)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    def first_exited(self):
        """The (name, process) of a child that has exited, if any."""
        return next(((n, p) for n, p in self.children if p.poll() is not None), None)


def start_redis(stack: Stack, env: dict[str, str]) -> str:
    """Own Redis: password from stdin (not argv, so `ps` does not show it), no persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("stack: redis-server is not installed; run `make install` as root or apt-get install redis-server")
    port = pick_port(int(env.get("M2FP_REDIS_PORT", "6380")))
    password = secrets.token_urlsafe(24)
    config = "\n".join([
        f"port {port}", "bind 127.0.0.1", "protected-mode yes", f'requirepass "{password}"',
        'save ""', "appendonly no", "maxmemory-policy noeviction", "maxmemory 1gb",
        "dir /tmp", "loglevel warning", "rename-command CONFIG \"\"", "rename-command DEBUG \"\"",
    ]) + "\n"
    stack.start("redis", [binary, "-"], env, stdin=config)
    url = f"redis://:{quote(password)}@127.0.0.1:{port}/0"
    import redis  # noqa: PLC0415

    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return url
        except redis.ConnectionError:
            time.sleep(0.1)
    sys.exit("stack: redis-server did not start")


def resolve_weights(env: dict[str, str]) -> tuple[str, bool]:
    """M2FP_WEIGHTS, else the default checkpoint place (shared.config's), else explicit random weights."""
    from shared.config import DEFAULT_WEIGHTS_DIR  # noqa: PLC0415

    if env.get("M2FP_WEIGHTS"):
        return env["M2FP_WEIGHTS"], env["M2FP_WEIGHTS"] == "random"
    if (REPO / DEFAULT_WEIGHTS_DIR / "pytorch_model.pt").is_file():
        return DEFAULT_WEIGHTS_DIR, False
    return "random", True


def main() -> int:
    """Start everything, wait for Ctrl-C/SIGTERM or a child's exit, stop everything."""
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
        if not env.get("M2FP_REDIS_URL"):
            env["M2FP_REDIS_URL"] = start_redis(stack, env)
        if not env.get("M2FP_DATA_KEYS") and not env.get("M2FP_DATA_KEYS_FILE"):
            from shared.crypto import generate_key  # noqa: PLC0415

            env["M2FP_DATA_KEYS"] = f"run{int(time.time())}:{generate_key()}"
        weights, untrained = resolve_weights(env)
        env["M2FP_WEIGHTS"] = weights
        workers = int(env.get("M2FP_WORKERS", "1"))
        if workers < 1:
            sys.exit("stack: M2FP_WORKERS must be >= 1")
        concurrency = int(env.get("M2FP_WORKER_CONCURRENCY", "1"))
        env.setdefault("M2FP_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // (workers * concurrency))))
        host, port = env.setdefault("M2FP_HOST", "127.0.0.1"), env.setdefault("M2FP_PORT", "8000")
        flower_port = pick_port(int(env.get("M2FP_FLOWER_PORT", "5555")))
        flower_user = env.get("M2FP_FLOWER_USER", "admin")
        flower_password = env.get("M2FP_FLOWER_PASSWORD") or secrets.token_urlsafe(12)

        if untrained:
            banner(["UNTRAINED MODEL: no checkpoint found, running M2FP with RANDOM weights.",
                    "Results have the right shape but mean nothing. To use the real model:",
                    "  put the ModelScope checkpoint at weights/cihp/pytorch_model.pt, or",
                    "  set M2FP_WEIGHTS=/path/to/model_dir (see README 'Model weights')."], "!")
        metrics_ports = []
        for index in range(workers):
            metrics_ports.append(pick_port(int(env.get("M2FP_WORKER_METRICS_PORT", "9100")) + index))
            worker_env = dict(env, M2FP_WORKER_METRICS_PORT=str(metrics_ports[-1]))
            stack.start(f"worker-{index + 1}", [PY, "-m", "worker", "--", "--hostname",
                                                f"worker{index + 1}@%h"], worker_env)
        prom_dir = Path(env.setdefault("PROMETHEUS_MULTIPROC_DIR", f"/dev/shm/m2fp-prom-{os.getpid()}"))
        prom_dir.mkdir(parents=True, exist_ok=True)
        stack.start("gateway", [PY, "-m", "gunicorn", "-c", "api/gunicorn_conf.py", "api.wsgi:app"], env)
        flower_env = dict(env, FLOWER_BASIC_AUTH=f"{flower_user}:{flower_password}",
                          FLOWER_UNAUTHENTICATED_API="false")
        stack.start("flower", [PY, "-m", "celery", "--broker", env["M2FP_REDIS_URL"], "flower",
                               "--address=127.0.0.1", f"--port={flower_port}", "--purge_offline_workers=60",
                               "--max_tasks=1000", "--natural_time=False"], flower_env)
        banner([f"m2fp-serve is starting: {workers} worker(s), weights: "
                f"{'RANDOM (untrained)' if untrained else weights}",
                f"  web page + API : http://{host}:{port}/   (ready when /readyz says so)",
                f"  Flower         : http://127.0.0.1:{flower_port}/  user {flower_user}  "
                f"password {flower_password}",
                f"  metrics        : http://{host}:{port}/metrics  workers: "
                + " ".join(f"http://127.0.0.1:{p}/metrics" for p in metrics_ports),
                "  submit         : curl -F image=@photo.jpg http://%s:%s/v1/jobs" % (host, port),
                "Ctrl-C stops every process."])
        while not stopping:
            exited = stack.first_exited()
            if exited:
                print(f"stack: {exited[0]} exited with status {exited[1].returncode}; stopping", file=sys.stderr)
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
