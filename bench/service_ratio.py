"""Service throughput vs raw model throughput, side by side in one run, on this machine.

raw      `--processes` plain Python processes (each `torch.set_num_threads(1)`, OMP_NUM_THREADS=1,
         as a pool child has), each builds the worker's Predictor (worker.weights.load_predictor,
         the real CIHP network, random weights: the worker's deterministic seed, so the same
         weights as the service), runs one warm-up predict, waits for the others, then runs
         `Predictor.predict` `--images` times on the decoded pixels of the uploaded JPEG.
service  `make run`'s stack (scripts/stack.py, started as bench/pipeline_bench.py does: own Redis,
         M2FP_WORKERS=`--processes` workers at cores / workers torch threads, gunicorn, Flower),
         one warm-up job per worker, then `--processes` x `--images` jobs of the same JPEG
         submitted at once over loopback HTTP; throughput is first submit to last result fetched.

The image is bench/model_bench.py's synthetic photo as a JPEG (quality 90). The client polls
frugally (only the oldest unfinished jobs, one per worker, every `--poll` s) so that the
measuring client costs the 2 cores next to nothing. Phases run raw, service, service, raw
(the stack is started once for the two service phases): the machine is shared and noisy.

    flock /tmp/m2fp-cpu.flock .venv/bin/python bench/service_ratio.py --images 6 \
        --json docs/bench/service-ratio.json
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.chaos import _revision, _stop_on_sigterm  # noqa: E402
from bench.load_bench import cpu_description, free_port, wait_http  # noqa: E402
from bench.model_bench import synthetic_image  # noqa: E402
from bench.pipeline_bench import start_stack  # noqa: E402

UNTHROTTLED = {  # one client submits every job: the per-client limits must not be what is measured
    "M2FP_SUBMIT_ATTEMPT_LIMIT": "1000000/minute",
    "M2FP_MAX_JOBS_PER_CLIENT": "0",
    "M2FP_BAN_AFTER": "0",
}


def synthetic_jpeg(height: int, width: int, quality: int = 90) -> bytes:
    """bench/model_bench.py's photo-like image at (height, width), as a JPEG."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(synthetic_image(height, width)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def decoded(jpeg: bytes):
    """The RGB uint8 pixels of a JPEG, as the worker decodes them (full size)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        return np.array(image.convert("RGB"))


# --- raw: plain processes ----------------------------------------------------------------------
def raw_child(jpeg_path: str, images: int, variant: str) -> None:
    """One raw process: build, warm up, say ready, wait for `go` on stdin, predict, print JSON."""
    import torch

    from shared.constants import RANDOM_WEIGHTS
    from worker.weights import load_predictor

    torch.set_num_threads(1)
    image = decoded(Path(jpeg_path).read_bytes())
    predictor = load_predictor(RANDOM_WEIGHTS, variant=variant, device="cpu", max_side=1920)
    predictor.predict(image)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    start, seconds = time.time(), []
    for _ in range(images):
        tic = time.perf_counter()
        predictor.predict(image)
        seconds.append(time.perf_counter() - tic)
    print(json.dumps({"start": start, "end": time.time(), "seconds": seconds}), flush=True)


def run_raw(jpeg_path: Path, processes: int, images: int, variant: str) -> dict:
    """`processes` raw children predicting at once; images/s summed over them."""
    env = {k: v for k, v in os.environ.items() if k not in ("M2FP_TORCH_THREADS",)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    argv = [sys.executable, __file__, "--raw-child", str(jpeg_path), "--images", str(images)]
    argv += ["--variant", variant]
    children = [
        subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(processes)
    ]
    try:
        for child in children:  # each has built its model and run its warm-up
            _wait_for_line(child, b"ready", timeout=600)
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=images * 120)[0] for child in children]
        reports = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    per_process = [images / (r["end"] - r["start"]) for r in reports]
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    every = [s for r in reports for s in r["seconds"]]
    return {
        "phase": "raw",
        "images": images * processes,
        "images_per_s": round(sum(per_process), 4),
        "images_per_s_over_span": round(images * processes / span, 4),
        "span_s": round(span, 2),
        "predict_mean_s": round(statistics.mean(every), 3),
        "predict_min_s": round(min(every), 3),
        "predict_max_s": round(max(every), 3),
    }


def _wait_for_line(child: subprocess.Popen, line: bytes, timeout: float) -> None:
    """Read the child's stdout until `line` (other output is skipped); SystemExit if it ends."""
    assert child.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = child.stdout.readline()
        if not got:
            raise SystemExit(f"bench: a raw process exited ({child.wait()}) before {line!r}")
        if got.strip() == line:
            return
    raise SystemExit(f"bench: no {line!r} from a raw process within {timeout:g} s")


