"""Winograd F(4x4, 3x3) against direct oneDNN convolution: per convolution, whole predict, agreement.

1. Per convolution: every distinct 3x3 stride-1 shape of the CIHP network at 640x864, random
   weights, the direct fused convolution (`mkldnn._convolution_pointwise` with the ReLU post-op)
   and `WinogradConv` with 4x4 and 2x2 tiles, interleaved; each row names what this CPU's plan
   (`winograd.plan_for`) picks for it.
2. Whole predict: the golden CIHP model on the synthetic photo (640x853), two Predictors of one
   model, with and without the route (`use_winograd`), interleaved round by round; medians and
   minima of the forward (the Predictor's own timing) and of the whole predict, and the page
   faults of each predict (both share one heap: a path whose temporaries the malloc keeps
   returning to the kernel shows here, and slows the other path too).
3. Agreement: label and instance maps with the route against without, golden weights and the
   diverse checkpoint (tests/diverse_weights.py).

Usage:
  .venv/bin/python bench/winograd_bench.py                       # all three, 7 rounds
  .venv/bin/python bench/winograd_bench.py --parts convolutions --runs 11 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# (name, stage of the plan, in channels, out channels, height, width) at 640x864: the stride-1
# 3x3 convolutions; "fpn" (winograd.FPN_STAGE) is the pixel decoder's layer_1
SHAPES = (
    ("stem conv2", "stem", 64, 64, 320, 432),
    ("stem conv3", "stem", 64, 128, 320, 432),
    ("res2 conv2", "res2", 64, 64, 160, 216),
    ("res3 conv2", "res3", 128, 128, 80, 108),
    ("res4 conv2", "res4", 256, 256, 40, 54),
    ("res5 conv2", "res5", 512, 512, 20, 27),
    ("FPN layer_1", "fpn", 256, 256, 160, 216),
)
PARTS = ("convolutions", "predict", "agreement")


def interleaved_ms(functions: dict, runs: int) -> dict:
    """Min and median milliseconds of each function, the functions interleaved run by run."""
    from deform_attn_bench import interleaved_seconds

    return {
        name: {"min_ms": min(values) * 1000, "median_ms": statistics.median(values) * 1000}
        for name, values in interleaved_seconds(functions, runs).items()
    }


def convolution_row(shape: tuple, runs: int) -> dict:
    """Direct vs Winograd on one (name, in, out, height, width) shape, random weights."""
    import torch

    from worker.m2fp.cpu import cpu_features
    from worker.m2fp.winograd import WinogradConv, plan_for

    name, stage, channels, out_channels, height, width = shape
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, channels, height, width, generator=generator).relu()
    features = features.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, channels, 3, 3, generator=generator) / (9 * channels) ** 0.5
    bias = torch.randn(out_channels, generator=generator)
    packed = weight.contiguous(memory_format=torch.channels_last)
    four, two = (WinogradConv(weight, bias, relu=True, tile=tile) for tile in (4, 2))

    def direct() -> object:
        return torch.ops.mkldnn._convolution_pointwise(
            features, packed, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], ""
        )

    functions = {
        "direct": direct,
        "F(4x4)": lambda: four(features),
        "F(2x2)": lambda: two(features),
    }
    figures = interleaved_ms(functions, runs)
    gflop = 2 * channels * out_channels * 9 * height * width / 1e9
    plan = plan_for(cpu_features())
    conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1)
    tile = plan.tile_for(conv, stage)
    chosen = "direct" if tile is None else f"F({tile}x{tile})"
    return {"shape": name, "gflop": round(gflop, 2), f"{plan.isa} plan": chosen, **figures}


def convolutions(runs: int) -> list[dict]:
    """Part 1: direct vs Winograd per shape."""
    return [convolution_row(shape, runs) for shape in SHAPES]


def golden_predictors(weights: str, height: int, width: int) -> tuple:
    """(with the route, without) Predictors of one CIHP model at the photo's own size."""
    from tests.diverse_weights import config_at, diverse_state_dict
    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import load_into
    from worker.m2fp.config import get_config
    from worker.m2fp.model import M2FP
    from worker.m2fp.predictor import Predictor

    model = M2FP(config_at(height, width))
    recipe = golden_state_dict if weights == "golden" else diverse_state_dict
    load_into(model, recipe(get_config("cihp")))
    model.eval()
    side = max(height, width)
    return (
        Predictor(model, max_side=side, use_winograd=True),
        Predictor(model, max_side=side, use_winograd=False),
    )


def predict(runs: int, image) -> dict:
    """Part 2: whole predicts with and without the route, interleaved."""
    fast, direct = golden_predictors("golden", *image.shape[:2])
    times: dict[str, dict[str, list[float]]] = {
        name: {"forward": [], "predict": [], "faults": []} for name in ("winograd", "direct")
    }
    fast.predict(image), direct.predict(image)
    for _ in range(runs):
        for name, predictor in (("winograd", fast), ("direct", direct)):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            result = predictor.predict(image)
            times[name]["predict"].append(time.perf_counter() - started)
            times[name]["faults"].append(
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            )
            times[name]["forward"].append(result.timings["forward"])
    summary: dict[str, object] = {"route": fast.winograd_path}
    for name, stages in times.items():
        for stage, values in stages.items():
            unit = "" if stage == "faults" else "_s"  # page faults are a count
            summary[f"{name}_{stage}_median{unit}"] = round(statistics.median(values), 4)
            summary[f"{name}_{stage}_min{unit}"] = round(min(values), 4)
    for stage in ("forward", "predict"):
        summary[f"{stage}_ratio_median"] = round(
            statistics.median(times["winograd"][stage]) / statistics.median(times["direct"][stage]),
            3,
        )
    return summary


def agreement(image) -> dict:
    """Part 3: equal-pixel shares of label and instance maps, route vs direct, per checkpoint."""
    figures = {}
    for weights in ("golden", "diverse"):
        fast, direct = golden_predictors(weights, *image.shape[:2])
        got, baseline = fast.predict(image), direct.predict(image)
        figures[weights] = {
            "label_equal": float((got.label_map == baseline.label_map).mean()),
            "instance_equal": float((got.instance_map == baseline.instance_map).mean()),
            "classes": len(baseline.classes_present),
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="interleaved rounds after a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--size", default="640x853", help="HxW of the photo (parts 2 and 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args(argv)
    import torch
    from deform_attn_bench import cpu_description
    from model_bench import synthetic_image

    from worker.m2fp import allocator, winograd

    torch.set_num_threads(arguments.threads)
    report: dict[str, object] = {
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "threads": arguments.threads,
        "malloc": allocator.configure(),
        "unavailable": winograd.unavailable_reason(),
    }
    if report["unavailable"] is not None:
        print(f"Winograd route unavailable: {report['unavailable']}", file=sys.stderr)
        return 1
    height, width = (int(side) for side in arguments.size.split("x"))
    image = synthetic_image(height, width)
    with torch.inference_mode():
        if "convolutions" in arguments.parts:
            report["convolutions"] = convolutions(arguments.runs)
        if "predict" in arguments.parts:
            report["predict"] = predict(arguments.runs, image)
        if "agreement" in arguments.parts:
            report["agreement"] = agreement(image)
    print(json.dumps(report, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
