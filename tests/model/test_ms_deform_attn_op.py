"""The compiled deformable-attention op (`worker.m2fp.ops`) against the pure-PyTorch reference.

`make install` builds the op, so here it must be loaded: a missing or broken build fails these
tests (it is not skipped). Parity: float32 within 1e-5 of the largest output, on random shapes,
odd level sizes, points on and beyond the borders, several heads/points/levels, batches; bfloat16
within bfloat16 rounding; the golden network cases with the op forced on (and with the reference
forced, the fallback path), and the Predictor / CLI choosing the path from M2FP_DEFORM_ATTN.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.golden_weights import golden_state_dict
from tests.model.golden_cases import (
    NET_CASES,
    REL_TOLERANCE,
    compare_with_golden,
    flatten_outputs,
    keys_file,
    load_case,
)
from worker.m2fp import deformable_attention, ops
from worker.m2fp.checkpoint import load_into
from worker.m2fp.config import get_config
from worker.m2fp.deformable_attention import (
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_reference,
)
from worker.m2fp.model import M2FP

FP32_RELATIVE = 1e-5


@pytest.fixture(autouse=True)
def restore_mode():
    """Every test leaves the process-wide mode as it found it."""
    before = ops.mode()
    yield
    ops.configure(before)


def make_inputs(
    shapes: list[tuple[int, int]],
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 32,
    points: int = 4,
    queries: int = 50,
    spread: float = 0.3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random value, sampling locations in [-spread, 1 + spread] and softmax-ed weights."""
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(height * width for height, width in shapes)
    levels = len(shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator)
    locations = (
        torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * (1 + 2 * spread)
        - spread
    )
    weights = torch.randn(batch, queries, heads, levels * points, generator=generator).softmax(-1)
    return value, locations, weights.view(batch, queries, heads, levels, points)


def assert_matches_reference(
    value, shapes, locations, weights, relative: float = FP32_RELATIVE
) -> None:
    """Op output equals the reference within `relative` * max|reference| everywhere."""
    expected = multi_scale_deformable_attention_reference(
        value.float(), shapes, locations.float(), weights.float()
    )
    actual = ops.ms_deform_attn(value, shapes, locations, weights)
    assert actual.shape == expected.shape and actual.dtype == value.dtype
    scale = max(float(expected.abs().max()), 1e-6)
    worst = float((actual.float() - expected).abs().max())
    assert worst <= relative * scale, (
        f"max|op - reference| = {worst:.3e} > {relative} * {scale:.3e}"
    )


def test_op_is_built_and_loaded() -> None:
    status = ops.status()
    assert status["loaded"], (
        f"the compiled op is not usable: {status['reason']} (make install builds it)"
    )
    assert (
        "openmp=" in status["build_info"] and "none" not in status["build_info"].split("openmp=")[1]
    )
    assert ops.describe() in ("op", "reference: forced by M2FP_DEFORM_ATTN=reference")


@pytest.mark.parametrize(
    ("shapes", "batch", "heads", "head_dim", "points"),
    [
        ([(1, 1), (3, 5), (7, 2)], 1, 8, 32, 4),  # odd and degenerate level sizes
        ([(3, 5), (1, 1), (7, 2)], 2, 8, 32, 4),  # batch > 1, the 1x1 level in the middle
        ([(5, 6), (2, 3)], 3, 2, 16, 1),  # two levels, one point
        ([(4, 4), (3, 7), (2, 2), (1, 3)], 1, 4, 64, 3),
        ([(6, 5)], 2, 1, 5, 2),  # one level, a head dim with no specialised kernel
        ([(9, 11), (5, 6), (3, 3)], 1, 3, 48, 5),
        ([(20, 27), (10, 14), (5, 7)], 1, 8, 32, 4),  # the model's layout at a smaller size
    ],
)
def test_op_matches_reference_float32(shapes, batch, heads, head_dim, points) -> None:
    value, locations, weights = make_inputs(shapes, batch, heads, head_dim, points, queries=37)
    assert_matches_reference(value, shapes, locations, weights)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
    batch=st.integers(1, 3),
    heads=st.integers(1, 8),
    head_dim=st.sampled_from([1, 3, 16, 32, 33, 64]),
    points=st.integers(1, 5),
    queries=st.integers(1, 40),
    spread=st.sampled_from([0.0, 0.3, 1.5]),
    seed=st.integers(0, 2**16),
)
def test_op_matches_reference_on_random_shapes(
    shapes, batch, heads, head_dim, points, queries, spread, seed
):
    value, locations, weights = make_inputs(
        shapes, batch, heads, head_dim, points, queries, spread, seed
    )
    assert_matches_reference(value, shapes, locations, weights)


def border_coordinates(size: int) -> list[float]:
    """Normalised coordinates on, just inside and beyond both borders, on pixel centres and edges."""
    half = 0.5 / size
    return [
        -1e6,
        -3.0,
        -1.0,
        -2 * half,
        -half,
        -half / 2,
        0.0,
        half / 3,
        half,
        3 * half,
        1 - half,
        1 - half / 4,
        1.0,
        1 + half / 2,
        1 + half,
        1 + 2 * half,
        1.5,
        2.0,
        1e6,
    ]


