"""Latency and peak memory of our M2FP port, side by side with ModelScope's reference implementation.

Every configuration (implementation x stage x image size) runs in a fresh subprocess, so that the peak
resident memory (`ru_maxrss`) belongs to that configuration alone. Both implementations get the same
golden weights (tests/data/golden/README.md section 1) and the same synthetic image.

Stages:
  forward  the network on an H x W image as it is (normalise, pad to /32, backbone, decoders; no resize);
           ours as the Predictor runs it (`Predictor(model).model`: the fused CPU backbone, malloc tuned).
  predict  the whole pipeline on an H x W image: ours `Predictor.predict` (resize to shortest side 640,
           forward, label map, instances, persons, maps at input size); the reference: ModelScope's
           pipeline `preprocess` -> model forward + postprocess -> pipeline `postprocess`, run with the
           kit's `make_golden.PipelineCore` (the pipeline code executed verbatim).

Usage:
  .venv/bin/python bench/model_bench.py                                   # ours only
  .venv/bin/python bench/model_bench.py --reference-python .venv-reference/bin/python --json out.json
The reference venv is made by `../shared/m2fp/reference/setup.sh DIR`. The reference kit is only run
here, in its own interpreter; product code never imports it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = ("512x512", "640x864")  # H x W
STAGES = ("forward", "predict")


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_high_water_mark() -> bool:
    """Reset the peak RSS (VmHWM, and with it ru_maxrss) to the current RSS (Linux >= 4.0).

    Later peaks then exclude the model building, whose weight copies would otherwise dominate.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synthetic_image(height: int, width: int):
    """A deterministic photo-like RGB uint8 image: gradient background, floor stripes, two flat 'people'."""
    import numpy as np

    rows = np.linspace(0, 1, height)[:, None]
    columns = np.linspace(0, 1, width)[None, :]
    image = np.empty((height, width, 3), dtype=np.float64)
    image[..., 0] = 90 + 100 * rows + 30 * columns
    image[..., 1] = 120 + 60 * columns
    image[..., 2] = 200 - 80 * rows
    floor = rows[:, 0] > 0.75
    image[floor] = np.where((np.arange(width) // max(1, width // 16)) % 2 == 0, 70, 110)[:, None]
    for center, colour in ((0.33, (200, 40, 40)), (0.66, (40, 60, 180))):
        x0, x1 = int((center - 0.08) * width), int((center + 0.08) * width)
        image[int(0.30 * height) : int(0.85 * height), x0:x1] = colour  # body
        head = slice(int(0.15 * height), int(0.30 * height))
        image[head, int((center - 0.04) * width) : int((center + 0.04) * width)] = (230, 190, 160)
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Worker side: runs in a fresh interpreter (ours: the project venv; reference: the reference venv).
# ---------------------------------------------------------------------------------------------------------
def ours_runner(stage: str, image, variant: str, device: str):
    """A zero-argument callable running `stage` of our implementation on `image`."""
    import torch

    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import build_model_from_state_dict
    from worker.m2fp.config import get_config
    from worker.m2fp.predictor import Predictor

    model, _ = build_model_from_state_dict(
        golden_state_dict(get_config(variant)), variant=variant, device=device
    )
    predictor = Predictor(model, max_side=max(image.shape[:2]))
    if stage == "predict":
        return lambda: predictor.predict(image)
    model = predictor.model  # the network as the worker runs it (e.g. the fused CPU backbone)
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None]  # (1, 3, H, W)

    def forward():
        with torch.inference_mode(), predictor.network_context():  # as `predict` runs it
            padded, _ = model.normalize_and_pad(tensor)
            output = model(padded)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return output

    return forward


def reference_runner(stage: str, image, variant: str, kit: str):
    """A zero-argument callable running `stage` of ModelScope's implementation (reference venv only)."""
    import torch
    from PIL import Image

    sys.path.insert(0, kit)
    import make_golden  # the reference kit: run here, never imported by product code

    model = make_golden.build(variant)
    make_golden.load_recipe(model, 1234)
    if stage == "predict":
        pipeline = make_golden.PipelineCore()
        pipeline.model = model
        pil_image = Image.fromarray(image)
        return lambda: pipeline.postprocess(pipeline.forward(pipeline.preprocess(pil_image)))
    height, width = image.shape[:2]
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float()  # (3, H, W), 0..255
    batched = {"image": tensor, "height": height, "width": width}
    if variant == "lip":
        batched["crop_box"] = [0, 0, width, height]

    def forward():
        with torch.no_grad():  # as the pipeline's forward
            return model.forward({"batched_inputs": [batched]})

    return forward


def worker_main(config: dict) -> None:
    """Measure one configuration and print one JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(config["threads"])
    image = np.load(config["image_path"])
    rss_before_model = current_rss_bytes()
    if config["implementation"] == "ours":
        runner = ours_runner(config["stage"], image, config["variant"], config["device"])
    else:
        runner = reference_runner(config["stage"], image, config["variant"], config["kit"])
    gc.collect()
    rss_after_model = current_rss_bytes()
    build_peak_rss = peak_rss_bytes()  # before the reset below, which also lowers ru_maxrss
    high_water_mark_reset = reset_rss_high_water_mark()
    if config["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(config["warmup"]):
        runner()
    seconds = []
    for _ in range(config["runs"]):
        started = time.perf_counter()
        runner()
        seconds.append(time.perf_counter() - started)
    result = {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "runs_s": seconds,
        # Peak RSS while building the model (weights generated, copied, loaded).
        "build_peak_rss_bytes": build_peak_rss,
        # Peak RSS during the runs (model weights resident included): ru_maxrss after the reset, or the
        # whole process's peak where /proc could not be reset.
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_reset": high_water_mark_reset,
        "rss_before_model_bytes": rss_before_model,
        "rss_after_model_bytes": rss_after_model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if config["device"].startswith("cuda"):
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print("BENCH_RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------------
# Driver side.
# ---------------------------------------------------------------------------------------------------------
def run_configuration(python: str, config: dict, timeout: float) -> dict:
    """Run one configuration in a fresh subprocess and return its measurements (or an error)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(config["threads"])}
    command = [python, str(Path(__file__).resolve()), "--worker", json.dumps(config)]
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            cwd=str(REPO),
            check=False,  # a failed configuration is reported below, not raised
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {completed.returncode}: {tail}"}


