"""How close the forward is to the machine's own limit: network FLOPs / forward time / GEMM peak.

Issue 10 asks for the forward on the fast path to reach >= 85 % of the machine's measured GEMM
throughput for its precision, over the network's FLOPs as `torch.utils.flop_counter` counts them
(convolutions, linears, matmuls: 2 FLOPs per multiply-add; the deformable sampling, softmaxes and
elementwise work count zero, so they are part of what keeps the figure below 100 %). A 3x3
convolution that runs as Winograd F(4x4, 3x3) (worker/m2fp/winograd.py) counts as the direct
convolution it replaces, though it performs a quarter of its multiplies: the figure is the rate
of the network's arithmetic as defined, not of the instructions executed, and the dense kernels'
own rate can exceed the GEMM peak. So the bench also counts what the forward executes: each
Winograd convolution's (m+2)^2 products per tile (hooks on one forward) in place of the direct
count, and reports that rate over the peak too ("executed").

Measured side by side in one process, with the same thread count:
- GEMM peak: square fp32 products (sizes `--gemm-sizes`) through MKL (`torch.mm`) and oneDNN (its
  linear, which the worker runs: worker.m2fp.dense), the best median of either; MKL runs its
  AVX2 kernels on AMD CPUs, so on an AVX-512 EPYC oneDNN's is the machine's peak;
- the forward: the golden CIHP network on the synthetic photo (`--size`, padded to /32) as the
  Predictor runs it (compiled deformable-attention op when available, fused backbone, malloc
  tuned), median of `--runs` after a warm-up; FLOPs are counted on the unfused modules, which
  do the same arithmetic (the counter does not know the fused oneDNN op);
- FLOPs per top-level part (backbone, pixel decoder, transformer decoder) and in total;
- the same ratio per round, interleaved: each round times one forward and then the best of 3
  square products of the peak's library and size, so that both meet the host at the same minute (on the
  shared KVM guests the forward alone moved by 10 % within an hour); the median and the best of
  the per-round efficiencies;
- where the forward's time goes (one profiled forward, torch.profiler self times): the dense
  kernels (`DENSE_KERNELS`: oneDNN's convolutions and linears, MKL's products, and the Winograd
  convolutions' transforms), which do all the counted FLOPs, against everything else (the deformable sampling, attention, norms, adds,
  resizes, copies, Python). The kernels' own rate over the peak says how close the arithmetic
  is to the machine's limit; the rest is time that no faster GEMM would save.

Usage:
  .venv/bin/python bench/gemm_efficiency.py                       # 640x864, 2 threads
  .venv/bin/python bench/gemm_efficiency.py --threads 1 --runs 3 --json out.json
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

PARTS = {
    "backbone": "M2FP.backbone",
    "pixel decoder": "M2FP.sem_seg_head.pixel_decoder",
    "transformer decoder": "M2FP.sem_seg_head.predictor",
}


# The operators that compute the network's FLOPs on the CPU paths (fused oneDNN, MKL, as built).
DENSE_KERNELS = (
    "mkldnn::_convolution_pointwise",
    "mkldnn::_linear_pointwise",
    "aten::mkldnn_convolution",
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::_convolution",
    "m2fp::winograd_input",  # the Winograd convolutions' transforms (worker/m2fp/winograd.py)
    "m2fp::winograd_output",
    "m2fp::amx_linear",  # bf16x3 on AMX (worker/m2fp/amx.py)
    "m2fp::amx_linear_into",
    "m2fp::amx_conv3x3",
)


def timed(function, runs: int) -> float:
    """Median wall time of `runs` calls after one warm-up call."""
    from postprocess_share import median_seconds

    function()
    return median_seconds(function, runs)


def square_products(bf16x3: bool = False) -> dict:
    """The fp32 products the peak is measured with: MKL (`torch.mm`) and, where torch has it,
    oneDNN's linear (what worker.m2fp.dense runs), each `product(left, right)`; with `bf16x3`,
    the AMX op too (worker/m2fp/amx.py: the precision `auto` runs on an AMX CPU, whose peak is
    then the one its forward is measured against)."""
    import torch

    from worker.m2fp import amx, dense

    products = {"mkl": torch.mm}
    if dense.available():
        products["onednn"] = lambda left, right: torch.ops.mkldnn._linear_pointwise(
            left, right, None, "none", [], ""
        )
    if bf16x3:
        packed: dict = {}

        def three(left, right):
            if right.data_ptr() not in packed:  # packed once per operand, as the model's weights
                packed[right.data_ptr()] = amx.PackedWeight(right)
            return amx.linear(left, packed[right.data_ptr()], None)

        products["bf16x3"] = three
    return products


def gemm_peak(sizes: list[int], runs: int, bf16x3: bool = False) -> dict:
    """fp32 GEMM throughput of square products per library (`square_products`) and size, and
    the best of all, with the library and size that gave it."""
    import torch

    by_library: dict[str, dict[int, float]] = {}
    for name, product in square_products(bf16x3).items():
        by_library[name] = {}
        for size in sizes:
            left, right = torch.randn(size, size), torch.randn(size, size)
            seconds = timed(lambda a=left, b=right, p=product: p(a, b), runs)
            by_library[name][size] = 2 * size**3 / seconds / 1e9
    peak, library, size = max(
        (gflops, name, size)
        for name, per_size in by_library.items()
        for size, gflops in per_size.items()
    )
    return {"per_library_gflops": by_library, "peak_gflops": peak, "peak_at": (library, size)}


def golden_model():
    """The golden CIHP network on CPU, in eval mode."""
    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import build_model_from_state_dict
    from worker.m2fp.config import get_config

    model, _ = build_model_from_state_dict(
        golden_state_dict(get_config("cihp")), variant="cihp", device="cpu"
    )
    return model.eval()


def count_flops(model, padded) -> dict:
    """FLOPs of one forward, in total and per part (torch.utils.flop_counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from worker.m2fp import dense

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), dense.as_built(), counter:  # oneDNN's op would count zero
        model(padded)
    by_module = counter.get_flop_counts()
    parts = {label: sum(by_module.get(name, {}).values()) / 1e9 for label, name in PARTS.items()}
    return {"total_gflop": counter.get_total_flops() / 1e9, "parts_gflop": parts}


