"""Read deadlines for client sockets: a request's headers and body must arrive in bounded time.

A client that announces a large `Content-Length` and then trickles a byte every few seconds
would otherwise hold a gateway thread for as long as it likes. Socket timeouts cannot bound
that (each `recv` returns a byte in time); a total deadline can. `ReadDeadlines` owns one
daemon thread per process with a heap of deadlines: when a socket's deadline passes, the
thread shuts down the socket's *read* side (`shutdown(SHUT_RD)`), so the blocked `recv`
returns end-of-file at once and the request fails fast, while the write side stays open for
the JSON 408 the app then sends (`fired(sock)` tells the app that the deadline, not the
client, ended the body).

Armed by `api.gunicorn_worker.GuardedThreadWorker` around each request a thread handles, and
disarmed when the thread is done with it, before gunicorn closes or parks the connection.
Imports neither flask nor gunicorn.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass(order=True)
class _Deadline:
    at: float
    seq: int
    sock: socket.socket = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    fired: bool = field(default=False, compare=False)


class ReadDeadlines:
    """Cut the read side of sockets whose deadline has passed; one thread per process."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[_Deadline] = []
        self._by_fd: dict[int, _Deadline] = {}
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.fired_total = 0

    def arm(self, sock: socket.socket, seconds: float) -> _Deadline:
        """Start `sock`'s deadline `seconds` from now; returns the handle for `disarm`."""
        entry = _Deadline(self._clock() + seconds, next(self._seq), sock)
        with self._cond:
            self._ensure_thread()
            heapq.heappush(self._heap, entry)
            self._by_fd[sock.fileno()] = entry
            self._cond.notify()
        return entry

    def disarm(self, entry: _Deadline) -> None:
        """The request is done with the socket: its deadline no longer applies."""
        with self._cond:
            entry.cancelled = True
            fd = _fileno(entry.sock)
            if fd is not None and self._by_fd.get(fd) is entry:
                del self._by_fd[fd]

    def fired(self, sock: socket.socket | None) -> bool:
        """True when `sock`'s current deadline has passed and its read side was cut."""
        fd = _fileno(sock) if sock is not None else None
        with self._cond:
            entry = self._by_fd.get(fd) if fd is not None else None
            return bool(entry and entry.fired)

    def _ensure_thread(self) -> None:
        # Called with the lock held. A forked child (gunicorn worker) starts its own thread.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name="m2fp-read-deadlines", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0].at - self._clock()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)
                entry.fired = True
                self.fired_total += 1
                try:
                    entry.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass  # already closed or reset by the peer: nothing left to cut


def _fileno(sock: socket.socket) -> int | None:
    try:
        fd = sock.fileno()
    except OSError:
        return None
    return fd if fd >= 0 else None


DEADLINES = ReadDeadlines()
