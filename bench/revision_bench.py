"""The network's forward in this tree against the same network at an earlier git revision, in one process.

On a noisy machine two separate runs differ by more than a change of a few percent, so both
versions run side by side: the model modules of `--base` (`worker/m2fp/` files that build the
network: model, backbone, fusion, pixel decoder, decoder, attention, position encoding, dense
products, interpolation) are read with `git show` into a temporary package, their imports pointed
at it; the compiled ops, the
config and the checkpoint loader stay this tree's (they are shared, so the op is registered
once). Both models get the golden CIHP weights and the production path (the fused CPU backbone
where it applies, the tuned malloc: `Predictor`), then forward the synthetic photo of
`model_bench.py`, interleaved round by round after a warm-up of each. Reported: min and median
forward per side, their ratio, and the largest logit and mask differences between the two.

Usage:
  .venv/bin/python bench/revision_bench.py --base HEAD --runs 9 [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODULES = (
    "model",
    "backbone",
    "fusion",
    "pixel_decoder",
    "transformer_decoder",
    "deformable_attention",
    "position_encoding",
    "dense",  # from 2026-12-02 on; a module the base does not have is skipped
    "interpolation",  # the decoder's downscales since 2026-12-02 (the readout's taps before)
    "winograd",  # the Winograd route's plans since 2026-12-02 (its compiled ops are this tree's)
)
PACKAGE = "m2fp_base"


def pointed_at_base(source: str) -> str:
    """`source` with its imports of the MODULES pointed at the base's package; other
    `worker.m2fp` imports (the compiled ops, the config) stay this tree's. `from worker.m2fp
    import a, b` is split between the two."""
    lines = []
    for original in source.splitlines(keepends=True):
        line = original
        for other in MODULES:
            line = line.replace(f"worker.m2fp.{other} ", f"{PACKAGE}.{other} ")
            line = line.replace(f"worker.m2fp.{other}\n", f"{PACKAGE}.{other}\n")
        if line.startswith("from worker.m2fp import "):
            names = [n.strip() for n in line.removeprefix("from worker.m2fp import ").split(",")]
            ours = [n for n in names if n in MODULES]
            theirs = [n for n in names if n not in MODULES]
            line = f"from {PACKAGE} import {', '.join(ours)}\n" if ours else ""
            line += f"from worker.m2fp import {', '.join(theirs)}\n" if theirs else ""
        lines.append(line)
    return "".join(lines)


def import_base(revision: str, folder: Path):
    """The `model` and `fusion` modules of `revision`, as package `m2fp_base` under `folder`."""
    package = folder / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in MODULES:
        shown = subprocess.run(
            ["git", "show", f"{revision}:worker/m2fp/{name}.py"],
            cwd=REPO,
            check=False,
            capture_output=True,
            text=True,
        )
        if shown.returncode != 0:
            continue  # not in the base
        (package / f"{name}.py").write_text(pointed_at_base(shown.stdout))
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{PACKAGE}.model"), importlib.import_module(f"{PACKAGE}.fusion")


def base_winograd_plan(fusion_module):
    """The base's Winograd plan for this CPU, as its Predictor would take it (M2FP_WINOGRAD=auto,
    the compiled transforms loaded), or None, also where the base has no plans."""
    from shared.config import winograd_mode
    from worker.m2fp.cpu import cpu_features

    winograd = getattr(fusion_module, "winograd", None)
    if winograd is None or not hasattr(winograd, "plan_for") or winograd_mode() != "auto":
        return None
    return winograd.plan_for(cpu_features()) if winograd.unavailable_reason() is None else None


def production(model, fusion_module, this_tree: bool):
    """`model` as the worker runs it on this CPU. This tree: the Predictor's own model (every
    fusion it applies); the base: its fused backbone where the Predictor would fuse one (with
    its Winograd plan for this CPU where it has plans: `base_winograd_plan`), and its fused
    encoder and oneDNN linears where the base has them (its Predictor applied them)."""
    from worker.m2fp.predictor import Predictor

    predictor = Predictor(model)  # tunes malloc, loads the ops, picks the precision
    if this_tree:
        return (
            predictor.model.eval(),
            f"{predictor.backbone_path}; encoder {predictor.encoder_path}; "
            f"dense {predictor.dense_path}"
            + ("" if predictor.winograd_path.startswith("off") else "; winograd"),
        )
    # the base's own check: this tree's isinstance tests do not know the base's classes
    path = fusion_module.backbone_path(model, predictor.device, predictor.precision)
    if path.startswith("fused"):
        plan = base_winograd_plan(fusion_module)
        if plan is None:
            model = fusion_module.with_fused_backbone(model.eval())
        else:  # the base has the Winograd route and this CPU takes it
            model = fusion_module.with_fused_backbone(model.eval(), plan)
            model, path = fusion_module.with_winograd_fpn(model, plan), path + "; winograd"
        # and what the base's Predictor did after it, where the base has it (fp32 here)
        if predictor.precision == "fp32" and hasattr(fusion_module, "with_fused_encoder"):
            model, path = fusion_module.with_fused_encoder(model), path + "; encoder fused FFN"
        if predictor.precision == "fp32" and hasattr(fusion_module, "with_onednn_linears"):
            model, path = fusion_module.with_onednn_linears(model), path + "; dense oneDNN"
    return model.eval(), path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="640x853")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def build_both(base: str, folder: Path) -> tuple[dict, str]:
    """{"this tree": model, "base <rev>": model} on the production path, and each one's path."""
    from tests.golden_weights import golden_state_dict
    from worker.m2fp import fusion
    from worker.m2fp.checkpoint import load_into
    from worker.m2fp.config import get_config
    from worker.m2fp.model import M2FP

    revision = subprocess.run(
        ["git", "rev-parse", "--short", base], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    base_model_module, base_fusion = import_base(base, folder)
    weights = golden_state_dict(get_config("cihp"))
    models, paths = {}, {}
    for name, model_class, fusion_module in (
        ("this tree", M2FP, fusion),
        (f"base {revision}", base_model_module.M2FP, base_fusion),
    ):
        model = model_class(get_config("cihp"))
        load_into(model, weights)
        models[name], paths[name] = production(model, fusion_module, name == "this tree")
    return models, paths


def interleaved(models: dict, padded, runs: int) -> tuple[dict, dict]:
    """Forward seconds per model, round by round after one warm-up each; the outputs."""
    import torch

    with torch.inference_mode():
        outputs = {name: model(padded) for name, model in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(runs):
            for name, model in models.items():
                started = time.perf_counter()
                model(padded)
                times[name].append(time.perf_counter() - started)
    return times, outputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from deform_attn_bench import cpu_description
    from model_bench import synthetic_image

    torch.set_num_threads(args.threads)
    height, width = (int(side) for side in args.size.split("x"))
    image = torch.from_numpy(synthetic_image(height, width)).permute(2, 0, 1)[None]
    with tempfile.TemporaryDirectory() as folder:
        models, paths = build_both(args.base, Path(folder))
        padded, _ = next(iter(models.values())).normalize_and_pad(image)
        times, outputs = interleaved(models, padded, args.runs)
    (ours, ours_out), (base, base_out) = outputs.items()
    report = {
        "benchmark": "forward, this tree vs a base revision, interleaved in one process",
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "threads": args.threads,
        "size": args.size,
        "padded": list(padded.shape[-2:]),
        "paths": paths,
        "runs": args.runs,
        "forward_s": {
            name: {
                "min": round(min(values), 3),
                "median": round(statistics.median(values), 3),
                "all": [round(value, 3) for value in values],
            }
            for name, values in times.items()
        },
        "ratio_min": round(min(times[ours]) / min(times[base]), 3),
        "ratio_median": round(statistics.median(times[ours]) / statistics.median(times[base]), 3),
        "max_abs_diff": {
            key: (getattr(ours_out, key) - getattr(base_out, key)).abs().max().item()
            for key in ("pred_logits", "pred_masks")
        },
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
