"""Precision by CPU features (M2FP_PRECISION): detection, the choice, the paths, and agreement with fp32.

Fast tests: flags from /proc/cpuinfo texts, `choose_precision` on every kind of CPU, the setting's
parser, int8 and bf16 on the tiny network, the CLI. Slow tests (the full-size CIHP network at a
small input, ~1 min together on 2 cores): int8 and bf16 label and instance maps against fp32's on
the golden weights and on the diverse synthetic checkpoint (tests/diverse_weights.py), whose label
maps show many classes. The bar: label maps >= 99.5 % equal, instance maps >= 99 %; `auto` may
pick only a precision that meets it on both.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import load_settings, precision_mode
from shared.errors import ConfigError
from worker.m2fp import amx, cpu, precision
from worker.m2fp.predictor import Predictor

EPYC_FLAGS = "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes"
SAPPHIRE_RAPIDS_FLAGS = (
    "sse avx avx2 fma avx512f avx512dq avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni"
)
ZEN4_FLAGS = "sse avx avx2 fma avx512f avx512_vnni avx512_bf16"
AGREEMENT_SIZE = (128, 171)  # small enough for the three precisions in seconds
LABEL_AGREEMENT, INSTANCE_AGREEMENT = 0.995, 0.99


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: Any\nflags\t\t: {flags}\nbugs\t\t: none\n\n"


def test_flags_are_read_from_cpuinfo() -> None:
    assert cpu.flags_from_cpuinfo(cpuinfo(EPYC_FLAGS)) == {"avx2"}
    assert cpu.flags_from_cpuinfo(cpuinfo(SAPPHIRE_RAPIDS_FLAGS)) == set(cpu.FEATURE_FLAGS)
    assert cpu.flags_from_cpuinfo("processor\t: 0\n") is None


def test_the_benchmarks_cpu_summary_names_model_cores_and_flags(tmp_path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("model name\t: AMD EPYC 7B13\n" + cpuinfo(EPYC_FLAGS))
    summary = cpu.cpu_summary(path)
    assert summary["model"] == "AMD EPYC 7B13" and summary["flags"] == ["avx2", "fma"]
    assert isinstance(summary["cores"], int) and summary["cores"] >= 1
    path.write_text("model name\t: Xeon\n" + cpuinfo(SAPPHIRE_RAPIDS_FLAGS))
    assert cpu.cpu_summary(path)["flags"] == list(cpu.REPORTED_FLAGS)
    assert cpu.cpu_summary(tmp_path / "missing")["flags"] == []


def test_without_cpuinfo_the_flags_come_from_torch(tmp_path) -> None:
    flags = cpu.cpu_features(tmp_path / "missing")
    assert flags == cpu.flags_from_torch()
    if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX"):
        assert "avx2" in flags


@pytest.mark.parametrize(
    ("flags", "device", "expected"),
    [
        (EPYC_FLAGS, "cpu", "fp32"),  # AVX2 only: bf16 would be emulated, int8 disagrees
        (SAPPHIRE_RAPIDS_FLAGS, "cpu", "bf16x3"),  # AMX-BF16: three bf16 products agree
        (ZEN4_FLAGS, "cpu", "fp32"),  # AVX512-BF16 without AMX: bf16 disagrees with fp32
        ("sse avx avx2 avx512f avx512_vnni", "cpu", "fp32"),  # AVX-512 without bf16
        (SAPPHIRE_RAPIDS_FLAGS, "cuda:0", "fp32"),
    ],
)
def test_auto_picks_by_cpu_features(flags, device, expected) -> None:
    features = cpu.flags_from_cpuinfo(cpuinfo(flags))
    assert features is not None
    choice = precision.choose_precision("auto", device, features)
    assert choice.precision == expected
    assert choice.precision in precision.AUTO_CANDIDATES
    if device == "cpu" and cpu.has_native_bf16(features) and expected == "fp32":
        assert "bf16 is in hardware" in choice.reason  # the start log says what was left out
        assert "no bf16x3: this CPU has no AMX-BF16" in choice.reason


def test_forced_precisions_and_their_limits() -> None:
    avx2 = frozenset({"avx2"})
    choice = precision.choose_precision("bf16", "cpu", avx2)
    assert choice.precision == "bf16" and "keeps the products in fp32" in choice.reason
    for flags, where in ((SAPPHIRE_RAPIDS_FLAGS, "in bf16 on AMX"), (ZEN4_FLAGS, "in fp32")):
        features = cpu.flags_from_cpuinfo(cpuinfo(flags))
        assert features is not None
        assert where in precision.choose_precision("bf16", "cpu", features).reason
    assert precision.choose_precision("int8", "cpu", avx2).precision == "int8"
    assert precision.choose_precision("fp32", "cpu", frozenset(cpu.BF16_FLAGS)).precision == "fp32"
    with pytest.raises(ValueError, match="CPU only"):
        precision.choose_precision("int8", "cuda", avx2)
    with pytest.raises(ValueError, match="bf16x3 needs AMX: this CPU has no AMX-BF16"):
        precision.choose_precision("bf16x3", "cpu", avx2)
    amx = cpu.flags_from_cpuinfo(cpuinfo(SAPPHIRE_RAPIDS_FLAGS))
    assert amx is not None
    assert precision.choose_precision("bf16x3", "cpu", amx).precision == "bf16x3"
    with pytest.raises(ValueError, match="CPU only"):
        precision.choose_precision("bf16x3", "cuda", amx)
    missing = "the compiled ops are not loaded"
    with pytest.raises(ValueError, match=missing):  # an AMX CPU where the op did not build
        precision.choose_precision("bf16x3", "cpu", amx, amx_missing=missing)
    fallback = precision.choose_precision("auto", "cpu", amx, amx_missing=missing)
    assert fallback.precision == "fp32" and missing in fallback.reason
    with pytest.raises(ValueError, match="precision must be"):
        precision.choose_precision("fp16", "cpu", avx2)


def test_the_setting_is_parsed_in_shared_config(settings_env) -> None:
    assert precision_mode({}) == "auto"
    assert precision_mode({"M2FP_PRECISION": " INT8 "}) == "int8"
    with pytest.raises(ConfigError, match="M2FP_PRECISION"):
        precision_mode({"M2FP_PRECISION": "fp16"})
    with pytest.raises(ConfigError, match="M2FP_PRECISION"):
        load_settings({**settings_env, "M2FP_PRECISION": "half"})
    assert load_settings({**settings_env, "M2FP_PRECISION": "bf16"}).precision == "bf16"


def test_int8_quantizes_the_linears_of_a_copy(monkeypatch) -> None:
    monkeypatch.setenv("M2FP_PRECISION", "int8")
    predictor = Predictor.from_weights("random", variant="tiny")
    assert predictor.precision == "int8"
    kinds = {type(module).__module__ for module in predictor.model.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    assert not any(type(module) is torch.nn.Linear for module in predictor.model.modules())
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    result = predictor.predict(image)
    assert result.label_map.shape == (40, 56)


def test_bf16_runs_the_fp32_network_under_onednn_bf16_math() -> None:
    """bf16 on the CPU is the fp32 network as fp32 runs it (fused backbone, oneDNN linears) with
    oneDNN's math mode at bf16 during the forward only; every tensor stays float32."""
    predictor = Predictor.from_weights("random", variant="tiny", precision_mode="bf16")
    knobs = (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv)
    before = [knob.fp32_precision for knob in knobs]
    seen = []
    hook = predictor.model.sem_seg_head.predictor.class_embed.register_forward_hook(
        lambda module, inputs, output: seen.append(
            (output.dtype, *(knob.fp32_precision for knob in knobs))
        )
    )
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    inference = predictor.infer(image)
    hook.remove()
    assert set(seen) == {(torch.float32, "bf16", "bf16")}  # once per decoder layer
    assert [knob.fp32_precision for knob in knobs] == before  # restored after the forward
    assert inference.pred_logits.dtype == inference.pred_masks.dtype == torch.float32
    fp32 = Predictor.from_weights("random", variant="tiny", precision_mode="fp32")
    assert (predictor.backbone_path, predictor.dense_path) == (fp32.backbone_path, fp32.dense_path)