@pytest.mark.parametrize("shapes", [[(1, 1), (3, 5), (7, 2)], [(4, 6)]])
def test_op_matches_reference_on_and_beyond_borders(shapes) -> None:
    """Every combination of border x and y coordinates (the same list for every level, scaled to it)."""
    heads, points = 2, 1
    grids = []
    for height, width in shapes:
        xs = torch.tensor(border_coordinates(width))
        ys = torch.tensor(border_coordinates(height))
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grids.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))  # (N, 2)
    queries = grids[0].shape[0]
    # (Q, L, 2) -> (1, Q, M, L, P, 2)
    locations = torch.stack(grids, dim=1)[None, :, None, :, None, :].expand(
        1, queries, heads, len(shapes), points, 2
    )
    value, _, weights = make_inputs(shapes, 1, heads, 32, points, queries=queries)
    assert_matches_reference(value, shapes, locations.contiguous(), weights)
    output = ops.ms_deform_attn(value, shapes, locations.contiguous(), weights)
    far = locations[0, :, 0, :, 0].abs().amax(dim=(-1, -2)) >= 1e6 - 1  # every level far outside
    assert far.any() and float(output[0, far].abs().max()) == 0.0  # padding zeros, no wrap-around


def test_op_matches_reference_on_non_contiguous_inputs() -> None:
    shapes = [(3, 5), (7, 2)]
    value, locations, weights = make_inputs(shapes, 2, 4, 32, 2, queries=11)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not value_t.is_contiguous()
    assert_matches_reference(value_t, shapes, locations, weights)


@pytest.mark.parametrize("rounded_locations", [False, True])
def test_op_bfloat16_matches_reference_of_the_rounded_inputs(rounded_locations: bool) -> None:
    """bf16 value (and optionally locations and weights): float32 accumulation, one bf16 rounding at the end.

    The reference runs in float32 on the same bf16-rounded inputs, so the only difference left is
    the output's rounding to bf16 (relative 2**-8) and summation order.
    """
    shapes = [(1, 1), (3, 5), (7, 2), (10, 13)]
    value, locations, weights = make_inputs(shapes, 2, 8, 32, 4, queries=64, seed=3)
    value = value.bfloat16()
    if rounded_locations:
        locations, weights = locations.bfloat16(), weights.bfloat16()
    expected = multi_scale_deformable_attention_reference(
        value.float(), shapes, locations.float(), weights.float()
    )
    actual = ops.ms_deform_attn(value, shapes, locations, weights)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(
        actual.float(), expected, rtol=2**-7, atol=2**-7 * float(expected.abs().max())
    )


def test_op_rejects_inconsistent_inputs() -> None:
    value, locations, weights = make_inputs([(3, 5), (7, 2)], queries=4)
    with pytest.raises(RuntimeError, match="sum to"):
        ops.ms_deform_attn(value, [(3, 5), (7, 3)], locations, weights)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.ms_deform_attn(value.double(), [(3, 5), (7, 2)], locations, weights)
    with pytest.raises(RuntimeError, match="attention_weights"):
        ops.ms_deform_attn(value, [(3, 5), (7, 2)], locations, weights[:, :2])


def test_dispatch_uses_op_unless_reference_is_forced(monkeypatch) -> None:
    shapes = [(3, 5), (7, 2)]
    value, locations, weights = make_inputs(shapes, queries=9)
    calls: list[str] = []
    real_op, real_reference = ops.ms_deform_attn, multi_scale_deformable_attention_reference
    monkeypatch.setattr(ops, "ms_deform_attn", lambda *args: calls.append("op") or real_op(*args))
    monkeypatch.setattr(
        deformable_attention,
        "multi_scale_deformable_attention_reference",
        lambda *args: calls.append("reference") or real_reference(*args),
    )
    assert ops.configure("auto") == "op"
    multi_scale_deformable_attention(value, shapes, locations, weights)
    assert ops.configure("op") == "op"
    multi_scale_deformable_attention(value, shapes, locations, weights)
    assert ops.configure("reference") == "reference: forced by M2FP_DEFORM_ATTN=reference"
    multi_scale_deformable_attention(value, shapes, locations, weights)
    assert calls == ["op", "op", "reference"]
    ops.configure("auto")
    calls.clear()
    multi_scale_deformable_attention(
        value.double(), shapes, locations.double(), weights.double()
    )  # no kernel
    multi_scale_deformable_attention(
        value.requires_grad_(), shapes, locations, weights
    )  # forward-only op
    assert calls == ["reference", "reference"]


