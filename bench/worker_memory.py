"""Worker memory over many jobs: the resident set of the pool child that runs the model.

Both parts run the real stack of bench/chaos.py's `ChaosStack` (redis-server, gunicorn,
`python -m worker` Celery workers, prefork pool, 1 torch thread per child), the real CIHP
network (every layer, random weights: the worker's seed) and drive it over loopback HTTP with
bench/service_ratio.py's client (all jobs of a batch submitted at once, frugal polling, each
result fetched once). Uploads are bench/model_bench.py's synthetic photo as JPEGs of varied
sizes and aspect ratios, cycled job by job.

soak  `--jobs` (500) jobs through ONE worker in batches of `--every` (25), with the network input
      reduced: the worker is started through this file (`worker_memory.py worker MIN -- ...`),
      which sets the CIHP preset's shortest side `min_size_test` to MIN (and `max_size_test` in
      proportion) in worker.m2fp.config and then runs `python -m worker`'s own main in the same
      process (its pool children are forked from it). No setting of the service changes: this
      entry point exists only here. After each batch (the worker idle): VmRSS and VmHWM of the
      pool child (/proc/<pid>/status), and the pool child's pid (a recycled child would show).
real  `--real-jobs` (30) jobs at the real input (shortest side 640) through `--real-workers` (2)
      workers, uploads 3:4 / 4:3 / 1:1 up to 1440x1920; every pool child's VmRSS sampled every
      0.25 s during the run (max), after each batch, and its VmHWM (which includes the build).

    flock /tmp/m2fp-cpu.flock .venv/bin/python bench/worker_memory.py --json docs/bench/worker-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.chaos import ChaosStack, StackConfig, _revision, _stop_on_sigterm  # noqa: E402
from bench.load_bench import cpu_description  # noqa: E402
from bench.service_ratio import run_jobs, synthetic_jpeg  # noqa: E402

PY = sys.executable
REAL_NETWORK = {"M2FP_VARIANT": "cihp", "M2FP_TEST_NETWORK": "0", "M2FP_WEIGHTS": "random"}
SOAK_SIZES = (  # H x W, longer side <= 800 (the readout runs at the upload's size)
    (480, 640),
    (640, 480),
    (512, 512),
    (300, 400),
    (400, 300),
    (450, 800),
    (800, 450),
    (360, 360),
    (200, 600),
    (600, 200),
    (240, 320),
    (320, 240),
)
REAL_SIZES = (
    (480, 640),
    (640, 480),
    (640, 640),
    (960, 1280),
    (1280, 960),
    (1080, 1080),
    (1440, 1920),
    (1920, 1440),
    (1440, 1440),
    (768, 1024),
)
MIB = 1024 * 1024


# --- the worker with a reduced input ------------------------------------------------------------
def reduced_worker(min_size: int, argv: list[str]) -> int:
    """Set the CIHP preset's input size, then run `python -m worker`'s main with `argv`."""
    from worker.m2fp import config

    cihp = config.get_config("cihp")
    max_size = round(cihp.max_size_test * min_size / cihp.min_size_test)
    config._PRESETS["cihp"] = cihp.replace(min_size_test=min_size, max_size_test=max_size)
    print(f"worker_memory: CIHP input shortest side {min_size}, longest <= {max_size}", flush=True)
    import worker.__main__ as worker_main

    return worker_main.main(argv)


class MemoryStack(ChaosStack):
    """ChaosStack whose workers run the real network, at a reduced input when `min_size`."""

    def __init__(self, workdir: Path, workers: int, min_size: int | None):
        super().__init__(workdir, StackConfig(workers, 1, dict(REAL_NETWORK)))
        self.min_size = min_size

    def start_worker(self, index: int):
        if self.min_size is None:
            return super().start_worker(index)
        self.generation[index] += 1
        name = f"worker{index}-{self.generation[index]}"
        argv = [PY, __file__, "worker", str(self.min_size), "--", "--no-preflight", "--"]
        argv += ["--hostname", f"memory{index}-{os.getpid()}@%h"]
        self.workers[index] = self.procs.start(name, argv, self.env)
        self.incarnation[index] = name
        return self.workers[index]

    def pool_children(self) -> list[int]:
        """Pids of every worker's pool children (the processes that run the model)."""
        pids = []
        for proc in self.workers.values():
            pids += [child.pid for child in psutil.Process(proc.pid).children()]
        return sorted(pids)


