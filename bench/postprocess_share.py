"""The postprocess's share of the whole `Predictor.predict`, by readout path, side by side.

Golden CIHP weights, the synthetic photo of `model_bench.py` at 640x853 (no resizing: it is already
at the network's 640-pixel shortest side) and at 1440x1920 (an upload the network sees at 640x853,
read out at 1440x1920), the predictor's own stage timings (`ParsingResult.timings`) over a few
predicts after a warm-up, medians. Then the readout alone, `parse_multi_human` on the network
outputs of that image, median of more runs. Each with the chunked PyTorch readout (`python`, what
M2FP_DEFORM_ATTN=reference runs) and the compiled readout op (`op`), switched in one process by
`ops.use_mask_readout` alone, so that both rows share the same forward (deformable-attention op on).

Usage:
  .venv/bin/python bench/postprocess_share.py               # both sizes, 2 threads, 3 predicts
  .venv/bin/python bench/postprocess_share.py --sizes 640x853 --runs 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

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
    parser.add_argument(
        "--sizes", nargs="+", default=["640x853", "1440x1920"], help="uploads, HEIGHTxWIDTH"
    )
    parser.add_argument("--paths", nargs="+", default=["python", "op"], help="readout paths")
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


def measure(predictor, size: str, path: str, arguments: argparse.Namespace) -> dict:
    """Stage and readout figures of one upload size with one readout path."""
    import torch

    from worker.m2fp import ops

    if path not in ("python", "op") or not ops.use_mask_readout(torch.zeros(1, 1, 1), 20):
        raise SystemExit(f"path {path!r}: need python|op and the built readout op")
    with (
        mock.patch.object(ops, "use_mask_readout", return_value=False)
        if path == "python"
        else contextlib.nullcontext()
    ):
        return measure_size(predictor, size, arguments) | {"path": path}


def measure_size(predictor, size: str, arguments: argparse.Namespace) -> dict:
    """Stage and readout figures of one upload size."""
    from model_bench import synthetic_image

    height, width = (int(value) for value in size.split("x"))
    image = synthetic_image(height, width)
    figures = stage_figures(predictor, image, arguments.runs)
    figures.update(readout_figures(predictor, image, arguments.readout_runs))
    figures.update(size=size, threads=arguments.threads)
    return figures


def print_table(rows: list[dict]) -> None:
    """One line per (size, path)."""
    print(
        f"{'size':>10} {'path':>9} {'forward':>8} {'postproc':>8} {'total':>7} "
        f"{'share':>6} {'readout':>8}  persons/parts/classes"
    )
    for row in rows:
        print(
            f"{row['size']:>10} {row['path']:>9} {row['forward']:8.3f} {row['postprocess']:8.3f} "
            f"{row['total']:7.3f} {row['postprocess_share']:6.1%} {row['readout_alone']:8.3f}  "
            f"{row['persons']}/{row['parts']}/{row['classes']}"
        )


def main(argv: list[str] | None = None) -> int:
    """Measure every (size, path), print the table, optionally write the figures as JSON."""
    arguments = parse_arguments(argv)
    import torch

    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import build_model_from_state_dict
    from worker.m2fp.config import get_config
    from worker.m2fp.predictor import Predictor

    torch.set_num_threads(arguments.threads)
    model, _ = build_model_from_state_dict(golden_state_dict(get_config("cihp")), variant="cihp")
    predictor = Predictor(model)
    rows = [
        measure(predictor, size, path, arguments)
        for size in arguments.sizes
        for path in arguments.paths
    ]
    print_table(rows)
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
