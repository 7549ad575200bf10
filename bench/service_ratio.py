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
frugally (only the oldest unfinished jobs, one per worker, every `--poll` s, at once again after
a round that found one done) so that the measuring client costs the 2 cores next to nothing.
Phases alternate raw, service, raw, service, raw in one run of the stack: the machine is shared
and its speed drifts over minutes (on the KVM guest of run G the last raw phase of an
ABBA order was 6-10 % faster than the first, three runs out of three), so raw and service take
turns. The raw phases run beside the idle stack; what it uses then is reported per phase
(`stack_idle_cpu_share`: 0.45 % of the cores there, and raw beside it measured 1.080 against
1.081 images/s without it).

    flock /tmp/m2fp-cpu.flock .venv/bin/python bench/service_ratio.py \
        --json docs/bench/service-ratio-run-g.json      # 24 images per process, 0.5 s polling
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
    """Submit one job per upload at once, follow them until every result is fetched. Polls only
    the `watch` oldest unfinished jobs, oldest by when their submission was answered (the order
    the gateway queued them in, not the order of `uploads`: the submissions run concurrently),
    and sleeps `poll` s only after a round that found none of them done (a done job's successor
    is asked at once). Returns (s from first submit to last fetch, results)."""
    start, count = time.perf_counter(), len(uploads)

    def submitted(data: bytes) -> tuple[float, dict]:
        job = submit(server, data)
        return time.perf_counter(), job

    with ThreadPoolExecutor(max_workers=min(count, 32)) as pool:
        jobs = [job for _, job in sorted(pool.map(submitted, uploads), key=lambda row: row[0])]
    results: dict[int, dict] = {}
    deadline = time.monotonic() + limit
    while len(results) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {count - len(results)} jobs not done within {limit:g} s")
        pending = [i for i in range(count) if i not in results][:watch]
        finished = 0
        for index in pending:
            state = status(server, jobs[index])
            if state == "done":
                results[index] = fetch(server, jobs[index])
                finished += 1
            elif state in ("failed", "expired"):
                raise SystemExit(f"bench: a job ended {state}")
        if not finished:
            time.sleep(poll)
    return time.perf_counter() - start, list(results.values())


def _role(process) -> str:
    """What a stack process is: `pool child` (a worker's fork, same command line as its parent),
    `worker main`, `gateway` (gunicorn and its workers), `redis`, `flower`, ..."""
    import psutil

    try:
        command = " ".join(process.cmdline())
        parent = process.parent()
        parent_command = " ".join(parent.cmdline()) if parent is not None else ""
    except psutil.Error:
        return "gone"
    for needle, role in (("flower", "flower"), ("gunicorn", "gateway"), ("redis", "redis")):
        if needle in command:
            return role
    if "worker" in command:
        return "pool child" if command == parent_command else "worker main"
    return "stack supervisor" if "stack.py" in command else process.name()


