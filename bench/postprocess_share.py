"""The postprocess's share of the whole `Predictor.predict`, and where the postprocess's time goes.

Golden CIHP weights, the synthetic photo of `model_bench.py` at 640x853 (no resizing: it is already
at the network's 640-pixel shortest side), the predictor's own stage timings (`ParsingResult.timings`)
over a few predicts after a warm-up, medians. Then the readout alone, `parse_multi_human` on the
network outputs of that image, and the per-person grouping alone, each median of more runs.

Usage:
  .venv/bin/python bench/postprocess_share.py               # 640x853, 2 threads, 3 predicts
  .venv/bin/python bench/postprocess_share.py --runs 5 --json out.json
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
sys.path.insert(0, str(REPO / "bench"))


def median_seconds(function, runs: int) -> float:
    """Median wall time of `function()` over `runs` calls."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=853)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="profiled predicts (after one warm-up)")
    parser.add_argument("--readout-runs", type=int, default=7, help="runs of the readout alone")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def stage_figures(predictor, image, runs: int) -> dict:
    """Median seconds of each of the predictor's stages over `runs` predicts (after a warm-up),
    their total and the postprocess's share of it."""
    predictor.predict(image)  # warm-up
    stages: dict[str, list[float]] = {"preprocess": [], "forward": [], "postprocess": []}
    for _ in range(runs):
        result = predictor.predict(image)
        for stage, seconds in result.timings.items():
            stages[stage].append(seconds)
    figures = {stage: statistics.median(values) for stage, values in stages.items()}
    figures["total"] = sum(figures.values())
    figures["postprocess_share"] = figures["postprocess"] / figures["total"]
    return figures


def readout_figures(predictor, image, runs: int) -> dict:
    """Median seconds of the readout alone (`parse_multi_human` on the network outputs of
    `image`) over `runs` calls, and how many persons, parts and classes it finds."""
    import torch

    from worker.m2fp.postprocess import parse_multi_human

    inference = predictor.infer(image)
    config = predictor.config
    arguments_of_readout = (
        inference.pred_logits,
        inference.pred_masks,
        inference.padded_size,
        inference.image_size,
        inference.preprocessed.original_size,
        config.class_names,
    )

    def readout():
        with torch.inference_mode():
            return parse_multi_human(
                *arguments_of_readout,
                num_parsing=config.num_parsing,
                topk=config.test_topk_per_image,
            )

    seconds = median_seconds(readout, runs)
    parsing = readout()
    return {
        "readout_alone": seconds,
        "persons": len(parsing.persons),
        "parts": len(parsing.parts),
        "classes": len(set(parsing.label_map.ravel().tolist())),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, print the figures one a line, optionally write them as JSON."""
    arguments = parse_arguments(argv)
    import torch
    from model_bench import synthetic_image

    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import build_model_from_state_dict
    from worker.m2fp.config import get_config
    from worker.m2fp.predictor import Predictor

    torch.set_num_threads(arguments.threads)
    model, _ = build_model_from_state_dict(golden_state_dict(get_config("cihp")), variant="cihp")
    predictor = Predictor(model)
    image = synthetic_image(arguments.height, arguments.width)
    figures = stage_figures(predictor, image, arguments.runs)
    figures.update(readout_figures(predictor, image, arguments.readout_runs))
    figures["threads"] = arguments.threads
    figures["size"] = f"{arguments.height}x{arguments.width}"
    for key, value in figures.items():
        print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
