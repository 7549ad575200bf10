"""The plots of docs/BENCHMARKS.md, drawn from the raw JSON in docs/bench/ as plain SVG.

No plotting library: a horizontal bar chart is a few rectangles and labels, and the figures must
stay reproducible from the committed JSON alone. Three charts:

- `predict-vs-reference.svg`: whole predict at 640x853, ours and the reference, per run (the
  `bench/model_bench.py` files named in RUNS, each with its CPU), the ratio and its target;
- `forward-split.svg`: run G's forward: the dense kernels and everything else
  (`bench/gemm_efficiency.py`), beside the time the counted FLOPs take at the GEMM peak and the
  time 85 % of the peak would mean;
- `service-ratio.svg`: the service's throughput over the raw model's, per run
  (`bench/service_ratio.py`), against the 0.95x target.

Usage:  .venv/bin/python bench/plot.py            # writes docs/bench/*.svg
"""

from __future__ import annotations

import argparse
import json
import sys
from html import escape
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "docs" / "bench"
AVX2 = "EPYC Zen 3, AVX2 only"
ZEN4 = "EPYC Zen 4, AVX512-BF16 on 256-bit units"
ZEN5 = "EPYC Zen 5, AVX512-BF16"
XEON = "Intel Xeon, AVX512-BF16, no AMX"
XEON_AMX = "Intel Xeon, AMX-BF16"
# (label, model_bench JSON, CPU, target ratio on that CPU)
RUNS = [
    ("run C", "model-bench-640x853.json", AVX2, 0.35),
    ("run D", "model-bench-640x853-predict.json", AVX2, 0.35),
    ("run E", "model-bench-640x853-run-e.json", AVX2, 0.35),
    ("run F start", "model-bench-640x853-run-f-start.json", ZEN5, 0.15),
    ("run F", "model-bench-640x853-run-f.json", ZEN5, 0.15),
    ("run G", "model-bench-640x853-run-g.json", ZEN5, 0.15),
    ("run G end", "model-bench-640x853-run-g-end.json", ZEN5, 0.15),
    ("run H end", "model-bench-640x853-run-h.json", ZEN5, 0.15),
    ("run I", "model-bench-640x853-run-i.json", AVX2, 0.35),
    ("run J start", "model-bench-640x853-run-j-start.json", XEON, 0.15),
    ("run J", "model-bench-640x853-run-j.json", XEON, 0.15),
    ("run J end", "model-bench-640x853-run-j-end.json", XEON, 0.15),
    ("run K start (fp32)", "model-bench-640x853-run-k-start.json", XEON_AMX, 0.15),
    ("run K (bf16x3)", "model-bench-640x853-run-k.json", XEON_AMX, 0.15),
    ("run L start", "model-bench-640x853-run-l-start.json", ZEN4, 0.15),
    ("run L end", "model-bench-640x853-run-l.json", ZEN4, 0.15),
]
SERVICE_RUNS = [
    ("run F", "service-ratio-zen5.json"),
    ("run G1", "service-ratio-run-g-16.json"),
    ("run G3", "service-ratio-run-g.json"),
    ("run G4", "service-ratio-run-g-end.json"),
    ("run I", "service-ratio-run-i.json"),
    ("run J start", "service-ratio-run-j-start.json"),
    ("run J", "service-ratio-run-j.json"),
    ("run K start (fp32)", "service-ratio-run-k-start.json"),
    ("run K (bf16x3)", "service-ratio-run-k.json"),
    ("run L", "service-ratio-run-l.json"),
]
COLOURS = {"ours": "#2b6cb0", "reference": "#a0aec0", "rest": "#dd6b20", "mark": "#c53030"}
LABEL_WIDTH, BAR_WIDTH, ROW, BAR = 300, 480, 22, 9