# --- service: the stack over HTTP --------------------------------------------------------------
def submit(server: str, jpeg: bytes) -> dict:
    """POST one job; returns the 202 body."""
    files = {"image": ("photo.jpg", jpeg, "image/jpeg")}
    reply = requests.post(f"{server}/v1/jobs", files=files, timeout=60)
    reply.raise_for_status()
    return reply.json()


def status(server: str, job: dict) -> str:
    """The job's status now."""
    auth = {"Authorization": f"Bearer {job['token']}"}
    reply = requests.get(server + job["status_url"], headers=auth, timeout=30)
    reply.raise_for_status()
    return reply.json()["status"]


def fetch(server: str, job: dict) -> dict:
    """The job's result document (fetched once, as a client does)."""
    auth = {"Authorization": f"Bearer {job['token']}"}
    reply = requests.get(server + job["result_url"], headers=auth, timeout=60)
    reply.raise_for_status()
    return reply.json()


def run_jobs(server: str, uploads: list[bytes], watch: int, poll: float, limit: float):
    """Submit one job per upload at once, follow them until every result is fetched; polls only
    the `watch` oldest unfinished jobs. Returns (s from first submit to last fetch, results)."""
    start, count = time.perf_counter(), len(uploads)
    with ThreadPoolExecutor(max_workers=min(count, 32)) as pool:
        jobs = list(pool.map(lambda data: submit(server, data), uploads))
    results: dict[int, dict] = {}
    deadline = time.monotonic() + limit
    while len(results) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {count - len(results)} jobs not done within {limit:g} s")
        pending = [i for i in range(count) if i not in results][:watch]
        for index in pending:
            state = status(server, jobs[index])
            if state == "done":
                results[index] = fetch(server, jobs[index])
            elif state in ("failed", "expired"):
                raise SystemExit(f"bench: a job ended {state}")
        time.sleep(poll)
    return time.perf_counter() - start, list(results.values())


def service_phase(server: str, jpeg: bytes, processes: int, images: int, poll: float) -> dict:
    """One measured burst of `processes` x `images` jobs."""
    count = processes * images
    wall, results = run_jobs(server, [jpeg] * count, processes, poll, limit=count * 120)
    inference = [r["timings"]["inference"] for r in results]
    return {
        "phase": "service",
        "images": count,
        "images_per_s": round(count / wall, 4),
        "wall_s": round(wall, 2),
        "inference_mean_s": round(statistics.mean(inference), 3),
        # What the pipeline adds at the phase's own contention: worker time not in `predict`.
        "worker_time_in_inference": round(sum(inference) / (processes * wall), 4),
        "outside_inference_per_job_s": round(
            processes * wall / count - statistics.mean(inference), 3
        ),
        "timings_mean": {
            key: round(statistics.mean(r["timings"].get(key, 0.0) for r in results), 4)
            for key in results[0]["timings"]
        },
    }