def _seconds(function) -> float:
    """Wall time of one call."""
    tic = time.perf_counter()
    function()
    return time.perf_counter() - tic


def interleaved_efficiency(forward, gemm: dict, total_gflop: float, rounds: int) -> dict:
    """Per round: one forward, then the best of 3 products of the peak's library at its size
    (after a warm-up of each); efficiency = (FLOPs / forward time) / that round's GEMM rate."""
    import torch

    library, size = gemm["peak_at"]
    left, right = torch.randn(size, size), torch.randn(size, size)
    square = square_products(bf16x3=library == "bf16x3")[library]

    def product() -> None:
        square(left, right)

    forward(), product()
    efficiencies = []
    for _ in range(rounds):
        forward_s = _seconds(forward)
        product_s = min(_seconds(product) for _ in range(3))  # the round's peak: best of 3
        efficiencies.append(total_gflop / forward_s / (2 * size**3 / product_s / 1e9))
    return {
        "interleaved_rounds": rounds,
        "interleaved_gemm": f"{library} {size}",
        "interleaved_efficiency_median": statistics.median(efficiencies),
        "interleaved_efficiency_best": max(efficiencies),
        "interleaved_efficiencies": efficiencies,
    }


def kernel_split(forward) -> dict:
    """Seconds of one profiled `forward()` in the dense kernels and outside them (self times)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        tic = time.perf_counter()
        forward()
        wall = time.perf_counter() - tic
    averages = profiler.key_averages()
    dense = sum(e.self_cpu_time_total for e in averages if e.key in DENSE_KERNELS) / 1e6
    return {"profiled_forward_s": wall, "dense_kernels_s": dense, "outside_kernels_s": wall - dense}


def winograd_arithmetic(model, padded) -> dict:
    """GFLOP of the Winograd convolutions in one forward of `model`: as the direct convolutions
    they replace (what the counter counts) and as executed (2 (m+2)^2 C K per tile of m x m)."""
    import math

    import torch

    from worker.m2fp.winograd import WinogradConv, positions

    totals = {"direct": 0.0, "executed": 0.0}

    def hook(module, inputs, output) -> None:
        channels, (height, width) = inputs[0].shape[1], output.shape[-2:]
        tiles = math.ceil(height / module.tile) * math.ceil(width / module.tile)
        products = channels * module.out_channels
        totals["direct"] += 2 * 9 * products * height * width / 1e9
        totals["executed"] += 2 * positions(module.tile) * products * tiles / 1e9

    modules = [m for m in model.modules() if isinstance(m, WinogradConv)]
    handles = [module.register_forward_hook(hook) for module in modules]
    with torch.inference_mode():
        model(padded)
    for handle in handles:
        handle.remove()
    return {f"winograd_{kind}_gflop": value for kind, value in totals.items()}


def executed_figures(model, padded, counted_gflop: float, forward_s: float, peak: float) -> dict:
    """The forward's executed GFLOP (Winograd's products in place of the direct count) and
    their rate over the GEMM peak."""
    arithmetic = winograd_arithmetic(model, padded)
    executed = (
        counted_gflop - arithmetic["winograd_direct_gflop"] + arithmetic["winograd_executed_gflop"]
    )
    return {
        **arithmetic,
        "executed_gflop": executed,
        "executed_efficiency": executed / forward_s / peak,
    }


def production_forward(predictor, padded):
    """One forward of the Predictor's network on `padded`, within its context (bf16x3's AMX
    projections), as `Predictor.predict` runs it."""

    def forward():
        with predictor.network_context():
            return predictor.model(padded)

    return forward


def measure(size: str, runs: int, gemm_sizes: list[int]) -> dict:
    """GEMM peak, FLOPs and forward time of the golden network at `size` (H x W)."""
    import torch
    from model_bench import synthetic_image

    from worker.m2fp import ops
    from worker.m2fp.predictor import Predictor

    height, width = (int(part) for part in size.split("x"))
    model = golden_model()
    tensor = torch.from_numpy(synthetic_image(height, width)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        padded, _ = model.normalize_and_pad(tensor)
    flops = count_flops(model, padded)  # the fused convolutions do the same arithmetic, uncounted
    predictor = Predictor(model)  # the network as the worker runs it (fused, malloc tuned, auto)
    forward = production_forward(predictor, padded)
    with torch.inference_mode():
        forward_s = timed(forward, runs)
    split = kernel_split(forward)
    gemm = gemm_peak(gemm_sizes, runs, bf16x3=predictor.precision == "bf16x3")
    with torch.inference_mode():
        rounds = interleaved_efficiency(forward, gemm, flops["total_gflop"], runs)
    achieved = flops["total_gflop"] / forward_s
    kernel_rate = flops["total_gflop"] / split["dense_kernels_s"]
    executed = executed_figures(
        predictor.model, padded, flops["total_gflop"], forward_s, gemm["peak_gflops"]
    )
    return {
        "size": size,
        "padded": list(padded.shape[-2:]),
        **{"precision": predictor.precision, "amx": predictor.amx_path},
        "deform_attn": ops.describe(),
        "forward_s": forward_s,
        "achieved_gflops": achieved,
        "efficiency": achieved / gemm["peak_gflops"],
        **rounds,
        **split,
        "dense_kernels_gflops": kernel_rate,
        "dense_kernels_efficiency": kernel_rate / gemm["peak_gflops"],
        **executed,
        **flops,
        **gemm,
    }


def report(result: dict, cpu: dict, threads: int) -> None:
    """Print the figures as the BENCHMARKS table rows."""
    import torch

    print(f"CPU: {cpu['model']} (flags: {', '.join(cpu['flags'])}); torch {torch.__version__}")
    print(f"threads {threads}; input {result['size']} padded to {result['padded']}")
    print(
        f"deformable attention: {result['deform_attn']}; precision {result['precision']} ({result['amx']})"
    )
    for library, per_size in result["per_library_gflops"].items():
        sizes = ", ".join(f"{n}: {g:.1f}" for n, g in per_size.items())
        print(f"fp32 GEMM GFLOP/s, {library}, by size: {sizes}")
    print(f"GEMM peak (best of all): {result['peak_gflops']:.1f} GFLOP/s")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in result["parts_gflop"].items())
    print(f"forward FLOPs: {result['total_gflop']:.1f} GFLOP ({parts})")
    print(
        f"forward {result['forward_s']:.3f} s = {result['achieved_gflops']:.1f} GFLOP/s = "
        f"{100 * result['efficiency']:.1f} % of the GEMM peak"
    )
    print(
        f"executed: {result['executed_gflop']:.1f} GFLOP (Winograd convolutions "
        f"{result['winograd_executed_gflop']:.1f} instead of "
        f"{result['winograd_direct_gflop']:.1f}) = {100 * result['executed_efficiency']:.1f} % "
        "of the GEMM peak"
    )
    print(
        f"interleaved with {result['interleaved_gemm']} products, {result['interleaved_rounds']} "
        f"rounds: efficiency median {100 * result['interleaved_efficiency_median']:.1f} %, best "
        f"{100 * result['interleaved_efficiency_best']:.1f} %"
    )
    print(
        f"one profiled forward {result['profiled_forward_s']:.3f} s: dense kernels "
        f"{result['dense_kernels_s']:.3f} s ({result['dense_kernels_gflops']:.1f} GFLOP/s = "
        f"{100 * result['dense_kernels_efficiency']:.1f} % of the peak), everything else "
        f"{result['outside_kernels_s']:.3f} s"
    )


def main(argv: list[str] | None = None) -> int:
    """Measure and print; optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="640x864", help="H x W of the photo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gemm-sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args(argv)

    import torch
    from deform_attn_bench import cpu_description

    torch.set_num_threads(arguments.threads)
    cpu = cpu_description()
    result = measure(arguments.size, arguments.runs, arguments.gemm_sizes)
    report(result, cpu, arguments.threads)
    if arguments.json:
        payload = {"cpu": cpu, "threads": arguments.threads, "torch": torch.__version__, **result}
        arguments.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
