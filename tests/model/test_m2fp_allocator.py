"""The inference process's malloc tuning (worker/m2fp/allocator.py), measured by page faults.

Each case runs in a fresh interpreter: mallopt is process-wide, and what is measured is whether a
64 MB block freed and allocated again is faulted in by the kernel a second time.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from worker.m2fp import allocator
    described = allocator.configure() if sys.argv[1] == "tuned" else "as is"
    def faults_of_one_block():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 * 1024 * 1024)  # 64 MB, written in full
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_block()  # the first one is faulted in either way
    print(json.dumps({"described": described, "again": faults_of_one_block()}))
    """
)


def probe(mode: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tuned_malloc_reuses_a_freed_large_block_without_page_faults() -> None:
    pages = 64 * 1024 * 1024 // 4096
    as_is, tuned = probe("as is"), probe("tuned")
    assert as_is["again"] > pages // 2, as_is  # mmap'ed anew: every page faulted in again
    assert tuned["again"] < pages // 20, tuned  # the heap block is reused
    assert tuned["described"].startswith("glibc malloc: large blocks reused"), tuned


def test_configure_runs_once_per_process_and_says_what_runs() -> None:
    from worker.m2fp import allocator

    first = allocator.configure()
    assert first == allocator.configure() and first
