"""Where the forward's time goes, per stage, with the deformable-attention op and with the reference.

torch.profiler over whole forwards of the golden CIHP model on the synthetic photo; each stage is a
`record_function` span opened and closed by forward hooks on its modules, so the figures are
inclusive wall times of those modules as the profiler saw them, averaged over the profiled runs.
The encoder's sampling is the op's own entry (`m2fp::ms_deform_attn`) or, for the reference, what
is left of the attention module once its four linears are taken out.

`--path production` (the default) profiles the model as the worker runs it: `Predictor(model).model`,
so the fused CPU backbone and the tuned malloc where they apply; `--path as-built` the checkpoint's
modules as loaded (the figures before fusion).

Usage:
  .venv/bin/python bench/forward_profile.py                  # 640x864, 2 threads, op and reference
  .venv/bin/python bench/forward_profile.py --modes op --runs 3 --top 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ENCODER = "sem_seg_head.pixel_decoder.transformer.encoder.layers."
DECODER = "sem_seg_head.predictor."
# (label, predicate on the module name); the first match wins, and a module inside a labelled one is
# only labelled when it is itself a stage of interest (the encoder's parts).
STAGES = [
    ("backbone: stem", lambda name: name == "backbone.stem"),
    ("backbone: res2", lambda name: name == "backbone.res2"),
    ("backbone: res3", lambda name: name == "backbone.res3"),
    ("backbone: res4", lambda name: name == "backbone.res4"),
    ("backbone: res5", lambda name: name == "backbone.res5"),
    (
        "pixel decoder: input projections",
        lambda name: (
            name.startswith("sem_seg_head.pixel_decoder.input_proj.") and name.count(".") == 3
        ),
    ),
    (
        "pixel decoder: encoder (6 layers)",
        lambda name: name == "sem_seg_head.pixel_decoder.transformer",
    ),
    (
        "  encoder: value_proj",
        lambda name: name.startswith(ENCODER) and name.endswith("self_attn.value_proj"),
    ),
    (
        "  encoder: sampling_offsets + attention_weights linears",
        lambda name: (
            name.startswith(ENCODER)
            and name.endswith(("self_attn.sampling_offsets", "self_attn.attention_weights"))
        ),
    ),
    (
        "  encoder: output_proj",
        lambda name: name.startswith(ENCODER) and name.endswith("self_attn.output_proj"),
    ),
    (
        "  encoder: attention module",
        lambda name: name.startswith(ENCODER) and name.endswith("self_attn"),
    ),
    (
        "  encoder: FFN linears",
        lambda name: name.startswith(ENCODER) and name.endswith(("linear1", "linear2")),
    ),
    (
        "  encoder: layer norms",
        lambda name: name.startswith(ENCODER) and name.endswith(("norm1", "norm2")),
    ),
    (
        "pixel decoder: FPN (adapter, layer, mask_features)",
        lambda name: (
            name
            in (
                "sem_seg_head.pixel_decoder.adapter_1",
                "sem_seg_head.pixel_decoder.layer_1",
                "sem_seg_head.pixel_decoder.mask_features",
            )
        ),
    ),
    ("transformer decoder (9 layers, mask heads)", lambda name: name == "sem_seg_head.predictor"),
    (
        "  decoder: cross-attention layers",
        lambda name: (
            name.startswith(DECODER + "transformer_cross_attention_layers.")
            and name.count(".") == 3
        ),
    ),
    (
        "  decoder: self-attention layers",
        lambda name: (
            name.startswith(DECODER + "transformer_self_attention_layers.") and name.count(".") == 3
        ),
    ),
    (
        "  decoder: FFN layers",
        lambda name: name.startswith(DECODER + "transformer_ffn_layers.") and name.count(".") == 3,
    ),
    ("  decoder: mask embed MLP", lambda name: name == DECODER + "mask_embed"),
]
OP_NAME = "m2fp::ms_deform_attn"


def attach_stage_spans(model) -> list:
    """Forward hooks that open a record_function span per labelled module; returns the handles."""
    import torch

    handles = []
    for name, module in model.named_modules():
        label = next((label for label, matches in STAGES if matches(name)), None)
        if label is None:
            continue
        spans = []

        def enter(_module, _inputs, label=label, spans=spans):
            span = torch.profiler.record_function(label.strip())
            span.__enter__()
            spans.append(span)

        def leave(_module, _inputs, _output, spans=spans):
            spans.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def profile_mode(model, tensor, mode: str, runs: int) -> tuple[dict[str, float], float, list]:
    """Per-label seconds per forward, wall seconds per forward and the profiler's event averages."""
    import torch

    from worker.m2fp import ops

    ops.configure(mode)

    def forward():
        with torch.inference_mode():
            padded, _ = model.normalize_and_pad(tensor)
            model(padded)

    forward()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(runs):
            forward()
        wall = (time.perf_counter() - started) / runs
    averages = profiler.key_averages()
    seconds = {event.key: event.cpu_time_total / 1e6 / runs for event in averages}
    return seconds, wall, averages


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="640x864", help="H x W (multiples of 32 stay unpadded)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--runs", type=int, default=2, help="profiled forwards per mode (after a warm-up)"
    )
    parser.add_argument(
        "--modes", nargs="+", default=["reference", "op"], choices=["reference", "op"]
    )
    parser.add_argument("--top", type=int, default=10, help="operators listed by self CPU time")
    parser.add_argument(
        "--path",
        default="production",
        choices=["production", "as-built"],
        help="production: the Predictor's model (fused backbone, tuned malloc); as-built: as loaded",
    )
    return parser.parse_args(argv)