def test_configure_op_fails_when_the_op_is_unavailable(monkeypatch) -> None:
    monkeypatch.setattr(
        ops,
        "_status",
        {"loaded": False, "path": "x", "reason": "not built (test)", "build_info": None},
    )
    with pytest.raises(RuntimeError, match="not built"):
        ops.configure("op")
    assert ops.configure("auto") == "reference: not built (test)"
    value, locations, weights = make_inputs([(3, 5)], queries=3)
    monkeypatch.setattr(
        ops, "ms_deform_attn", lambda *args: pytest.fail("op called although unavailable")
    )
    multi_scale_deformable_attention(value, [(3, 5)], locations, weights)
    with pytest.raises(ValueError, match="mode"):
        ops.configure("fast")


def test_stale_or_missing_build_is_reported_not_loaded(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(ops, "build_key", lambda: "something else")
    assert ops._load()["reason"].startswith("stale build")
    monkeypatch.setattr(ops, "LIBRARY_PATH", tmp_path / "m2fp_ops.so")
    assert ops._load()["reason"].startswith("not built")


@pytest.fixture(scope="module")
def golden_models() -> dict[str, M2FP]:
    models = {}
    for variant in ("cihp", "lip"):
        model = M2FP(get_config(variant))
        load_into(model, golden_state_dict(keys_file=keys_file(variant)))
        models[variant] = model.eval()
    return models


@pytest.mark.parametrize("mode", ["op", "reference"])
@pytest.mark.parametrize(("case", "variant"), NET_CASES)
def test_network_matches_golden_with_each_path(
    case, variant, mode, golden_models, monkeypatch
) -> None:
    """The golden parity with the op forced on (the reference must not run) and with the fallback forced."""
    ops.configure(mode)
    if mode == "op":
        unused = (deformable_attention, "multi_scale_deformable_attention_reference")
    else:
        unused = (ops, "ms_deform_attn")
    monkeypatch.setattr(*unused, lambda *args: pytest.fail(f"{unused[1]} called in mode {mode}"))
    arrays = load_case(case)
    with torch.inference_mode():
        output = golden_models[variant](
            torch.from_numpy(arrays["model_input"]),
            return_intermediates="aux_pred_logits" in arrays,
        )
    failures = compare_with_golden(
        f"{case}@{mode}", arrays, flatten_outputs(output), REL_TOLERANCE, {}
    )
    assert not failures, f"{case} ({mode}): " + "; ".join(failures)


def test_predictor_takes_its_path_from_the_environment(monkeypatch) -> None:
    from worker.m2fp.predictor import Predictor

    monkeypatch.setenv("M2FP_DEFORM_ATTN", "reference")
    assert (
        Predictor.from_weights("random", variant="tiny").deform_attn
        == "reference: forced by M2FP_DEFORM_ATTN=reference"
    )
    assert ops.mode() == "reference"
    monkeypatch.setenv("M2FP_DEFORM_ATTN", "auto")
    assert Predictor.from_weights("random", variant="tiny").deform_attn == "op"
    assert (
        Predictor.from_weights("random", variant="tiny", deform_attn="op").deform_attn == "op"
    )  # explicit wins


def test_cli_refuses_an_invalid_mode(monkeypatch, tmp_path, capsys) -> None:
    from worker.m2fp.__main__ import main

    monkeypatch.setenv("M2FP_DEFORM_ATTN", "fastest")
    assert (
        main(
            [
                "--weights",
                "random",
                "--variant",
                "tiny",
                str(tmp_path / "x.png"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "M2FP_DEFORM_ATTN" in capsys.readouterr().err


def test_cli_honours_the_forced_reference(monkeypatch, tmp_path) -> None:
    from PIL import Image

    from worker.m2fp import __main__ as cli

    progress = (
        cli.Progress
    )  # its default stream is the sys.stderr of import time, which pytest may have closed
    monkeypatch.setattr(cli, "Progress", lambda total: progress(total, stream=io.StringIO()))
    Image.new("RGB", (40, 30), (120, 80, 60)).save(tmp_path / "photo.png")
    monkeypatch.setenv("M2FP_DEFORM_ATTN", "reference")
    monkeypatch.setattr(
        ops, "ms_deform_attn", lambda *args: pytest.fail("op called although reference forced")
    )
    assert (
        cli.main(
            [
                "--weights",
                "random",
                "--variant",
                "tiny",
                str(tmp_path / "photo.png"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert ops.mode() == "reference" and (tmp_path / "photo.labels.png").is_file()


@pytest.mark.parametrize(
    "scale", [1.0, 80.0]
)  # 80: large logits, where exp without the max overflows
def test_short_softmax_equals_softmax(scale: float) -> None:
    logits = torch.randn(1, 300, 8, 12, generator=torch.Generator().manual_seed(5)) * scale
    with torch.inference_mode():
        got = deformable_attention.short_softmax(logits)
    torch.testing.assert_close(got, logits.softmax(-1), rtol=1e-6, atol=1e-7)
    assert not torch.equal(logits, got)  # a new tensor: the logits are not overwritten
    trained = logits.clone().requires_grad_()
    deformable_attention.short_softmax(trained)[..., 0].sum().backward()  # autograd: torch's own
    assert trained.grad is not None
