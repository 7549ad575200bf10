"""Dynamic batching: forward images/s per batch size, and end-to-end images/s through the service.

Two parts, each optional:

- `forward`: the network alone (`model(padded)`, normalised and padded as the Predictor does) on
  B copies-with-noise of an H x W network input, B in `--batches` (default 1,4,8,16), in each
  `--precisions` mode: `fp32` (TF32 off), `tf32` (CUDA matmul and cuDNN TF32 on), `bf16`
  (`torch.autocast` bf16). Also `Predictor.predict_batch` (preprocess + forward + postprocess)
  per image. The default input is 853 x 640 (H x W): a 3:4 photo after the Predictor's resize to a
  shortest side of 640, padded to 864 x 640. Weights: `random` (speed does not depend on them) or a
  checkpoint path (`--weights`).
- `service`: the real stack (bench/chaos.py's: redis-server, gunicorn, `python -m worker`), a
  burst of `--jobs` jobs submitted at once, images/s from the first submit to the last done, once
  per job (`M2FP_BATCHING=off`) and once batched (`on`); on CPU with the test-only tiny network.

    # a GPU machine (CUDA), the real network, random weights:
    python bench/gpu_batch_bench.py --device cuda --json docs/bench/gpu-batch.json
    # CPU smoke check (tiny network, tiny input), and the service on CPU:
    python bench/gpu_batch_bench.py --device cpu --variant tiny --size 96x64 --batches 1,2 \\
        --precisions fp32 --repeats 2 --service --jobs 16

Figures and the machine they came from: docs/BENCHMARKS.md "Dynamic batching".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRECISIONS = ("fp32", "tf32", "bf16")


def build_predictor(args: argparse.Namespace):
    """The Predictor the worker would build (deformable attention: the configured path)."""
    from worker.m2fp.predictor import Predictor

    return Predictor.from_weights(args.weights, variant=args.variant, device=args.device)


def network_inputs(predictor, batch: int, height: int, width: int):
    """`batch` noisy H x W images, normalised and padded on the model's device: (B, 3, Hp, Wp)."""
    import torch

    generator = torch.Generator().manual_seed(batch)
    images = [
        torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        for _ in range(batch)
    ]
    padded, _ = predictor.model.normalize_and_pad(images)
    return padded


def precision_context(precision: str, device: str):
    """The autocast / TF32 state of one precision mode (a context manager)."""
    import contextlib

    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision == "bf16":
        return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_call(call, device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `call()` over `repeats` runs after `warmup` (CUDA synchronised)."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def forward_rows(args: argparse.Namespace) -> list[dict]:
    """images/s of the forward and of predict_batch, per precision and batch size."""
    predictor = build_predictor(args)
    rows = []
    for precision in args.precisions:
        for batch in args.batches:
            rows.append(forward_row(args, predictor, precision, batch))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def forward_row(args: argparse.Namespace, predictor, precision: str, batch: int) -> dict:
    """One precision and batch size: the forward alone, then predict_batch (whole readout)."""
    import numpy as np
    import torch

    padded = network_inputs(predictor, batch, args.height, args.width)
    rng = np.random.default_rng(batch)
    photos = [
        rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(batch)
    ]
    with torch.inference_mode(), precision_context(precision, args.device):
        forward = time_call(lambda: predictor.model(padded), args.device, args.repeats)
        whole = time_call(lambda: predictor.predict_batch(photos), args.device, args.repeats)
    return {
        "precision": precision,
        "batch": batch,
        "forward_s": round(forward, 4),
        "forward_img_s": round(batch / forward, 2),
        "predict_batch_img_s": round(batch / whole, 2),
        "peak_gpu_mib": _peak_gpu_mib(args.device),
    }


def _peak_gpu_mib(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def service_run(args: argparse.Namespace, batching: str, workdir: Path) -> dict:
    """One burst of `args.jobs` jobs through a fresh stack; images/s from first submit to last done."""
    from bench.chaos import Load, StackConfig

    env = {
        "M2FP_BATCHING": batching,
        "M2FP_GPU_BATCH": str(args.gpu_batch),
        "M2FP_BATCH_WAIT_MS": str(args.wait_ms),
        "M2FP_DEVICE": args.device,
        "M2FP_PRECISION": "fp32",
        # bench/chaos.py's stack runs the tiny test network; the real one when asked for.
        "M2FP_VARIANT": args.variant,
        "M2FP_TEST_NETWORK": "1" if args.variant == "tiny" else "0",
        "M2FP_WEIGHTS": args.weights,
    }
    # The same cores either way: per job, `concurrency` processes x `torch_threads`; batched,
    # one process with as many torch threads.
    concurrency = 1 if batching == "on" else args.concurrency
    threads = args.torch_threads * (args.concurrency if batching == "on" else 1)
    workdir.mkdir(parents=True, exist_ok=True)
    stack = _stack_class()(workdir, StackConfig(workers=1, concurrency=concurrency, env=env))
    stack.torch_threads = str(threads)
    try:
        stack.start()
        Load(stack.base_url, _photo(args), jobs=4, rate=100.0, drain=120).run()  # warm-up
        load = Load(stack.base_url, _photo(args), jobs=args.jobs, rate=1000.0, drain=600)
        records = load.run()
        done = [job for job in records if job.final == "done"]
        makespan = max(job.latency for job in done) if done else float("nan")
        sizes = [e.get("batch_size") for e in stack.events() if e.get("event") == "job_done"]
        return {
            "batching": batching,
            "jobs": args.jobs,
            "done": len(done),
            "seconds": round(makespan, 2),
            "img_s": round(len(done) / makespan, 2),
            "pool_processes": concurrency,
            "torch_threads_per_process": threads,
            "batch_sizes_seen": sorted({s for s in sizes if s}) or None,
        }
    finally:
        stack.stop()


def _stack_class():
    from bench.chaos import ChaosStack

    class _ThreadsStack(ChaosStack):
        """bench/chaos.py's stack with this bench's torch threads per worker process."""

        torch_threads = "1"

        def start_worker(self, index: int):
            self.env["M2FP_TORCH_THREADS"] = self.torch_threads
            return super().start_worker(index)

    return _ThreadsStack


def _photo(args: argparse.Namespace) -> bytes:
    from tests.integration.conftest import photo_jpeg

    return photo_jpeg(args.width, args.height, seed=5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--variant", default="cihp", help="cihp, lip or tiny (test network)")
    parser.add_argument("--weights", default="random", help="random or a checkpoint path")
    parser.add_argument("--size", default="853x640", help="network input H x W")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-forward", action="store_true", help="skip the forward part")
    parser.add_argument("--service", action="store_true", help="also the end-to-end part")
    parser.add_argument("--jobs", type=int, default=32, help="jobs per end-to-end burst")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--wait-ms", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=1, help="per-job pool processes")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = [p for p in args.precisions.split(",") if p]
    if bad := set(args.precisions) - set(PRECISIONS):
        parser.error(f"unknown precisions {sorted(bad)}; choose from {PRECISIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": _machine(args)}
    if not args.no_forward:
        result["forward"] = forward_rows(args)
    if args.service:
        with tempfile.TemporaryDirectory(prefix="m2fp-batch-bench-") as tmp:
            result["service"] = [service_run(args, mode, Path(tmp, mode)) for mode in ("off", "on")]
            for row in result["service"]:
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _machine(args: argparse.Namespace) -> dict:
    import os
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