ATTENTION_LINEARS = (
    "encoder: value_proj",
    "encoder: sampling_offsets + attention_weights linears",
    "encoder: output_proj",
)


def stage_rows(results: dict, modes: list[str]) -> list[tuple[str, dict[str, float]]]:
    """(label, seconds per mode) per stage; the attention module is followed by two derived rows:
    its sampling (the module less its linears) and, of that, the op's own entry."""
    rows = []
    for label in (label.strip() for label, _ in STAGES):
        rows.append((label, {mode: results[mode][0].get(label, 0.0) for mode in modes}))
        if label != "encoder: attention module":
            continue
        sampling = {}
        for mode in modes:
            seconds = results[mode][0]
            linears = sum(seconds.get(name, 0.0) for name in ATTENTION_LINEARS)
            sampling[mode] = seconds.get("encoder: attention module", 0.0) - linears
        rows.append(
            ("encoder: sampling, softmax, locations (attention module minus its linears)", sampling)
        )
        rows.append(
            (
                "encoder: of which the op m2fp::ms_deform_attn",
                {mode: results[mode][0].get(OP_NAME, 0.0) for mode in modes},
            )
        )
    return rows


def print_stage_table(results: dict, modes: list[str]) -> None:
    """The per-stage Markdown table, seconds and share of the wall time, modes side by side."""
    print("\n| stage | " + " | ".join(f"{mode} s | {mode} %" for mode in modes) + " |")
    print("|---|" + "---|---|" * len(modes))
    for label, values in stage_rows(results, modes):
        if label == "encoder: attention module":
            continue  # shown as its two derived rows
        indent = "&nbsp;&nbsp;" if label.startswith("encoder:") else ""
        cells = " | ".join(
            f"{values[mode]:.3f} | {100 * values[mode] / results[mode][1]:.1f}" for mode in modes
        )
        print(f"| {indent}{label} | {cells} |")
    print(
        "| **whole forward (wall, profiled)** | "
        + " | ".join(f"**{results[mode][1]:.3f}** | 100" for mode in modes)
        + " |"
    )


def print_top_operators(results: dict, modes: list[str], top: int, runs: int) -> None:
    """The `top` operators of each mode by self CPU time, per forward (stage spans left out)."""
    labels = tuple(label.strip() for label, _ in STAGES)
    for mode in modes:
        print(f"\ntop operators by self CPU time, {mode} (per forward):")
        events = sorted(
            (event for event in results[mode][2] if not event.key.startswith(labels)),
            key=lambda event: event.self_cpu_time_total,
            reverse=True,
        )[:top]
        for event in events:
            print(
                f"  {event.key:40s} {event.self_cpu_time_total / 1e6 / runs:7.3f} s  "
                f"x{event.count // runs}"
            )


def main(argv: list[str] | None = None) -> int:
    """Profile each mode and print one table side by side, then the top operators of each."""
    arguments = parse_arguments(argv)

    import torch
    from deform_attn_bench import cpu_description, golden_model, parse_size
    from model_bench import synthetic_image

    from worker.m2fp import ops

    torch.set_num_threads(arguments.threads)
    cpu = cpu_description()
    print(
        f"CPU: {cpu['model']} (flags: {', '.join(cpu['flags'])}); torch {torch.__version__}; "
        f"{arguments.threads} threads; {arguments.size}; op {ops.status()['build_info']}"
    )
    model = golden_model()
    if arguments.path == "production":
        from worker.m2fp.predictor import Predictor

        predictor = Predictor(model)
        print(f"path: backbone {predictor.backbone_path}; malloc {predictor.allocator}")
        model = predictor.model
    attach_stage_spans(model)
    tensor = torch.from_numpy(synthetic_image(*parse_size(arguments.size))).permute(2, 0, 1)[None]

    results = {mode: profile_mode(model, tensor, mode, arguments.runs) for mode in arguments.modes}
    ops.configure("auto")
    print_stage_table(results, arguments.modes)
    print_top_operators(results, arguments.modes, arguments.top, arguments.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
