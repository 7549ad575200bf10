"""fp32 vs int8 (and bf16 at a small size) in one process, interleaved: speed and agreement.

Golden CIHP weights (tests/golden_weights.py) or the diverse synthetic checkpoint
(tests/diverse_weights.py), the synthetic photo of `model_bench.py`. Each round
runs `Predictor.predict` once per precision, in turn, so that a disturbance on the shared machine
hits both; the figures are medians over the rounds of the predictor's own stage timings
(`forward`) and of the whole predict. Agreement: the share of equal pixels of the label and
instance maps against fp32.

Usage:
  .venv/bin/python bench/precision_bench.py                                  # fp32 vs int8, 640x853
  .venv/bin/python bench/precision_bench.py --precisions fp32 bf16 --size 96x128 --runs 2
  .venv/bin/python bench/precision_bench.py --weights diverse --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="640x853", help="HxW of the photo (default 640x853)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds after a warm-up")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--weights", choices=["golden", "diverse"], default="golden")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def build_predictors(arguments: argparse.Namespace, height: int, width: int) -> dict:
    """One Predictor per precision on one set of weights; the network's input is the photo as is."""
    from tests.diverse_weights import diverse_state_dict
    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import load_into
    from worker.m2fp.config import get_config
    from worker.m2fp.model import M2FP
    from worker.m2fp.predictor import Predictor

    # Shortest side = the photo's: no resize, so a small size is really run small.
    config = dataclasses.replace(
        get_config("cihp"), min_size_test=min(height, width), max_size_test=max(height, width)
    )
    recipe = golden_state_dict if arguments.weights == "golden" else diverse_state_dict
    model = M2FP(config)
    load_into(model, recipe(get_config("cihp")))
    model.eval()
    return {
        name: Predictor(model, max_side=max(height, width), precision_mode=name)
        for name in arguments.precisions
    }


def agreement(result, baseline) -> dict:
    """Equal-pixel shares of the label and instance maps, and the classes each shows."""
    return {
        "label_equal": float((result.label_map == baseline.label_map).mean()),
        "instance_equal": float((result.instance_map == baseline.instance_map).mean()),
        "classes": len(result.classes_present),
        "baseline_classes": len(baseline.classes_present),
        "persons": len(result.persons),
        "baseline_persons": len(baseline.persons),
    }


def measure(predictors: dict, image, runs: int) -> dict:
    """Interleaved rounds; per precision the forward and whole-predict medians, and agreement."""
    times: dict[str, dict[str, list[float]]] = {
        name: {"forward": [], "predict": []} for name in predictors
    }
    results = {name: predictor.predict(image) for name, predictor in predictors.items()}  # warm
    for _ in range(runs):
        for name, predictor in predictors.items():
            started = time.perf_counter()
            result = predictor.predict(image)
            times[name]["predict"].append(time.perf_counter() - started)
            times[name]["forward"].append(result.timings["forward"])
            results[name] = result
    baseline = results[next(iter(predictors))]
    return {
        name: {
            "precision": predictors[name].precision_choice.describe(),
            "forward_median_s": statistics.median(times[name]["forward"]),
            "predict_median_s": statistics.median(times[name]["predict"]),
            "forward_s": times[name]["forward"],
            "predict_s": times[name]["predict"],
            **agreement(results[name], baseline),
        }
        for name in predictors
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    import torch
    from model_bench import synthetic_image

    from worker.m2fp.cpu import cpu_features, describe_features

    torch.set_num_threads(arguments.threads)
    height, width = (int(side) for side in arguments.size.lower().split("x"))
    predictors = build_predictors(arguments, height, width)
    figures = measure(predictors, synthetic_image(height, width), arguments.runs)
    report = {
        "size": f"{height}x{width}",
        "threads": arguments.threads,
        "weights": arguments.weights,
        "cpu_flags": describe_features(cpu_features()),
        "torch": torch.__version__,
        "runs": arguments.runs,
        "precisions": figures,
    }
    print(json.dumps(report, indent=1))
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
