"""Properties of the M2FP readout and per-person grouping on small synthetic logits (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from worker.m2fp.config import CIHP_CLASS_NAMES, LIP_CLASS_NAMES
from worker.m2fp.persons import mask_box, scale_box
from worker.m2fp.postprocess import (
    parse_multi_human,
    parse_single_human,
    resize_mask_logits,
    semantic_inference,
)

CIHP_HUMAN = CIHP_CLASS_NAMES.index("Human")

NUM_PARSING = 20
HUMAN = 20
NUM_LOGITS = NUM_PARSING + 2  # 20 parsing classes, Human, no-object


@st.composite
def predictions(draw):
    """Random class logits (Q, 22), mask logits (Q, h, w) and sizes for one image."""
    num_queries = draw(st.integers(1, 9))
    mask_height, mask_width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    float_elements = st.floats(-8, 8, width=32, allow_subnormal=False)
    class_logits = draw(hnp.arrays(np.float32, (num_queries, NUM_LOGITS), elements=float_elements))
    # Give each query a likely winning class, often Human, so that persons and parts are frequent.
    winners = st.one_of(st.just(HUMAN), st.integers(0, NUM_LOGITS - 1))
    for query in range(num_queries):
        class_logits[query, draw(winners)] += draw(st.floats(0, 12, width=32))
    mask_logits = draw(
        hnp.arrays(np.float32, (num_queries, mask_height, mask_width), elements=float_elements)
    )
    padded_size = (4 * mask_height, 4 * mask_width)
    image_size = (draw(st.integers(1, padded_size[0])), draw(st.integers(1, padded_size[1])))
    output_size = (draw(st.integers(1, 30)), draw(st.integers(1, 30)))
    return (
        torch.from_numpy(class_logits),
        torch.from_numpy(mask_logits),
        padded_size,
        image_size,
        output_size,
    )


def run(prediction, **options):
    """parse_multi_human on a drawn prediction."""
    class_logits, mask_logits, padded_size, image_size, output_size = prediction
    return parse_multi_human(
        class_logits, mask_logits, padded_size, image_size, output_size, CIHP_CLASS_NAMES, **options
    )


def human_margin(prediction, parsing) -> np.ndarray:
    """Per pixel, best minus second-best mask logit among kept humans (and 0); inf with < 2 humans."""
    _, mask_logits, padded_size, image_size, output_size = prediction
    queries = sorted({i.query for i in parsing.instances if i.category_id == CIHP_HUMAN})
    if len(queries) < 2:
        return np.full(output_size, np.inf)
    logits = resize_mask_logits(mask_logits[queries], padded_size, image_size, output_size).numpy()
    logits = np.concatenate([logits, np.zeros((1, *output_size), np.float32)])  # 0: "no human"
    top_two = np.sort(logits, axis=0)[-2:]
    return top_two[1] - top_two[0]


@settings(max_examples=60, deadline=None)
@given(prediction=predictions(), chunk_size=st.integers(1, 4))
def test_chunk_size_does_not_change_the_result(prediction, chunk_size):
    whole = run(prediction, chunk_size=1000, keep_semantic_map=True)
    chunked = run(prediction, chunk_size=chunk_size, keep_semantic_map=True)
    np.testing.assert_allclose(chunked.semantic_map, whole.semantic_map, rtol=0, atol=1e-5)
    # The argmax may only differ where two classes tie within float rounding.
    top_two = np.sort(whole.semantic_map, axis=0)[-2:]
    clear = (top_two[1] - top_two[0]) > 1e-4
    np.testing.assert_array_equal(chunked.label_map[clear], whole.label_map[clear])
    same_labels = chunked.label_map == whole.label_map
    # Bilinear resizing is not bit-identical across batch sizes (a few ULP): two humans whose mask
    # logits tie within rounding may swap a pixel. Compare where the winning human is clear.
    clear_owner = human_margin(prediction, whole) > 1e-4
    compared = same_labels & clear_owner
    np.testing.assert_array_equal(chunked.instance_map[compared], whole.instance_map[compared])
    assert [(i.category_id, i.query) for i in chunked.instances] == [
        (i.category_id, i.query) for i in whole.instances
    ]
    for ours, reference in zip(chunked.instances, whole.instances, strict=True):
        assert ours.score == pytest.approx(reference.score, abs=1e-6)
        np.testing.assert_array_equal(ours.mask, reference.mask)
    assert [p["index"] for p in chunked.persons] == [p["index"] for p in whole.persons]


@settings(max_examples=60, deadline=None)
@given(prediction=predictions())
def test_maps_and_persons_are_consistent(prediction):
    result = run(prediction, chunk_size=2)
    output_size = prediction[4]
    assert result.label_map.shape == output_size and result.label_map.dtype == np.uint8
    assert result.instance_map.shape == output_size and result.instance_map.dtype == np.uint8
    assert int(result.label_map.max()) < NUM_PARSING
    assert int(result.instance_map.max()) <= len(result.persons)
    assert not (result.instance_map > 0)[result.label_map == 0].any(), (
        "a person pixel is background"
    )
    scores = [person["score"] for person in result.persons]
    assert scores == sorted(scores, reverse=True)
    assert [person["index"] for person in result.persons] == list(range(1, len(result.persons) + 1))
    for person in result.persons:
        pixels = result.instance_map == person["index"]
        assert person["area"] == int(pixels.sum())
        assert sum(part["area"] for part in person["parts"]) == person["area"]
        if person["area"]:
            assert person["box"] == mask_box(pixels)
    humans = [instance for instance in result.instances if instance.category_id == HUMAN]
    assert len(humans) == len(result.persons)
    assert all(instance.score > 0.1 for instance in humans)
    assert all(0 < part["class_id"] < NUM_PARSING and part["score"] >= 0.1 for part in result.parts)
    assert all(0 <= part["person"] <= len(result.persons) for part in result.parts)


@settings(max_examples=40, deadline=None)
@given(prediction=predictions())
def test_semantic_map_equals_reference_formula(prediction):
    class_logits, mask_logits, padded_size, image_size, output_size = prediction
    result = run(prediction, chunk_size=3, keep_semantic_map=True)
    resized = resize_mask_logits(
        mask_logits, padded_size, image_size, output_size
    )  # all queries at once
    expected = semantic_inference(class_logits, resized)[:NUM_PARSING].numpy()
    np.testing.assert_allclose(result.semantic_map, expected, rtol=0, atol=1e-5)


def two_people_prediction() -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-built logits on a 4x8 mask grid (16x32 output): two people, faces, a shirt, background at right.

    Queries: 0 Human A (left half), 1 Human B (right half, also covering the background column),
    2 Face (top, left), 3 Face (top, right but not the last column), 4 UpperClothes (bottom, all but the
    last column), 5 Background (last column), 6 no-object (everywhere).
    """
    class_logits = torch.zeros(7, NUM_LOGITS)
    for query, (class_id, logit) in enumerate(
        [
            (HUMAN, 10.0),
            (HUMAN, 6.0),
            (13, 10.0),
            (13, 10.0),
            (5, 10.0),
            (0, 10.0),
            (NUM_LOGITS - 1, 10.0),
        ]
    ):
        class_logits[query, class_id] = logit
    mask_logits = torch.full((7, 4, 8), -5.0)
    mask_logits[0, :, 0:4] = 5.0
    mask_logits[1, :, 4:8] = 5.0
    mask_logits[2, 0:2, 0:4] = 5.0
    mask_logits[3, 0:2, 4:7] = 5.0
    mask_logits[4, 2:4, 0:7] = 5.0
    mask_logits[5, :, 7] = 5.0
    mask_logits[6] = 5.0
    return class_logits, mask_logits


