"""The compiled deformable-attention op against the `grid_sample` reference, side by side in one run.

1. The op alone, at the model's real shapes: the golden CIHP model runs once on a synthetic HxW photo
   and the arguments of its first deformable-attention call are captured (pixel-decoder levels of
   the padded input, 8 heads, head_dim 32, 3 levels, 4 points, queries = every pixel of the 3 levels;
   real locations and weights from the golden weights). Both implementations then run on those
   arguments, interleaved, at each thread count; medians, and the ratio reference / op.
2. The whole network forward (normalise, pad, backbone, decoders) with M2FP_DEFORM_ATTN=reference
   ("before") and =op ("after"), interleaved, medians.

Usage:
  .venv/bin/python bench/deform_attn_bench.py                       # 640x864 and 640x640, 1 and 2 threads
  .venv/bin/python bench/deform_attn_bench.py --sizes 640x864 --threads 2 --forward-runs 3 --json out.json
Every figure is printed with the CPU model and its relevant flags (from /proc/cpuinfo). The C
allocator is tuned as the worker's (`worker.m2fp.allocator`, unless `--malloc-as-is`): with glibc's
defaults every 11 MB output is a fresh mmap, faulted in again on each call, which on the KVM guest
of run G doubled the op's own time (13.9 vs 7.4 ms per layer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def cpu_description() -> dict:
    """The CPU model, core count and the flags that matter (one reader: worker/m2fp/cpu.py)."""
    from worker.m2fp.cpu import cpu_summary

    return cpu_summary()


def interleaved_seconds(
    functions: dict[str, Callable[[], object]], runs: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of each function, the functions interleaved run by run (same conditions for all)."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return times


def median_seconds(
    functions: dict[str, Callable[[], object]], runs: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each function, the functions interleaved run by run."""
    times = interleaved_seconds(functions, runs, warmup)
    return {name: statistics.median(values) for name, values in times.items()}