# fp32 and bf16 forwards of one small CIHP-width network; prints whether they are bit for bit equal
# and their largest difference relative to the logits' scale.
TWO_FORWARDS = """
import dataclasses, sys, torch
from worker.m2fp.config import get_config
from worker.m2fp.model import M2FP
from worker.m2fp.predictor import Predictor
torch.manual_seed(0)
model = M2FP(dataclasses.replace(get_config("cihp"), backbone_stage_blocks=(1, 1, 1, 1))).eval()
image = torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8).numpy()
fp32, bf16 = (Predictor(model, precision_mode=mode).infer(image) for mode in ("fp32", "bf16"))
pairs = [(fp32.pred_logits, bf16.pred_logits), (fp32.pred_masks, bf16.pred_masks)]
equal = all(torch.equal(a, b) for a, b in pairs)
relative = max(float((a - b).abs().max() / a.abs().max()) for a, b in pairs)
print(equal, relative)
"""


def two_forwards(environment: dict[str, str]) -> tuple[bool, float]:
    """Run TWO_FORWARDS in a fresh interpreter (oneDNN reads ONEDNN_MAX_CPU_ISA once, at start)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    completed = subprocess.run(
        [sys.executable, "-c", TWO_FORWARDS],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), **environment},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    equal, relative = completed.stdout.split()[-2:]
    return equal == "True", float(relative)


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE_BF16"])
def test_without_amx_bf16_gives_fp32s_results(isa: str) -> None:
    """What the reason says on a CPU without AMX-BF16 (an AVX2 EPYC; a Zen 4/5 or Xeon with
    AVX512-BF16 alone): oneDNN keeps the products in fp32. On an AMX CPU the cap makes one of those;
    on a CPU below the cap it is the CPU as it is. Measured on run K's AMX Xeon: capped at AVX2 bit
    for bit equal; at AVX512_CORE_BF16 1.2e-6 apart (oneDNN picks other fp32 kernels under the
    mode, which sum in another order), against 1e-3 and more for bf16 multiplies."""
    equal, relative = two_forwards({"ONEDNN_MAX_CPU_ISA": isa})
    assert equal or relative < 1e-5, relative


@pytest.mark.skipif(
    not cpu.has_amx_bf16(cpu.cpu_features()), reason="needs a CPU with AMX-BF16 (amx_bf16)"
)
def test_on_amx_bf16_the_products_run_in_bf16() -> None:
    """With AMX the same forwards differ by bf16's rounding of the multiplies (2**-9 relative per
    operand), neither bit for bit equal nor far apart. Measured on run K's Xeon: 1e-3 to 1e-2."""
    equal, relative = two_forwards({})
    assert not equal
    assert 1e-5 < relative < 0.1