def mebibytes(value: int | None) -> str:
    """Bytes as MiB text, '-' when missing."""
    return "-" if value is None else f"{value / 2**20:.0f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    """numerator / denominator as '1.23x', '-' when either is missing."""
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def format_table(rows: list[dict], with_reference: bool) -> str:
    """A Markdown table, ours vs reference: latency (median, min), peak RSS during the runs, and that peak
    minus the RSS with the model loaded (what one image costs on top of the weights)."""
    for measurement in [row[name] for row in rows for name in ("ours", "reference") if name in row]:
        if "peak_rss_bytes" in measurement:
            measurement["run_extra_rss_bytes"] = (
                measurement["peak_rss_bytes"] - measurement["rss_after_model_bytes"]
            )
    measures = [
        ("median s", "median_s", lambda value: f"{value:.2f}"),
        ("min s", "min_s", lambda value: f"{value:.2f}"),
        ("peak RSS MiB", "peak_rss_bytes", mebibytes),
        ("peak - loaded RSS MiB", "run_extra_rss_bytes", mebibytes),
    ]
    header = ["size (HxW)", "stage"]
    for title, _, _ in measures:
        header += [f"ours {title}"] + ([f"ref {title}", "ref/ours"] if with_reference else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ours, reference = row["ours"], row.get("reference") or {"error": "not run"}
        cells = [row["size"], row["stage"]]
        for _, key, show in measures:
            ours_value, reference_value = ours.get(key), reference.get(key)
            cells.append(
                show(ours_value)
                if ours_value is not None
                else ("error" if "error" in ours else "-")
            )
            if with_reference:
                cells.append(
                    show(reference_value)
                    if reference_value is not None
                    else ("error" if "error" in reference else "-")
                )
                cells.append(ratio(reference_value, ours_value))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [
        f"{row['size']} {row['stage']} {name}: {row[name]['error']}"
        for row in rows
        for name in ("ours", "reference")
        if name in row and "error" in row[name]
    ]
    return "\n".join(lines + [f"error: {error}" for error in errors])


# long-by-design: the argument table of the benchmark, one add_argument per option
def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=list(DEFAULT_SIZES),
        help="image sizes HxW (default: %(default)s)",
    )
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--variant", default="cihp", choices=("cihp", "lip"))
    parser.add_argument(
        "--runs", type=int, default=3, help="timed runs per configuration (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads (default: all cores)",
    )
    parser.add_argument(
        "--device", default="cpu", help="device for our model (the reference runs on the CPU only)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter of our venv (default: this one)"
    )
    parser.add_argument(
        "--reference-python",
        default=None,
        help="interpreter of the reference venv (setup.sh DIR -> DIR/bin/python); omit to skip",
    )
    parser.add_argument(
        "--reference-kit",
        default=str(REPO.parent / "shared" / "m2fp" / "reference"),
        help="folder holding make_golden.py and reference_model.py (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write all measurements to this JSON file"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_reference_arguments(arguments: argparse.Namespace) -> bool:
    """Whether the reference can be run as asked (prints why not; a note for a GPU comparison)."""
    if arguments.reference_python is None:
        return True
    if arguments.device != "cpu":
        print(
            "note: the reference runs on the CPU only; comparing a GPU run with it is meaningless",
            file=sys.stderr,
        )
    if not (Path(arguments.reference_kit) / "make_golden.py").is_file():
        print(
            f"error: no make_golden.py in --reference-kit {arguments.reference_kit}",
            file=sys.stderr,
        )
        return False
    return True


def measure_row(arguments: argparse.Namespace, size: str, stage: str, image_path: str) -> dict:
    """One table row: ours (and the reference if asked) at one size and stage, each in its own
    subprocess."""
    base = {
        "stage": stage,
        "variant": arguments.variant,
        "image_path": image_path,
        "runs": arguments.runs,
        "warmup": arguments.warmup,
        "threads": arguments.threads,
    }
    row = {"size": size, "stage": stage}
    print(f"running ours {stage} {size} ...", file=sys.stderr, flush=True)
    row["ours"] = run_configuration(
        arguments.python,
        {**base, "implementation": "ours", "device": arguments.device},
        arguments.timeout,
    )
    if arguments.reference_python is not None:
        print(f"running reference {stage} {size} ...", file=sys.stderr, flush=True)
        row["reference"] = run_configuration(
            arguments.reference_python,
            {
                **base,
                "implementation": "reference",
                "device": "cpu",
                "kit": arguments.reference_kit,
            },
            arguments.timeout,
        )
    return row


def measure_all(arguments: argparse.Namespace) -> list[dict]:
    """Every (size, stage) row, the synthetic image of each size saved once for the subprocesses."""
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory(prefix="m2fp-bench-") as folder:
        for size in arguments.sizes:
            height, width = (int(value) for value in size.lower().split("x"))
            image_path = str(Path(folder) / f"image_{height}x{width}.npy")
            np.save(image_path, synthetic_image(height, width))
            for stage in arguments.stages:
                rows.append(measure_row(arguments, f"{height}x{width}", stage, image_path))
    return rows


def machine_description(arguments: argparse.Namespace) -> dict:
    """The machine and the settings the figures were taken with (for the JSON)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "threads": arguments.threads,
        "device": arguments.device,
        "variant": arguments.variant,
        "runs": arguments.runs,
        "warmup": arguments.warmup,
        "load_average_at_end": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the table, optionally write JSON."""
    arguments = parse_arguments(argv)
    if arguments.worker is not None:
        worker_main(json.loads(arguments.worker))
        return 0
    if not check_reference_arguments(arguments):
        return 2
    rows = measure_all(arguments)
    machine = machine_description(arguments)
    print(
        f"M2FP {arguments.variant}, golden weights, {arguments.threads} threads, device {arguments.device}, "
        f"median of {arguments.runs} runs after {arguments.warmup} warm-up"
    )
    print(format_table(rows, arguments.reference_python is not None))
    if arguments.json is not None:
        arguments.json.write_text(
            json.dumps({"machine": machine, "results": rows}, indent=1) + "\n"
        )
    return 0 if all("error" not in row["ours"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
