"""The compiled mask readout (`m2fp::mask_readout`, `worker.m2fp.ops`) against the PyTorch readout.

`make install` builds the op, so here it must be loaded (a missing build fails, it is not skipped).
The composed interpolation taps against F.interpolate; then `parse_multi_human` with the op and
with the reference (M2FP_DEFORM_ATTN=reference's chunked readout) on random logits at output sizes
equal to the image, upscaled, downscaled, odd, 1-pixel, with an image smaller than its padding:
semantic map and mask scores within 1e-5, label maps equal but at near-ties, the same kept instances
and persons, kept masks equal but where the logit is within rounding of 0. Last, that the default path really calls the op.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.m2fp import ops
from worker.m2fp.config import CIHP_CLASS_NAMES
from worker.m2fp.interpolation import mask_taps
from worker.m2fp.postprocess import parse_multi_human, resize_mask_logits
from worker.m2fp.predictor import Predictor

NUM_PARSING, HUMAN = 20, 20
RELATIVE = 1e-5
TIE_MARGIN = 1e-5

# (queries, low-res h, w, padded size, image size, output size)
GEOMETRIES = [
    pytest.param(100, 160, 216, (640, 864), (640, 853), (640, 853), id="640x853-as-predict"),
    pytest.param(24, 40, 54, (160, 216), (160, 213), (360, 480), id="upscale-2.25x"),
    pytest.param(30, 48, 64, (192, 256), (190, 250), (97, 131), id="downscale-odd"),
    pytest.param(9, 13, 17, (52, 68), (37, 45), (37, 45), id="image-smaller-than-padded"),
    pytest.param(5, 7, 9, (28, 36), (27, 33), (1, 61), id="one-pixel-high"),
    pytest.param(4, 1, 1, (4, 4), (1, 1), (1, 1), id="one-pixel"),
    pytest.param(6, 1, 5, (4, 20), (3, 19), (41, 1), id="one-low-res-row"),
]


@pytest.fixture(autouse=True)
def restore_mode():
    """Every test leaves the process-wide mode as it found it."""
    before = ops.mode()
    yield
    ops.configure(before)


def random_prediction(queries: int, height: int, width: int, seed: int = 0):
    """Class logits with a likely winner per query (often Human) and smooth-ish mask logits."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(queries, NUM_PARSING + 2, generator=generator) * 2
    winners = torch.randint(0, NUM_PARSING + 2, (queries,), generator=generator)
    winners[::3] = HUMAN
    class_logits[torch.arange(queries), winners] += 8
    mask_logits = torch.randn(queries, height, width, generator=generator) * 6
    return class_logits, mask_logits


def test_op_is_built_and_loaded() -> None:
    status = ops.status()
    assert "mask_readout" in status["ops"], (
        f"the compiled mask readout is not usable: {status['reason']} (make install builds it)"
    )


@pytest.mark.parametrize(("queries", "height", "width", "padded", "image", "output"), GEOMETRIES)
def test_taps_compose_the_two_resizes(queries, height, width, padded, image, output) -> None:
    _, mask_logits = random_prediction(queries, height, width)
    y_index, y_weight, x_index, x_weight = mask_taps((height, width), padded, image, output)
    rows = torch.zeros(output[0], height, dtype=torch.float64).scatter_add_(
        1, y_index, y_weight.double()
    )
    columns = torch.zeros(output[1], width, dtype=torch.float64).scatter_add_(
        1, x_index, x_weight.double()
    )
    ours = torch.einsum("yh,qhw,xw->qyx", rows, mask_logits.double(), columns)
    expected = resize_mask_logits(mask_logits, padded, image, output).double()
    worst = float((ours - expected).abs().max())
    assert worst <= RELATIVE * float(expected.abs().max()), (
        f"max |taps - F.interpolate| {worst:.3g}"
    )


