"""A private redis-server for `make run` (scripts/stack.py) and the tests: the one way both start it.

`start(workdir, ...)` writes the config on the server's stdin (`redis-server -`), never on its
command line, where `ps` would show the password to every user; binds loopback only; requires
a password (generated unless given); persists nothing (`save ""`, no AOF) and refuses writes
when full (`noeviction`) instead of evicting jobs. It waits until the server answers a PING and
returns a `RedisServer` (URL, port, password, process). Callers add their own lines
(`make run`: Flower's read-only ACL user, a memory cap, CONFIG and DEBUG disabled) and
arguments (tests: `--maxmemory 3mb`), and may start the process themselves through `spawn`
(`make run` supervises it with the rest of its stack). `stop(server)` ends it by its pid.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

START_TIMEOUT = 10.0

# spawn(argv, config text for stdin) -> the started process
Spawn = Callable[[list[str], str], subprocess.Popen]


class RedisServerError(RuntimeError):
    """redis-server is not installed, or did not answer in time."""


@dataclass(frozen=True)
class RedisServer:
    """A started redis-server: its URL (default user, db 0), port, password and process."""

    url: str
    port: int
    password: str
    process: subprocess.Popen

    def as_dict(self) -> dict:
        """The fields as a dict (the tests' historical handle)."""
        return {
            "url": self.url,
            "port": self.port,
            "password": self.password,
            "process": self.process,
        }


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_text(port: int, password: str, workdir: Path, extra: Sequence[str] = ()) -> str:
    """The server's configuration: loopback, password, no persistence, noeviction, `extra`."""
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f'requirepass "{password}"',
        'save ""',
        "appendonly no",
        "maxmemory-policy noeviction",
        f'dir "{workdir}"',
        "loglevel warning",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def start(
    workdir: Path,
    *,
    port: int | None = None,
    password: str | None = None,
    extra_config: Sequence[str] = (),
    args: Sequence[str] = (),
    spawn: Spawn | None = None,
) -> RedisServer:
    """Start redis-server (see the module doc) and wait until it answers; RedisServerError if not."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerError(
            "redis-server is not installed: run `make install` as root, or apt-get install redis-server"
        )
    port, password = port or free_port(), password or secrets.token_hex(16)
    config = config_text(port, password, workdir, extra_config)
    process = (spawn or _popen)([binary, "-", *args], config)
    url = f"redis://:{quote(password)}@127.0.0.1:{port}/0"
    wait_until_up(url)
    return RedisServer(url, port, password, process)


def _popen(argv: list[str], config: str) -> subprocess.Popen:
    """Start the server quietly, its config on stdin."""
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    process.stdin.write(config.encode())
    process.stdin.close()
    return process


def wait_until_up(url: str, timeout: float = START_TIMEOUT) -> None:
    """Return once the server at `url` answers PING; RedisServerError after `timeout` seconds."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
    finally:
        client.close()
    raise RedisServerError(f"redis-server did not answer within {timeout:g} s")


def stop(server: RedisServer, grace: float = 10.0) -> None:
    """SIGTERM the server (by its pid), SIGKILL it if it outlives `grace` seconds."""
    if server.process.poll() is not None:
        return
    server.process.terminate()
    try:
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(grace)
