"""Frozen batch norms folded into the convolutions, and channels-last, against the model as built.

Golden CIHP weights, the synthetic photo of `model_bench.py`, the network forward alone (normalise
and pad once, outside the timing), the three variants interleaved round by round in one process;
medians, and the largest output difference from the unchanged model. Measured, not adopted
(docs/BENCHMARKS.md, "Precision by CPU features").

Usage:
  .venv/bin/python bench/bn_fold_bench.py --runs 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def fold_batch_norms(model):
    """A copy of `model` whose Conv2dNormActivation + FrozenBatchNorm2d pairs are one conv each."""
    import torch

    from worker.m2fp.backbone import Conv2dNormActivation, FrozenBatchNorm2d

    folded = copy.deepcopy(model)
    for module in folded.modules():
        if isinstance(module, Conv2dNormActivation) and isinstance(module.norm, FrozenBatchNorm2d):
            norm = module.norm
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            with torch.no_grad():
                module.weight.mul_(scale[:, None, None, None])
                if module.bias is None:
                    module.bias = torch.nn.Parameter(shift)
                else:
                    module.bias.copy_(module.bias * scale + shift)
            module.norm = None
    return folded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args(argv)
    import torch
    from model_bench import synthetic_image

    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import build_model_from_state_dict
    from worker.m2fp.config import get_config

    torch.set_num_threads(arguments.threads)
    model, _ = build_model_from_state_dict(golden_state_dict(get_config("cihp")), variant="cihp")
    image = torch.from_numpy(synthetic_image(640, 853).copy()).permute(2, 0, 1)
    padded, _ = model.normalize_and_pad([image])
    last = fold_batch_norms(model).to(memory_format=torch.channels_last)
    variants = {
        "as built": (model, padded),
        "BN folded": (fold_batch_norms(model), padded),
        "BN folded + channels-last": (last, padded.contiguous(memory_format=torch.channels_last)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        outputs = {name: network(x) for name, (network, x) in variants.items()}  # warm-up
        for _ in range(arguments.runs):
            for name, (network, x) in variants.items():
                started = time.perf_counter()
                outputs[name] = network(x)
                times[name].append(time.perf_counter() - started)
    base = outputs["as built"]
    for name, output in outputs.items():
        logits = (output.pred_logits - base.pred_logits).abs().max().item()
        masks = (output.pred_masks - base.pred_masks).abs().max().item()
        runs = " ".join(f"{seconds:.2f}" for seconds in times[name])
        print(
            f"{name}: median {statistics.median(times[name]):.2f} s [{runs}]  "
            f"max |d logits| {logits:.1e}  max |d mask logits| {masks:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