def test_cli_honours_the_setting_and_the_flag(monkeypatch, tmp_path) -> None:
    from worker.m2fp import __main__ as cli

    progress = cli.Progress  # its default stream may be a sys.stderr pytest has closed
    monkeypatch.setattr(cli, "Progress", lambda total: progress(total, stream=io.StringIO()))
    Image.new("RGB", (40, 30), (120, 80, 60)).save(tmp_path / "photo.png")
    arguments = ["--weights", "random", "--variant", "tiny", str(tmp_path / "photo.png")]
    monkeypatch.setenv("M2FP_PRECISION", "int8")
    assert cli.main([*arguments, "--out", str(tmp_path / "env")]) == 0
    assert json.loads(Path(tmp_path / "env" / "photo.json").read_text())["precision"] == "int8"
    assert cli.main([*arguments, "--out", str(tmp_path / "flag"), "--precision", "fp32"]) == 0
    assert json.loads(Path(tmp_path / "flag" / "photo.json").read_text())["precision"] == "fp32"
    monkeypatch.setenv("M2FP_PRECISION", "fp16")
    assert cli.main([*arguments, "--out", str(tmp_path / "bad")]) == 2


# --- agreement with fp32 on the full-size network --------------------------------------------
@pytest.fixture(scope="module", params=["golden", "diverse"])
def full_size_predictors(request):
    """fp32, int8 and bf16 Predictors of one CIHP checkpoint, at AGREEMENT_SIZE as is."""
    from tests.diverse_weights import config_at, diverse_state_dict
    from tests.golden_weights import golden_state_dict
    from worker.m2fp.checkpoint import load_into
    from worker.m2fp.config import get_config
    from worker.m2fp.model import M2FP

    recipe = golden_state_dict if request.param == "golden" else diverse_state_dict
    model = M2FP(config_at(*AGREEMENT_SIZE))
    load_into(model, recipe(get_config("cihp")))
    model.eval()
    side = max(AGREEMENT_SIZE)
    runnable = [mode for mode in precision.PRECISIONS if mode != "bf16x3"]
    if amx.unavailable_reason() is None:  # bf16x3 needs an AMX CPU
        runnable.append("bf16x3")
    return request.param, {
        mode: Predictor(model, max_side=side, precision_mode=mode) for mode in runnable
    }


@pytest.mark.slow
def test_auto_picks_only_precisions_that_agree_with_fp32(full_size_predictors) -> None:
    """bf16 and int8 against fp32; one that misses the bar must not be among auto's picks.

    Measured (128x171, the synthetic photo): golden weights 100 % equal for all; the diverse
    checkpoint (14 classes) int8 84-85 % of labels; bf16 97.5 % under autocast (emulated on an
    AVX2-only CPU), 98.0 % / 99.7 % instances as oneDNN's bf16 math on run K's AMX Xeon; bf16x3
    (AMX CPUs only) agrees, so `auto` picks it there and fp32 elsewhere (docs/BENCHMARKS.md).
    Without AMX-BF16 bf16 is fp32 here and trivially agrees.
    """
    from bench.model_bench import synthetic_image

    weights, predictors = full_size_predictors
    image = synthetic_image(*AGREEMENT_SIZE)
    results = {mode: predictor.predict(image) for mode, predictor in predictors.items()}
    baseline = results["fp32"]
    if weights == "diverse":  # the proxy is only worth its name if its maps are varied
        assert len(baseline.classes_present) >= 8
    figures = {}
    for mode in [mode for mode in predictors if mode != "fp32"]:
        labels = float((results[mode].label_map == baseline.label_map).mean())
        instances = float((results[mode].instance_map == baseline.instance_map).mean())
        figures[mode] = (round(labels, 5), round(instances, 5))
        agrees = labels >= LABEL_AGREEMENT and instances >= INSTANCE_AGREEMENT
        assert agrees or mode not in precision.AUTO_CANDIDATES, (weights, mode, labels, instances)
        if weights == "golden":  # one or two classes: nothing near a tie, every precision agrees
            assert agrees, (weights, mode, labels, instances)
    print(weights, figures)
