"""No image byte touches disk: trace every file the gateway and the worker open for writing.

strace attaches to every process of a running stack (gunicorn master and workers, the Celery
parent and its pool child) while they take a 2 MB upload through validation, encryption, Redis,
decoding, inference and the one fetch. Any open/creat/rename/link for writing outside memory
(/dev/shm tmpfs, /dev/null, /proc) fails the test. Werkzeug would spool this upload to a
temporary file by default (anything over 500 KB); api.validation.InMemoryRequest prevents it.
"""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from tests.conftest import wait_for
from tests.integration.conftest import poll_until, submit

pytestmark = pytest.mark.integration

WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TMPFILE", "O_TRUNC", "O_APPEND")
ALLOWED = (
    re.compile(r"^/dev/(shm/|null$|tty$|urandom$|random$)"),
    re.compile(r"^/(proc|sys)/"),
    re.compile(r"\.pyc(\.\d+)?$"),
)


def two_megabyte_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (820, 860, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def written_paths(trace: str) -> list[str]:
    """Paths opened for writing (or created, renamed, linked) in an strace log."""
    paths = []
    for line in trace.splitlines():
        call = re.search(
            r"\b(open|openat|openat2|creat|rename|renameat2?|link|linkat|mkdir|mkdirat)\(", line
        )
        if not call:
            continue
        names = re.findall(r'"([^"]*)"', line)
        if not names:
            continue
        if call.group(1).startswith(("open", "openat")) and not any(f in line for f in WRITE_FLAGS):
            continue
        paths.extend(names if not call.group(1).startswith("open") else names[:1])
    return [p for p in paths if not any(rule.search(p) for rule in ALLOWED)]


TRACED_CALLS = "open,openat,openat2,creat,rename,renameat,renameat2,link,linkat,mkdir,mkdirat"


def start_tracer(pids: list[int], trace_file: Path) -> subprocess.Popen:
    """strace on every one of `pids` (and their future children), the calls that could write a
    file logged to `trace_file`; returns once the kernel says every pid is traced."""
    argv = ["strace", "-f", "-qq", "-e", f"trace={TRACED_CALLS}", "-o", str(trace_file)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.PIPE)

    def attached():  # strace has no ready signal; the kernel does
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            if "TracerPid:\t0\n" in status:
                return False
        return True

    try:
        wait_for(attached, 60, what="strace to attach to the gateway and worker")
    except BaseException:
        tracer.kill()
        tracer.communicate()
        raise
    return tracer


def parse_and_fetch(stack, data: bytes) -> None:
    """Submit `data`, wait for the job to be done and fetch its result once (860 wide)."""
    reply = submit(stack, data, filename="big.png")
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert poll_until(stack, job, timeout=300)["status"] == "done"
    result = requests.get(
        stack.base_url + job["result_url"],
        headers={"Authorization": f"Bearer {job['token']}"},
        timeout=60,
    )
    assert result.status_code == 200 and result.json()["width"] == 860


@pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace is not installed (bootstrap installs it)"
)
def test_two_megabyte_upload_never_touches_disk(stack_factory, tmp_path):
    stack = stack_factory(workers=1)
    data = two_megabyte_png()
    assert len(data) > 2_000_000
    roots = [psutil.Process(stack.gateway.pid), psutil.Process(stack.workers[0].pid)]
    pids = [p.pid for root in roots for p in [root, *root.children(recursive=True)]]
    trace_file = tmp_path / "trace.txt"
    tracer = start_tracer(pids, trace_file)
    try:
        parse_and_fetch(stack, data)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=30)  # waits, and reads and closes its stderr pipe
    trace = trace_file.read_text()
    traced_pids = {line.split()[0] for line in trace.splitlines() if line[:1].isdigit()}
    assert len(traced_pids) >= 2, "strace saw neither the gateway nor the worker"
    assert "openat(" in trace  # the trace really caught file activity
    assert written_paths(trace) == []


def test_trace_parser_catches_writes():
    trace = "\n".join(
        [
            '101 openat(AT_FDCWD, "/tmp/tmpab12", O_RDWR|O_CREAT|O_EXCL|O_CLOEXEC, 0600) = 7',
            '101 openat(AT_FDCWD, "/usr/lib/python3.11/x.py", O_RDONLY|O_CLOEXEC) = 8',
            '102 openat(AT_FDCWD, "/dev/shm/m2fp-prom/counter_1.db", O_RDWR|O_CREAT, 0666) = 9',
            '103 rename("/var/tmp/a", "/var/tmp/b") = 0',
            '104 openat(AT_FDCWD, "/x/__pycache__/m.cpython-311.pyc.1234", O_WRONLY|O_CREAT|O_EXCL, 0644) = 3',
        ]
    )
    assert written_paths(trace) == ["/tmp/tmpab12", "/var/tmp/a", "/var/tmp/b"]