def bars_svg(
    title: str,
    rows: list[tuple[str, list[tuple[float, str]], str]],
    scale: float,
    unit: str,
    marks: tuple[tuple[float, str], ...] = (),
    origin: float = 0.0,
) -> str:
    """An SVG of labelled rows, each a stack of (value, colour) segments from `origin` and a note
    at its end; the axis runs from `origin` to `scale`; `marks` are vertical lines (value, label)
    across all rows."""
    height = 50 + ROW * len(rows) + 16 * len(marks) + 30
    width = LABEL_WIDTH + BAR_WIDTH + 340
    x_of = lambda value: LABEL_WIDTH + (value - origin) / (scale - origin) * BAR_WIDTH  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for index, (label, segments, note) in enumerate(rows):
        y = 40 + ROW * index
        parts.append(f'<text x="10" y="{y + BAR}">{escape(label)}</text>')
        start = origin
        for number, (value, colour) in enumerate(segments):  # the first from the origin
            end = value if number == 0 else start + value
            parts.append(
                f'<rect x="{x_of(start):.1f}" y="{y}" width="{x_of(end) - x_of(start):.1f}" '
                f'height="{2 * BAR - 4}" fill="{colour}"/>'
            )
            start = end
        parts.append(f'<text x="{x_of(start) + 6:.1f}" y="{y + BAR}">{escape(note)}</text>')
    bottom = 40 + ROW * len(rows)
    for offset, (value, label) in enumerate(marks):
        parts.append(
            f'<line x1="{x_of(value):.1f}" y1="32" x2="{x_of(value):.1f}" y2="{bottom + 4 + 16 * offset}" '
            f'stroke="{COLOURS["mark"]}" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{x_of(value) + 3:.1f}" y="{bottom + 14 + 16 * offset}" '
            f'fill="{COLOURS["mark"]}">{escape(label)}</text>'
        )
    parts.append(f'<text x="{LABEL_WIDTH}" y="{height - 6}" fill="#4a5568">{escape(unit)}</text>')
    return "\n".join([*parts, "</svg>"]) + "\n"


def predict_rows(data: Path) -> list[tuple[str, list[tuple[float, str]], str]]:
    """Two rows per run (ours, the reference), the ratio on ours."""
    rows = []
    for label, name, cpu, target in RUNS:
        result = next(
            r
            for r in json.loads((data / name).read_text())["results"]
            if r["stage"] == "predict" and r["size"] == "640x853"
        )
        ours, reference = result["ours"]["median_s"], result["reference"]["median_s"]
        ratio = f"{ours:.2f} s = {ours / reference:.3f}x (target {target}x)"
        rows.append((f"{label}, ours ({cpu})", [(ours, COLOURS["ours"])], ratio))
        rows.append(
            (f"{label}, reference", [(reference, COLOURS["reference"])], f"{reference:.2f} s")
        )
    return rows


def forward_rows(data: Path) -> tuple[list[tuple[str, list[tuple[float, str]], str]], tuple]:
    """Run G's forward split, and the marks of the peak and of 85 % of it."""
    gemm = json.loads((data / "gemm-efficiency-run-g-end.json").read_text())
    at_peak = gemm["total_gflop"] / gemm["peak_gflops"]
    dense, rest = gemm["dense_kernels_s"], gemm["outside_kernels_s"]
    rows = [
        (
            "profiled forward, run G end",
            [(dense, COLOURS["ours"]), (rest, COLOURS["rest"])],
            f"kernels {dense:.3f} s ({100 * gemm['dense_kernels_efficiency']:.0f} % of peak)"
            f" + rest {rest:.3f} s",
        ),
        (
            "median forward, run G end",
            [(gemm["forward_s"], COLOURS["ours"])],
            f"{gemm['forward_s']:.3f} s = {100 * gemm['efficiency']:.1f} % of peak",
        ),
    ]
    marks = ((at_peak, f"all FLOPs at peak {at_peak:.2f} s"), (at_peak / 0.85, "85 %"))
    return rows, marks


def service_rows(data: Path) -> list[tuple[str, list[tuple[float, str]], str]]:
    """The service view's ratio per run."""
    rows = []
    for label, name in SERVICE_RUNS:
        summary = json.loads((data / name).read_text())["summary"]
        ratio = summary["ratio_service_view"]
        rows.append(
            (
                label,
                [(ratio, COLOURS["ours"])],
                f"{ratio:.3f}x (client view {summary['ratio']:.3f}x)",
            )
        )
    return rows


def write_all(data: Path, out: Path) -> list[Path]:
    """Draw the three charts from `data`'s JSON into `out`; returns the paths written."""
    forward, marks = forward_rows(data)
    charts = {
        "predict-vs-reference.svg": bars_svg(
            "Whole predict at 640x853, median of 5, ours vs the reference",
            predict_rows(data),
            13.0,
            "seconds (2 cores, 2 torch threads; each run names its CPU)",
        ),
        "forward-split.svg": bars_svg(
            "Forward at 640x864 on the Zen 5 EPYC (run G, session end): dense kernels + the rest",
            forward,
            1.4,
            "seconds (blue: dense kernels, orange: everything else)",
            marks,
        ),
        "service-ratio.svg": bars_svg(
            "Service throughput / raw model throughput, 2 workers on 2 cores",
            service_rows(data),
            1.1,
            "ratio (service view); the axis starts at 0.8",
            ((0.95, "target 0.95x"),),
            origin=0.8,
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, svg in charts.items():
        (out / name).write_text(svg)
    return [out / name for name in charts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the raw JSON")
    parser.add_argument("--out", type=Path, default=DATA, help="folder for the SVG files")
    arguments = parser.parse_args(argv)
    for path in write_all(arguments.data, arguments.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