def cpu_seconds_by_role(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the stack's processes, summed per `_role`, and of
    this measuring client (`client`)."""
    import psutil

    totals: dict[str, float] = {}
    stack = psutil.Process(root)
    for process in [stack, *stack.children(recursive=True), psutil.Process()]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        role = "client" if process.pid == os.getpid() else _role(process)
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def cpu_share_by_role(
    before: dict[str, float], after: dict[str, float], wall: float
) -> dict[str, float]:
    """The share of the cores x `wall` seconds each role used between two `cpu_seconds_by_role`."""
    cores = os.cpu_count() or 1
    return {
        role: round((after[role] - before.get(role, 0.0)) / (cores * wall), 4) for role in after
    }


def service_timeline(log_path: Path, job_ids: set[str]) -> tuple[float, float]:
    """(first `job_started`, last `job_done`) epoch seconds of `job_ids` in the stack's log."""
    starts, ends = [], []
    for line in log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("job_id") in job_ids and "ts" in record:
            if record.get("event") == "job_started":
                starts.append(record["ts"])
            elif record.get("event") == "job_done":
                ends.append(record["ts"])
    if not starts or len(ends) < len(job_ids):
        raise SystemExit(f"bench: the stack's log shows {len(ends)} of {len(job_ids)} jobs done")
    return min(starts), max(ends)


def service_phase(
    server: str, jpeg: bytes, args: argparse.Namespace, stack_pid: int, log_path: Path
) -> dict:
    """One measured burst of `processes` x `images` jobs, with the CPU each role of the stack
    used meanwhile (as a share of the cores x the phase's wall time). Two throughputs: the
    client's view (first submit to last result fetched: it includes the client's polling delay,
    up to `--poll` s at the end) and the service's own (first job started to last job done, from
    the workers' `job_started` / `job_done` events: what raw's per-process span measures)."""
    processes, count = args.processes, args.processes * args.images
    before = cpu_seconds_by_role(stack_pid)
    submitted = time.time()
    wall, results = run_jobs(server, [jpeg] * count, processes, args.poll, limit=count * 120)
    after = cpu_seconds_by_role(stack_pid)
    time.sleep(0.5)  # the last job_done line flushed
    first_start, last_done = service_timeline(log_path, {r["job_id"] for r in results})
    cpu_share = cpu_share_by_role(before, after, wall)
    inference = [r["timings"]["inference"] for r in results]
    return {
        "phase": "service",
        "images": count,
        "images_per_s": round(count / wall, 4),
        "wall_s": round(wall, 2),
        "images_per_s_service_view": round(count / (last_done - first_start), 4),
        "service_span_s": round(last_done - first_start, 2),
        "first_start_after_submit_s": round(first_start - submitted, 3),
        "client_tail_s": round(submitted + wall - last_done, 2),
        "inference_mean_s": round(statistics.mean(inference), 3),
        # What the pipeline adds at the phase's own contention: worker time not in `predict`.
        "worker_time_in_inference": round(sum(inference) / (processes * wall), 4),
        "outside_inference_per_job_s": round(
            processes * wall / count - statistics.mean(inference), 3
        ),
        "cpu_share_by_role": cpu_share,
        "timings_mean": {
            key: round(statistics.mean(r["timings"].get(key, 0.0) for r in results), 4)
            for key in results[0]["timings"]
        },
    }


def with_stack(processes: int, variant: str, run) -> list[dict]:
    """Start `make run`'s stack with `processes` workers, its log in a temporary file, and
    `run(server, stack pid, log path)`."""
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
    log_path = Path(f"/tmp/m2fp-service-ratio-{os.getpid()}.log")
    log = log_path.open("w")
    stack = start_stack(port, log)
    server = f"http://127.0.0.1:{port}"
    try:
        wait_http(
            server + "/readyz",
            lambda code, body: code == 200 and body.get("workers", 0) >= processes,
            300,
            "the workers",
        )
        return run(server, stack.pid, log_path)
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        stack.wait(60)
        log.close()
        log_path.unlink(missing_ok=True)


def idle_share(stack_pid: int, run) -> tuple[object, dict[str, float]]:
    """`run()`, and the share of the cores each stack role used meanwhile (the stack idle)."""
    before, tic = cpu_seconds_by_role(stack_pid), time.perf_counter()
    result = run()
    after, wall = cpu_seconds_by_role(stack_pid), time.perf_counter() - tic
    shares = cpu_share_by_role(before, after, wall)
    return result, {role: share for role, share in shares.items() if role != "client"}


def run_phases(args: argparse.Namespace, jpeg: bytes, jpeg_path: Path) -> list[dict]:
    """raw, service, raw, service, raw (`--repeats` service phases, one raw phase more), all with
    the stack started once: the raw phases run while it idles, so that raw and service alternate
    and a drift of the host's speed over the minutes of the run weighs on both sides alike."""

    def phases(server: str, stack_pid: int, log_path: Path) -> list[dict]:
        run_jobs(server, [jpeg] * args.processes, args.processes, args.poll, 600)  # warm-up
        rows: list[dict] = []
        for index in range(2 * args.repeats + 1):
            if index % 2:
                rows.append(service_phase(server, jpeg, args, stack_pid, log_path))
            else:
                raw, idle = idle_share(
                    stack_pid,
                    lambda: run_raw(jpeg_path, args.processes, args.images, args.variant),
                )
                rows.append(dict(raw, stack_idle_cpu_share=idle))
            print(json.dumps(rows[-1]), flush=True)
        return rows

    return with_stack(args.processes, args.variant, phases)


def bracketing_raw(phases: list[dict]) -> list[tuple[dict, float]]:
    """Each service phase that has a raw phase just before and just after it, with their mean."""
    return [
        (phase, statistics.mean((phases[i - 1]["images_per_s"], phases[i + 1]["images_per_s"])))
        for i, phase in enumerate(phases[1:-1], start=1)
        if phase["phase"] == "service" and phases[i - 1]["phase"] == phases[i + 1]["phase"] == "raw"
    ]


def summarise(phases: list[dict], processes: int) -> dict:
    """Mean throughput of each side, the ratio, and the seconds the service adds per job."""
    raw = statistics.mean(p["images_per_s"] for p in phases if p["phase"] == "raw")
    services = [p for p in phases if p["phase"] == "service"]
    service = statistics.mean(p["images_per_s"] for p in services)
    own = statistics.mean(p["images_per_s_service_view"] for p in services)
    return {
        "raw_images_per_s": round(raw, 4),
        "service_images_per_s": round(service, 4),
        "ratio": round(service / raw, 3),  # the client's view: with its polling delay
        "service_view_images_per_s": round(own, 4),
        "ratio_service_view": round(own / raw, 3),
        # each service phase against the mean of the raw phases just before and after it
        "ratio_service_view_each": [
            round(phase["images_per_s_service_view"] / neighbours, 3)
            for phase, neighbours in bracketing_raw(phases)
        ],
        "target_ratio": 0.95,
        "target_met": service / raw >= 0.95,
        "target_met_service_view": own / raw >= 0.95,
        # Each of `processes` slots: seconds per job in the service minus seconds per raw image.
        "overhead_per_job_s": round(processes / service - processes / raw, 3),
        "raw_seconds_per_image": round(processes / raw, 3),
        "service_seconds_per_job": round(processes / service, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="640x640", help="upload HxW")
    parser.add_argument("--processes", type=int, default=2, help="raw processes = workers")
    parser.add_argument("--images", type=int, default=24, help="measured images per process")
    parser.add_argument("--repeats", type=int, default=2, help="service phases (raw: one more)")
    parser.add_argument("--poll", type=float, default=0.5, help="s between polls")
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
