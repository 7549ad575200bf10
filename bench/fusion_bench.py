"""The fused CPU backbone (worker/m2fp/fusion.py) against the model as built: forward and backbone time.

Golden CIHP weights, the synthetic photo of `model_bench.py` at 640x853 (pads to 640x864), the
network alone (normalise and pad once, outside the timing); "as built" and "fused" interleaved round
by round in one process; medians, and the largest output difference from the model as built.
`--malloc as-is` leaves glibc's malloc as the process starts (the default tunes it as the worker
does, worker/m2fp/allocator.py): run both to see what the allocator is worth.

Usage:
  .venv/bin/python bench/fusion_bench.py --runs 5 [--malloc as-is] [--json out.json]
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


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def interleaved(variants: dict, padded, runs: int) -> tuple[dict, dict]:
    """Backbone and forward times of each variant, round by round; the last outputs."""
    import torch

    times = {name: {"backbone": [], "forward": []} for name in variants}
    outputs = {}
    with torch.inference_mode():
        for network in variants.values():  # warm-up
            network(padded)
        for _ in range(runs):
            for name, network in variants.items():
                seconds, _ = timed(lambda network=network: network.backbone(padded))
                times[name]["backbone"].append(seconds)
                seconds, outputs[name] = timed(lambda network=network: network(padded))
                times[name]["forward"].append(seconds)
    return times, outputs


def summarise(times: dict, outputs: dict) -> dict:
    """Medians, runs and the largest differences from "as built", printed and returned."""
    base = outputs["as built"]
    report = {}
    for name, output in outputs.items():
        medians = {stage: statistics.median(values) for stage, values in times[name].items()}
        report[name] = {
            "median_s": medians,
            "runs_s": times[name],
            "max_abs_diff_logits": (output.pred_logits - base.pred_logits).abs().max().item(),
            "max_abs_diff_mask_logits": (output.pred_masks - base.pred_masks).abs().max().item(),
        }
        runs = " ".join(f"{seconds:.2f}" for seconds in times[name]["forward"])
        print(
            f"{name}: backbone {medians['backbone']:.2f} s, forward {medians['forward']:.2f} s "
            f"[{runs}]  max |d logits| {report[name]['max_abs_diff_logits']:.1e}  "
            f"max |d mask logits| {report[name]['max_abs_diff_mask_logits']:.1e}"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--malloc", choices=("tuned", "as-is"), default="tuned", help="worker/m2fp/allocator.py"
    )
    arguments = parser.parse_args(argv)
    import torch
    from model_bench import synthetic_image

    from tests.golden_weights import golden_state_dict
    from worker.m2fp import allocator, fusion
    from worker.m2fp.checkpoint import build_model_from_state_dict
    from worker.m2fp.config import get_config
    from worker.m2fp.cpu import cpu_summary

    torch.set_num_threads(arguments.threads)
    malloc = allocator.configure() if arguments.malloc == "tuned" else "as is"
    model, _ = build_model_from_state_dict(golden_state_dict(get_config("cihp")), variant="cihp")
    image = torch.from_numpy(synthetic_image(640, 853).copy()).permute(2, 0, 1)
    padded, _ = model.normalize_and_pad([image])
    variants = {"as built": model.eval(), "fused": fusion.with_fused_backbone(model.eval())}
    times, outputs = interleaved(variants, padded, arguments.runs)
    report = {"cpu": cpu_summary(), "torch": torch.__version__, "threads": arguments.threads}
    report["malloc"] = malloc
    report.update(summarise(times, outputs))
    built, fused = report["as built"]["median_s"], report["fused"]["median_s"]
    print(
        f"fused / as built: backbone {fused['backbone'] / built['backbone']:.3f}x, "
        f"forward {fused['forward'] / built['forward']:.3f}x on {report['cpu']}"
    )
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