def test_two_people_are_grouped_with_their_parts():
    class_logits, mask_logits = two_people_prediction()
    result = parse_multi_human(
        class_logits, mask_logits, (16, 32), (16, 32), (16, 32), CIHP_CLASS_NAMES
    )
    # Bilinear x4 upsampling of the block logits switches sides exactly at the block edges.
    expected_labels = np.zeros((16, 32), dtype=np.uint8)
    expected_labels[0:8, 0:28] = 13
    expected_labels[8:16, 0:28] = 5
    np.testing.assert_array_equal(result.label_map, expected_labels)
    expected_people = np.zeros((16, 32), dtype=np.uint8)
    expected_people[:, 0:16] = 1
    expected_people[:, 16:28] = 2  # human B's mask also covers columns 28.. but they are background
    np.testing.assert_array_equal(result.instance_map, expected_people)

    first, second = result.persons
    assert first["index"] == 1 and second["index"] == 2 and first["score"] > second["score"] > 0.1
    assert first["box"] == [0, 0, 16, 16] and first["area"] == 256
    assert second["box"] == [16, 0, 28, 16] and second["area"] == 192
    assert first["parts"] == [
        {"class_id": 5, "name": "UpperClothes", "area": 128},
        {"class_id": 13, "name": "Face", "area": 128},
    ]
    assert second["parts"] == [
        {"class_id": 5, "name": "UpperClothes", "area": 96},
        {"class_id": 13, "name": "Face", "area": 96},
    ]
    part_owners = sorted((part["class_id"], part["person"]) for part in result.parts)
    assert part_owners == [(5, 1), (13, 1), (13, 2)]  # the shirt spans both, more of it on person 1