def read_both(queries, height, width, padded, image, output, seed=0):
    """parse_multi_human with the reference readout and with the op, on the same random logits."""
    class_logits, mask_logits = random_prediction(queries, height, width, seed)
    results = {}
    for mode in ("reference", "op"):
        ops.configure(mode)
        results[mode] = parse_multi_human(
            class_logits,
            mask_logits,
            padded,
            image,
            output,
            CIHP_CLASS_NAMES,
            keep_semantic_map=True,
        )
    return results["reference"], results["op"], mask_logits


def assert_labels_match_but_near_ties(reference, ours) -> None:
    """Label maps >= 99.99 % equal; every differing pixel is a top-2 tie within TIE_MARGIN."""
    differing = reference.label_map != ours.label_map
    assert differing.mean() <= 1e-4, f"{differing.mean():.4%} of the label map differs"
    top_two = np.sort(reference.semantic_map, axis=0)[-2:]
    margins = (top_two[1] - top_two[0])[differing]
    assert (margins < TIE_MARGIN).all(), f"label differs at a clear pixel (margin {margins.max()})"


def assert_same_instances_and_persons(reference, ours) -> None:
    """The same kept instances (scores within RELATIVE) and the same persons."""
    assert [(i.category_id, i.query) for i in ours.instances] == [
        (i.category_id, i.query) for i in reference.instances
    ]
    for mine, theirs in zip(ours.instances, reference.instances, strict=True):
        assert mine.score == pytest.approx(theirs.score, rel=RELATIVE)
        assert mine.packed_mask.shape == theirs.packed_mask.shape
    same_labels = ours.label_map == reference.label_map
    np.testing.assert_array_equal(
        ours.instance_map[same_labels], reference.instance_map[same_labels]
    )
    assert [p["index"] for p in ours.persons] == [p["index"] for p in reference.persons]
    for mine, theirs in zip(ours.persons, reference.persons, strict=True):
        assert mine["score"] == pytest.approx(theirs["score"], rel=RELATIVE)


@pytest.mark.parametrize(("queries", "height", "width", "padded", "image", "output"), GEOMETRIES)
def test_op_matches_the_reference_readout(queries, height, width, padded, image, output) -> None:
    reference, ours, mask_logits = read_both(queries, height, width, padded, image, output)
    assert ours.label_map.shape == output and ours.label_map.dtype == np.uint8
    scale = float(np.abs(reference.semantic_map).max())
    worst = float(np.abs(ours.semantic_map - reference.semantic_map).max())
    assert worst <= RELATIVE * scale, f"semantic map max |diff| {worst:.3g} (max {scale:.3g})"
    np.testing.assert_allclose(
        ours.topk.mask_scores, reference.topk.mask_scores, rtol=0, atol=RELATIVE
    )
    np.testing.assert_array_equal(ours.topk.queries, reference.topk.queries)
    assert_labels_match_but_near_ties(reference, ours)
    assert_same_instances_and_persons(reference, ours)
    for mine, theirs in zip(ours.instances, reference.instances, strict=True):
        logits = resize_mask_logits(mask_logits[[mine.query]], padded, image, output)[0]
        assert_masks_match_but_near_zero(mine.mask, theirs.mask, logits.numpy())


def assert_masks_match_but_near_zero(ours, reference, logits) -> None:
    """Kept masks (`logit > 0`) equal but where the reference logit is within rounding of 0."""
    differing = ours != reference
    assert differing.mean() <= 1e-4, f"{differing.mean():.4%} of a kept mask differs"
    assert (np.abs(logits[differing]) < 1e-4).all(), "a kept mask differs at a clear pixel"


def test_mask_bits_packs_every_byte_pattern_and_the_tail() -> None:
    """`mask_bits` on identity taps: all 256 patterns of eight pixels come out as np.packbits
    makes them (the multiply-pack of eight 0/1 bytes), and a last partial byte too."""
    patterns = np.unpackbits(np.arange(256, dtype=np.uint8))  # 2048 pixels, MSB first
    flat = np.concatenate([patterns, [1, 0, 1]]).astype(np.float32) * 2 - 1  # +-1, 2051 pixels
    size = (1, flat.size)
    logits = torch.from_numpy(flat).reshape(1, *size)
    bits = ops.mask_bits(logits, mask_taps(size, size, size, size)).numpy()
    np.testing.assert_array_equal(bits[0], np.packbits(flat > 0))
    assert bits[0, 256] == 0b10100000