def memory_of(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid` in MiB (/proc/<pid>/status)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def uploads(sizes, count: int, offset: int = 0) -> list[bytes]:
    """`count` JPEGs cycling through `sizes` from `offset` (cached per size)."""
    return [_jpeg(*sizes[(offset + i) % len(sizes)]) for i in range(count)]


_JPEGS: dict[tuple[int, int], bytes] = {}


def _jpeg(height: int, width: int) -> bytes:
    if (height, width) not in _JPEGS:
        _JPEGS[(height, width)] = synthetic_jpeg(height, width)
    return _JPEGS[(height, width)]


# --- the two parts --------------------------------------------------------------------------------
def run_batches(stack: MemoryStack, sizes, jobs: int, every: int, limit: float) -> list[dict]:
    """`jobs` jobs in closed-loop batches of `every`; the pool children's memory after each."""
    samples: list[dict] = []
    start = time.monotonic()
    watch = len(stack.workers)
    for offset in range(0, jobs, every):
        if time.monotonic() - start > limit:
            print(f"worker_memory: stopped at {offset} jobs, past {limit:g} s", flush=True)
            break
        count = min(every, jobs - offset)
        wall, results = run_jobs(
            stack.base_url, uploads(sizes, count, offset), watch, 0.1, count * 120
        )
        time.sleep(0.5)  # the result is stored before the child's last frees
        sample = {
            "jobs": offset + count,
            "batch_s": round(wall, 2),
            "inference_mean_s": round(
                statistics.mean(r["timings"]["inference"] for r in results), 3
            ),
            "children": {str(pid): memory_of(pid) for pid in stack.pool_children()},
        }
        samples.append(sample)
        print(json.dumps(sample), flush=True)
    return samples


def rss_growth(samples: list[dict]) -> dict:
    """First sample (after the warm-up batch) vs the last, per pool child and overall."""
    first, last = samples[0]["children"], samples[-1]["children"]
    same = sorted(first) == sorted(last)
    rss = [m["VmRSS"] for s in samples for m in s["children"].values()]
    growth = [
        100 * (last[pid]["VmRSS"] - first[pid]["VmRSS"]) / first[pid]["VmRSS"]
        for pid in first
        if pid in last
    ]
    return {
        "same_pool_children_throughout": same,
        "rss_after_warmup_mib": max(m["VmRSS"] for m in first.values()),
        "rss_end_mib": max(m["VmRSS"] for m in last.values()),
        "rss_min_mib": min(rss),
        "rss_max_mib": max(rss),
        "growth_percent": round(max(growth), 2) if growth else None,
        "hwm_end_mib": max(m["VmHWM"] for m in last.values()),
    }


def soak(args: argparse.Namespace) -> dict:
    """`args.jobs` jobs through one worker at the reduced input; RSS every `args.every` jobs."""
    stack = MemoryStack(Path(tempfile.mkdtemp(prefix="m2fp-memory-soak-")), 1, args.min_size)
    try:
        stack.start(timeout=300)
        samples = run_batches(stack, SOAK_SIZES, args.jobs, args.every, args.limit)
    finally:
        stack.stop()
    summary = rss_growth(samples)
    summary["target_met"] = summary["rss_max_mib"] <= 1500 and (summary["growth_percent"] or 0) <= 5
    return {
        "jobs": samples[-1]["jobs"],
        "workers": 1,
        "torch_threads": 1,
        "network_input_shortest_side": args.min_size,
        "uploads_hxw": [f"{h}x{w}" for h, w in SOAK_SIZES],
        "samples": samples,
        "summary": summary,
    }


class Sampler:
    """Every pool child's VmRSS every `interval` s in a thread; the maximum per pid."""

    def __init__(self, stack: MemoryStack, interval: float = 0.25):
        self.stack, self.interval, self.peak = stack, interval, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            for pid in self.stack.pool_children():
                try:
                    rss = memory_of(pid)["VmRSS"]
                except (OSError, KeyError):
                    continue
                self.peak[str(pid)] = max(rss, self.peak.get(str(pid), 0.0))

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)


def real_size(args: argparse.Namespace) -> dict:
    """`args.real_jobs` jobs at the real input through `args.real_workers` workers."""
    workdir = Path(tempfile.mkdtemp(prefix="m2fp-memory-real-"))
    stack = MemoryStack(workdir, args.real_workers, None)
    try:
        stack.start(timeout=300)
        with Sampler(stack) as sampler:
            samples = run_batches(stack, REAL_SIZES, args.real_jobs, 10, args.limit)
    finally:
        stack.stop()
    summary = rss_growth(samples)
    summary["rss_sampled_max_mib"] = max(sampler.peak.values())
    summary["target_met"] = summary["rss_sampled_max_mib"] <= 1500
    return {
        "jobs": samples[-1]["jobs"],
        "workers": args.real_workers,
        "torch_threads": 1,
        "network_input_shortest_side": 640,
        "uploads_hxw": [f"{h}x{w}" for h, w in REAL_SIZES],
        "samples": samples,
        "sampled_peak_per_child_mib": sampler.peak,
        "summary": summary,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="soak,real", help="soak, real or both")
    parser.add_argument("--jobs", type=int, default=500, help="soak jobs")
    parser.add_argument("--every", type=int, default=25, help="soak jobs between RSS samples")
    parser.add_argument("--min-size", type=int, default=128, help="soak input shortest side")
    parser.add_argument("--real-jobs", type=int, default=30)
    parser.add_argument("--real-workers", type=int, default=2)
    parser.add_argument("--limit", type=float, default=1500, help="s per part at most")
    parser.add_argument("--revision", default="", help="commit of an exported tree (no .git)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # the worker entry: worker MIN -- <python -m worker arguments>
        return reduced_worker(int(argv[1]), argv[3:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `timeout`: stop the stack by pid
    result: dict = {
        "benchmark": "worker memory over many jobs",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_description(),
        "revision": args.revision or _revision(),
        "network": "CIHP (ResNet-101, every layer), random weights (the worker's seed)",
        "target": "pool child RSS <= 1500 MiB, growth <= 5 % over the soak",
    }
    parts = args.parts.split(",")
    if "soak" in parts:
        result["soak"] = soak(args)
        print(json.dumps(result["soak"]["summary"]), flush=True)
    if "real" in parts:
        result["real"] = real_size(args)
        print(json.dumps(result["real"]["summary"]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