def with_stack(processes: int, variant: str, run) -> list[dict]:
    """Start `make run`'s stack with `processes` workers, warm every worker up, `run(server)`."""
    os.environ.update(
        UNTHROTTLED,
        M2FP_WORKERS=str(processes),
        M2FP_FLOWER_PORT=str(free_port()),
        M2FP_WORKER_METRICS_PORT=str(free_port()),
    )
    os.environ.pop("M2FP_TORCH_THREADS", None)  # make run's default: cores / workers
    if variant != "cihp":  # the test-only network (smoke runs of this harness)
        os.environ.update(M2FP_VARIANT=variant, M2FP_TEST_NETWORK="1")
    port = free_port()
    stack = start_stack(port)
    server = f"http://127.0.0.1:{port}"
    try:
        wait_http(
            server + "/readyz",
            lambda code, body: code == 200 and body.get("workers", 0) >= processes,
            300,
            "the workers",
        )
        return run(server)
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        stack.wait(60)


def run_phases(args: argparse.Namespace, jpeg: bytes, jpeg_path: Path) -> list[dict]:
    """raw, service, service, raw (or fewer with --repeats 1): the stack started once."""

    def service(server: str) -> list[dict]:
        run_jobs(server, [jpeg] * args.processes, args.processes, args.poll, 600)  # warm-up
        return [
            service_phase(server, jpeg, args.processes, args.images, args.poll)
            for _ in range(args.repeats)
        ]

    phases = [run_raw(jpeg_path, args.processes, args.images, args.variant)]
    print(json.dumps(phases[-1]), flush=True)
    for row in with_stack(args.processes, args.variant, service):
        phases.append(row)
        print(json.dumps(row), flush=True)
    if args.repeats > 1:
        phases.append(run_raw(jpeg_path, args.processes, args.images, args.variant))
        print(json.dumps(phases[-1]), flush=True)
    return phases


def summarise(phases: list[dict], processes: int) -> dict:
    """Mean throughput of each side, the ratio, and the seconds the service adds per job."""
    raw = statistics.mean(p["images_per_s"] for p in phases if p["phase"] == "raw")
    service = statistics.mean(p["images_per_s"] for p in phases if p["phase"] == "service")
    return {
        "raw_images_per_s": round(raw, 4),
        "service_images_per_s": round(service, 4),
        "ratio": round(service / raw, 3),
        "target_ratio": 0.95,
        "target_met": service / raw >= 0.95,
        # Each of `processes` slots: seconds per job in the service minus seconds per raw image.
        "overhead_per_job_s": round(processes / service - processes / raw, 3),
        "raw_seconds_per_image": round(processes / raw, 3),
        "service_seconds_per_job": round(processes / service, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="640x640", help="upload HxW")
    parser.add_argument("--processes", type=int, default=2, help="raw processes = workers")
    parser.add_argument("--images", type=int, default=6, help="measured images per process")
    parser.add_argument("--repeats", type=int, default=2, choices=(1, 2))
    parser.add_argument("--poll", type=float, default=0.1, help="s between polls")
    parser.add_argument("--revision", default="", help="commit of an exported tree (no .git)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variant", default="cihp", help="tiny: a smoke run of the harness only")
    parser.add_argument("--raw-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `timeout`: stop the stack by pid
    if args.raw_child:
        raw_child(args.raw_child, args.images, args.variant)
        return 0
    height, width = (int(v) for v in args.size.lower().split("x"))
    jpeg = synthetic_jpeg(height, width)
    jpeg_path = Path(f"/tmp/m2fp-service-ratio-{os.getpid()}.jpg")
    jpeg_path.write_bytes(jpeg)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        phases = run_phases(args, jpeg, jpeg_path)
    finally:
        jpeg_path.unlink(missing_ok=True)
    result = {
        "benchmark": "service throughput vs raw model throughput",
        "when": started,
        "cpu": cpu_description(),
        "revision": args.revision or _revision(),
        "setup": {
            "upload": f"{height}x{width} JPEG q90 (bench/model_bench.py synthetic photo)",
            "network": f"{args.variant}, random weights (the worker's seed)",
            "processes": args.processes,
            "torch_threads_each": 1,
            "images_per_process": args.images,
            "order": [p["phase"] for p in phases],
        },
        "phases": phases,
        "summary": summarise(phases, args.processes),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