@pytest.mark.parametrize(("queries", "height", "width", "padded", "image", "output"), GEOMETRIES)
def test_mask_bits_equal_the_resized_logits_above_zero(
    queries, height, width, padded, image, output
) -> None:
    """Every query's packed mask equals np.packbits(PyTorch's resized logits > 0) but where a
    logit is within rounding of 0 (the op interpolates along x first)."""
    _, mask_logits = random_prediction(queries, height, width, seed=5)
    taps = mask_taps((height, width), padded, image, output)
    bits = ops.mask_bits(mask_logits, taps).numpy()
    resized = resize_mask_logits(mask_logits, padded, image, output).numpy()
    pixels = output[0] * output[1]
    assert bits.shape == (queries, (pixels + 7) // 8)
    for query in range(queries):
        ours = np.unpackbits(bits[query])[:pixels].reshape(output).astype(bool)
        assert_masks_match_but_near_zero(ours, resized[query] > 0, resized[query])


def test_op_results_do_not_depend_on_the_thread_count() -> None:
    class_logits, mask_logits = random_prediction(40, 30, 41, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = parse_multi_human(
            class_logits, mask_logits, (120, 164), (117, 160), (90, 211), CIHP_CLASS_NAMES
        )
        torch.set_num_threads(2)
        many = parse_multi_human(
            class_logits, mask_logits, (120, 164), (117, 160), (90, 211), CIHP_CLASS_NAMES
        )
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(many.label_map, single.label_map)
    np.testing.assert_array_equal(many.topk.mask_scores, single.topk.mask_scores)


def test_pasting_and_reference_mode_take_the_reference_readout(monkeypatch) -> None:
    calls = count_op_calls(monkeypatch)
    class_logits, mask_logits = random_prediction(6, 5, 7)
    parse_multi_human(
        class_logits,
        mask_logits,
        (20, 28),
        (19, 27),
        (19, 27),
        CIHP_CLASS_NAMES,
        paste_threshold=0.3,
    )
    ops.configure("reference")
    parse_multi_human(class_logits, mask_logits, (20, 28), (19, 27), (19, 27), CIHP_CLASS_NAMES)
    assert calls == []


def test_an_unloadable_library_reads_with_pytorch(monkeypatch) -> None:
    calls = count_op_calls(monkeypatch)
    monkeypatch.setattr(
        ops, "_status", {"loaded": False, "path": "x", "reason": "not built (test)", "ops": []}
    )
    class_logits, mask_logits = random_prediction(6, 5, 7)
    result = parse_multi_human(
        class_logits, mask_logits, (20, 28), (19, 27), (30, 41), CIHP_CLASS_NAMES
    )
    assert result.label_map.shape == (30, 41) and calls == []


def count_op_calls(monkeypatch) -> list[tuple]:
    """Record the shapes of every `ops.mask_readout` call (and still make it)."""
    calls: list[tuple] = []
    real = ops.mask_readout

    def spy(mask_logits, *arguments):
        calls.append(tuple(mask_logits.shape))
        return real(mask_logits, *arguments)

    monkeypatch.setattr(ops, "mask_readout", spy)
    return calls


def test_default_predict_uses_the_op(monkeypatch) -> None:
    """A silent fallback to the PyTorch readout (the op missing, the switch ignored) fails here."""
    monkeypatch.delenv("M2FP_DEFORM_ATTN", raising=False)
    calls = count_op_calls(monkeypatch)
    predictor = Predictor.from_weights("random", variant="tiny")
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    predictor.predict(image)
    assert len(calls) == 1, "Predictor.predict did not read its masks with m2fp::mask_readout"
    ops.configure("reference")
    Predictor.from_weights("random", variant="tiny", deform_attn="reference").predict(image)
    assert len(calls) == 1, "M2FP_DEFORM_ATTN=reference still called the op"
