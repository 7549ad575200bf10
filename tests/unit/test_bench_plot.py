"""bench/plot.py draws the BENCHMARKS charts from the committed raw JSON (no plotting library)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from bench.plot import DATA, RUNS, bars_svg, write_all

SVG = "{http://www.w3.org/2000/svg}"


def test_the_charts_are_drawn_from_the_committed_json(tmp_path) -> None:
    paths = write_all(DATA, tmp_path)
    assert [p.name for p in paths] == [
        "predict-vs-reference.svg",
        "forward-split.svg",
        "service-ratio.svg",
    ]
    predict = ET.parse(paths[0]).getroot()
    texts = [t.text for t in predict.iter(f"{SVG}text")]
    assert len(list(predict.iter(f"{SVG}rect"))) == 2 * len(RUNS)  # ours and the reference
    # each run's ratio is computed from its file, and its CPU is named
    run_g = json.loads((DATA / "model-bench-640x853-run-g.json").read_text())["results"]
    predict_g = next(r for r in run_g if r["stage"] == "predict")
    ratio = predict_g["ours"]["median_s"] / predict_g["reference"]["median_s"]
    assert any(t and t.endswith(f"= {ratio:.3f}x (target 0.15x)") for t in texts)
    assert any(t and "Zen 5" in t for t in texts) and any(t and "AVX2" in t for t in texts)
    split = ET.parse(paths[1]).getroot()
    assert len(list(split.iter(f"{SVG}line"))) == 2  # the peak and 85 % of it


def test_segments_stack_from_the_origin() -> None:
    svg = bars_svg("t", [("a", [(1.0, "red"), (0.5, "blue")], "n")], scale=2.0, unit="s")
    rects = list(ET.fromstring(svg).iter(f"{SVG}rect"))
    widths = [float(r.get("width")) for r in rects]
    starts = [float(r.get("x")) for r in rects]
    assert widths[0] == 2 * widths[1]
    assert starts[1] == starts[0] + widths[0]
    shifted = bars_svg("t", [("a", [(0.9, "red")], "n")], scale=1.0, unit="x", origin=0.8)
    (rect,) = ET.fromstring(shifted).iter(f"{SVG}rect")
    assert float(rect.get("width")) == 240.0  # (0.9 - 0.8) / (1.0 - 0.8) of the 480 px bar