def test_no_human_gives_no_person():
    class_logits, mask_logits = two_people_prediction()
    class_logits[0:2, HUMAN] = -10.0  # the two humans become "nobody"
    result = parse_multi_human(
        class_logits, mask_logits, (16, 32), (16, 32), (16, 32), CIHP_CLASS_NAMES
    )
    assert result.persons == []
    assert not result.instance_map.any()
    assert all(part["person"] == 0 for part in result.parts) and len(result.parts) == 3
    assert (result.label_map > 0).any()


def test_overlapping_humans_split_by_highest_logit():
    class_logits, mask_logits = two_people_prediction()
    mask_logits[0] = 5.0  # human A covers everything, less strongly than B on B's side
    mask_logits[1, :, 4:8] = 8.0
    result = parse_multi_human(
        class_logits, mask_logits, (16, 32), (16, 32), (16, 32), CIHP_CLASS_NAMES
    )
    # At output column 16 the upsampled logits are A 5.0 vs B 3.125; from column 17 on B's are higher.
    assert (result.instance_map[:, 0:17] == 1).all()
    assert (result.instance_map[:, 17:28] == 2).all()


def test_persons_are_sorted_by_score_not_by_query():
    class_logits, mask_logits = two_people_prediction()
    class_logits[0, HUMAN], class_logits[1, HUMAN] = (
        6.0,
        10.0,
    )  # now the right-hand human scores higher
    result = parse_multi_human(
        class_logits, mask_logits, (16, 32), (16, 32), (16, 32), CIHP_CLASS_NAMES
    )
    assert result.persons[0]["box"] == [16, 0, 28, 16]
    assert (result.instance_map[:, 0:16] == 2).all() and (result.instance_map[:, 16:28] == 1).all()


def test_single_human_readout_has_one_person_on_the_foreground():
    class_logits = torch.zeros(3, 21)
    class_logits[0, 0], class_logits[1, 13], class_logits[2, 20] = 10.0, 10.0, 10.0
    mask_logits = torch.full((3, 8, 8), -5.0)
    mask_logits[0, :, 4:] = 5.0
    mask_logits[1, :, :4] = 5.0
    result = parse_single_human(
        class_logits, mask_logits, (32, 32), (32, 32), (0, 0, 32, 32), (20, 10), LIP_CLASS_NAMES
    )
    assert result.label_map.shape == (20, 10)
    assert set(np.unique(result.label_map)) == {0, 13}
    np.testing.assert_array_equal(result.instance_map, (result.label_map == 13).astype(np.uint8))
    (person,) = result.persons
    assert person["index"] == 1 and person["area"] == int((result.label_map == 13).sum())
    assert result.parts[0]["class_id"] == 13 and result.parts[0]["person"] == 1
    assert result.class_ids.tolist() == [0, 13]


def test_single_human_background_only_has_no_person():
    class_logits = torch.zeros(2, 21)
    class_logits[:, 0] = 10.0
    result = parse_single_human(
        class_logits,
        torch.zeros(2, 4, 4),
        (16, 16),
        (16, 16),
        (0, 0, 16, 16),
        (16, 16),
        LIP_CLASS_NAMES,
    )
    assert result.persons == [] and result.parts == [] and not result.instance_map.any()


def test_shape_errors_name_the_values():
    with pytest.raises(ValueError, match=r"\(3, 22\)"):
        parse_multi_human(
            torch.zeros(3, 22), torch.zeros(4, 2, 2), (8, 8), (8, 8), (8, 8), CIHP_CLASS_NAMES
        )
    with pytest.raises(ValueError, match="chunk_size"):
        parse_multi_human(
            torch.zeros(3, 22),
            torch.zeros(3, 2, 2),
            (8, 8),
            (8, 8),
            (8, 8),
            CIHP_CLASS_NAMES,
            chunk_size=0,
        )
    with pytest.raises(ValueError, match="output_size"):
        parse_multi_human(
            torch.zeros(3, 22), torch.zeros(3, 2, 2), (8, 8), (8, 8), (0, 8), CIHP_CLASS_NAMES
        )


def test_box_helpers():
    mask = np.zeros((5, 6), dtype=bool)
    assert mask_box(mask) == [0, 0, 0, 0]
    mask[1:3, 2:5] = True
    assert mask_box(mask) == [2, 1, 5, 3]
    assert scale_box([2, 1, 5, 3], 2.0, 3.0, 12, 15) == [4, 3, 10, 9]
    assert scale_box([1, 1, 3, 3], 1.5, 1.5, 4, 4) == [
        1,
        1,
        4,
        4,
    ]  # rounds outwards, clips to the image