def capture_model_call(model, image) -> tuple:
    """The arguments of the model's first deformable-attention call on `image` (real shapes and values)."""
    import torch

    from worker.m2fp import deformable_attention

    captured = []
    original = deformable_attention.multi_scale_deformable_attention

    class Captured(Exception):
        pass

    def recording(*arguments):
        captured.append(
            tuple(
                argument.clone() if torch.is_tensor(argument) else argument
                for argument in arguments
            )
        )
        raise Captured  # the rest of the forward is not needed

    deformable_attention.multi_scale_deformable_attention = recording
    try:
        with torch.inference_mode():
            padded, _ = model.normalize_and_pad(
                torch.from_numpy(image.copy()).permute(2, 0, 1)[None]
            )
            model(padded)
    except Captured:
        pass
    finally:
        deformable_attention.multi_scale_deformable_attention = original
    return captured[0]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["640x864", "640x640"], help="H x W images (padded to /32)"
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--op-runs", type=int, default=9, help="runs per implementation for the op alone"
    )
    parser.add_argument(
        "--forward-runs", type=int, default=5, help="runs per path for the whole forward"
    )
    parser.add_argument("--forward-threads", nargs="+", type=int, default=[2])
    parser.add_argument("--forward-size", default="640x864")
    parser.add_argument(
        "--malloc-as-is", action="store_true", help="leave glibc's malloc untuned (mmap per block)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def parse_size(size: str) -> tuple[int, int]:
    """`"640x864"` -> (640, 864): height, width."""
    height, width = (int(part) for part in size.split("x"))
    return height, width


def golden_model():
    """The CIHP network with the golden (deterministic, synthetic) weights, on the CPU."""
    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import build_model_from_state_dict
    from worker.m2fp.config import get_config

    model, _ = build_model_from_state_dict(
        golden_state_dict(get_config("cihp")), variant="cihp", device="cpu"
    )
    return model


def op_row(size: str, threads: int, call: tuple, runs: int) -> dict:
    """Median times of the reference and the op (fp32, bf16) on one captured call, at `threads`."""
    import torch

    from worker.m2fp import ops
    from worker.m2fp.deformable_attention import multi_scale_deformable_attention_reference

    value, shapes, locations, weights = call
    torch.set_num_threads(threads)
    medians = median_seconds(
        {
            "grid_sample": partial(
                multi_scale_deformable_attention_reference, value, shapes, locations, weights
            ),
            "op_fp32": partial(ops.ms_deform_attn, value, shapes, locations, weights),
            "op_bf16": partial(ops.ms_deform_attn, value.bfloat16(), shapes, locations, weights),
        },
        runs,
    )
    return {
        "input": size,
        "levels": [list(shape) for shape in shapes],
        "queries": int(locations.shape[1]),
        "heads": int(value.shape[2]),
        "head_dim": int(value.shape[3]),
        "threads": threads,
        **{f"{name}_s": seconds for name, seconds in medians.items()},
        "ratio_fp32": medians["grid_sample"] / medians["op_fp32"],
        "ratio_bf16": medians["grid_sample"] / medians["op_bf16"],
    }


def print_op_row(row: dict) -> None:
    """One Markdown table row of the op-alone benchmark."""
    levels = ", ".join(f"{h}x{w}" for h, w in row["levels"])
    print(
        f"| {row['input']} | {levels} | {row['queries']} | "
        f"{row['heads']} x {row['head_dim']} | {row['threads']} | {1e3 * row['grid_sample_s']:.1f} | "
        f"{1e3 * row['op_fp32_s']:.1f} | {row['ratio_fp32']:.1f}x | {1e3 * row['op_bf16_s']:.1f} | "
        f"{row['ratio_bf16']:.1f}x |",
        flush=True,
    )


def op_benchmark(model, arguments: argparse.Namespace) -> list[dict]:
    """Part 1: the op alone against the reference, at each size and thread count; prints a table."""
    import torch
    from model_bench import synthetic_image

    from worker.m2fp import ops

    print(
        "\nop alone (one deformable-attention call, model shapes; median of "
        f"{arguments.op_runs}, interleaved):"
    )
    print(
        "| input (HxW) | levels (HxW) | queries | heads x head_dim | threads | grid_sample ms | op fp32 ms | "
        "ratio | op bf16 ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size in arguments.sizes:
        torch.set_num_threads(max(arguments.threads))
        ops.configure("auto")
        call = capture_model_call(model, synthetic_image(*parse_size(size)))
        for threads in arguments.threads:
            rows.append(op_row(size, threads, call, arguments.op_runs))
            print_op_row(rows[-1])
    return rows


def forward_with(model, tensor, mode: str):
    """One whole forward (normalise, pad, network) with the deformable-attention path `mode`."""
    import torch

    from worker.m2fp import ops

    ops.configure(mode)
    with torch.inference_mode():
        padded, _ = model.normalize_and_pad(tensor)
        return model(padded)


def forward_benchmark(model, arguments: argparse.Namespace) -> list[dict]:
    """Part 2: the whole forward with the reference ("before") and the op ("after"); prints a table."""
    import torch
    from model_bench import synthetic_image

    from worker.m2fp import ops

    tensor = torch.from_numpy(synthetic_image(*parse_size(arguments.forward_size)))
    tensor = tensor.permute(2, 0, 1)[None]
    forwards = {mode: partial(forward_with, model, tensor, mode) for mode in ("reference", "op")}
    print(
        f"\nwhole forward at {arguments.forward_size}, golden weights (median of {arguments.forward_runs}, "
        "interleaved):"
    )
    print("| threads | before: grid_sample s | after: op s | before / after |")
    print("|---|---|---|---|")
    rows = []
    for threads in arguments.forward_threads:
        torch.set_num_threads(threads)
        medians = median_seconds(forwards, arguments.forward_runs)
        row = {
            "input": arguments.forward_size,
            "threads": threads,
            "reference_s": medians["reference"],
            "op_s": medians["op"],
            "ratio": medians["reference"] / medians["op"],
        }
        rows.append(row)
        print(
            f"| {threads} | {medians['reference']:.2f} | {medians['op']:.2f} | {row['ratio']:.2f}x |",
            flush=True,
        )
    ops.configure("auto")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks and print the tables."""
    arguments = parse_arguments(argv)

    import torch

    from worker.m2fp import allocator, ops

    malloc = "as is" if arguments.malloc_as_is else allocator.configure()
    status = ops.status()
    if not status["loaded"]:
        print(f"the compiled op is not available: {status['reason']}", file=sys.stderr)
        return 1
    cpu = cpu_description()
    print(
        f"CPU: {cpu['model']} (flags: {', '.join(cpu['flags']) or 'none that matter'}); "
        f"torch {torch.__version__}; op {status['build_info']}; malloc {malloc}"
    )
    model = golden_model()
    report = {
        "cpu": cpu,
        "torch": torch.__version__,
        "op_build": status["build_info"],
        "malloc": malloc,
        "op": op_benchmark(model, arguments),
        "forward": forward_benchmark(model, arguments),
    }
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
