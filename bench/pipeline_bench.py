"""End-to-end pipeline benchmark: what the service adds on top of inference.

For N sequential jobs per image size it measures, through real HTTP against a running stack:
submit latency, end-to-end time (submit -> result fetched, polling every 20 ms), and, from the
result's own `timings`, the worker's decode and inference time. The pipeline overhead is
end-to-end minus inference: validation, encryption, Redis, Celery hand-off, rendering, polling.

    python bench/pipeline_bench.py --start-stack            # starts scripts/stack.py (random weights)
    python bench/pipeline_bench.py --server http://127.0.0.1:8000 --runs 10 --json out.json
    M2FP_WORKERS=2 M2FP_TORCH_THREADS=1 python bench/pipeline_bench.py --start-stack --throughput 12

`--throughput N` submits N jobs at once instead and reports jobs per minute and the latency
percentiles of the batch: run it with different M2FP_WORKERS x M2FP_TORCH_THREADS to see what
a host's cores are best split into (oversubscription shows up as lower throughput).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth gradient + noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([100 + 80 * x / width, 120 + 60 * y / height, 160 - 40 * x / width], axis=2)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def one_job(server: str, data: bytes) -> dict[str, float]:
    """Submit, poll, fetch; returns the timings of one job in seconds."""
    start = time.perf_counter()
    reply = requests.post(f"{server}/v1/jobs", files={"image": ("p.jpg", data)}, timeout=60)
    reply.raise_for_status()
    submitted = time.perf_counter()
    job = reply.json()
    headers = {"Authorization": f"Bearer {job['token']}"}
    while True:
        status = requests.get(server + job["status_url"], headers=headers, timeout=30).json()[
            "status"
        ]
        if status == "done":
            break
        if status in ("failed", "expired"):
            raise RuntimeError(f"job ended {status}")
        time.sleep(0.02)
    result = requests.get(server + job["result_url"], headers=headers, timeout=60)
    result.raise_for_status()
    end = time.perf_counter()
    timings = result.json()["timings"]
    return {
        "submit": submitted - start,
        "end_to_end": end - start,
        "inference": timings["inference"],
        "decode": timings.get("decode", 0.0),
        "overhead": end - start - timings["inference"],
    }


def throughput(server: str, jobs: int, size: tuple[int, int]) -> dict[str, float]:
    """Submit `jobs` jobs at once, wait for all; jobs/minute and end-to-end percentiles."""
    from concurrent.futures import ThreadPoolExecutor

    height, width = size
    images = [photo(width, height, seed) for seed in range(jobs)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = list(pool.map(lambda data: one_job(server, data), images))
    wall = time.perf_counter() - start
    latencies = sorted(run["end_to_end"] for run in runs)
    return {
        "jobs": jobs,
        "wall_s": wall,
        "jobs_per_minute": 60 * jobs / wall,
        "p50_s": latencies[len(latencies) // 2],
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "mean_inference_s": statistics.mean(run["inference"] for run in runs),
    }


def start_stack(port: int, log=None) -> subprocess.Popen:
    """scripts/stack.py with random weights on `port`; waits until /readyz says ready. Its output
    goes to `log` (an open file; the stack's JSON event log, which never holds image data) or
    nowhere."""
    env = dict(
        os.environ,
        M2FP_PORT=str(port),
        M2FP_WEIGHTS=os.environ.get("M2FP_WEIGHTS", "random"),
        M2FP_SUBMIT_LIMIT="10000/minute",
        M2FP_POLL_LIMIT="1000000/minute",
    )
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts/stack.py")],
        env=env,
        cwd=REPO,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the stack exited while starting")
        time.sleep(1)
    raise RuntimeError("the stack did not become ready")


def parse_arguments() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--start-stack", action="store_true", help="start scripts/stack.py first")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="512x512,864x640", help="HxW list")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--throughput", type=int, default=0, help="submit N jobs at once (first size only)"
    )
    return parser.parse_args()


def parse_size(size: str) -> tuple[int, int]:
    """`"864x640"` -> (864, 640): height, width."""
    height, width = (int(v) for v in size.lower().split("x"))
    return height, width


def throughput_run(args: argparse.Namespace) -> None:
    """--throughput: N jobs at once at the first size; prints jobs per minute and percentiles."""
    height, width = parse_size(args.sizes.split(",")[0])
    one_job(args.server, photo(width, height, 0))  # warm-up
    row = throughput(args.server, args.throughput, (height, width))
    print(
        f"workers={os.environ.get('M2FP_WORKERS', '1')} threads={os.environ.get('M2FP_TORCH_THREADS', 'auto')} "
        + " ".join(f"{k}={v:.2f}" for k, v in row.items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


def sequential_run(args: argparse.Namespace) -> None:
    """`--runs` sequential jobs per size (after a warm-up); prints the medians as a table."""
    rows = {}
    for size in args.sizes.split(","):
        height, width = parse_size(size)
        one_job(args.server, photo(width, height, 0))  # warm-up
        runs = [
            one_job(args.server, photo(width, height, seed)) for seed in range(1, args.runs + 1)
        ]
        rows[size] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(
        f"{'size (HxW)':>12} {'submit':>8} {'end-to-end':>11} {'inference':>10} {'overhead':>9} {'overhead %':>10}"
    )
    for size, row in rows.items():
        print(
            f"{size:>12} {row['submit']:8.3f} {row['end_to_end']:11.3f} {row['inference']:10.3f} "
            f"{row['overhead']:9.3f} {100 * row['overhead'] / row['end_to_end']:9.1f}%"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": args.runs, "median_seconds": rows}, indent=1)
        )


def main() -> int:
    """Run the benchmark and print a table (and JSON with --json)."""
    args = parse_arguments()
    stack = None
    if args.start_stack:
        port = 18000 + os.getpid() % 1000
        args.server = f"http://127.0.0.1:{port}"
        stack = start_stack(port)
    try:
        if args.throughput:
            throughput_run(args)
        else:
            sequential_run(args)
    finally:
        if stack is not None:
            os.killpg(stack.pid, signal.SIGTERM)
            stack.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
