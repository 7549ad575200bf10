"""M2FP preprocessing: the shortest-edge rule, the single-human fit and centring (incl. the reference's quirk)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.m2fp.preprocess import (
    SINGLE_HUMAN_PAD_VALUE,
    center_to_target_size,
    fit_within,
    preprocess_image,
    shortest_edge_size,
)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((120, 90), (853, 640)),
        ((90, 120), (640, 853)),
        ((640, 640), (640, 640)),
        ((100, 1000), (133, 1333)),  # longest side capped at 1333, then int(x + 0.5)
        ((1440, 1920), (640, 853)),
        ((1, 1), (640, 640)),
    ],
)
def test_shortest_edge_size(size, expected):
    assert shortest_edge_size(*size) == expected


@given(height=st.integers(1, 5000), width=st.integers(1, 5000))
def test_shortest_edge_size_bounds(height, width):
    new_height, new_width = shortest_edge_size(height, width)
    assert max(new_height, new_width) <= 1333
    assert 1 <= min(new_height, new_width) <= 640


@given(height=st.integers(1, 3000), width=st.integers(1, 3000))
def test_fit_within_never_enlarges_and_fits(height, width):
    new_height, new_width = fit_within(height, width, 512, 384)
    assert 1 <= new_height <= min(height, 512) and 1 <= new_width <= min(width, 384)
    if height <= 512 and width <= 384:
        assert (new_height, new_width) == (height, width)


def test_center_to_target_size_pads_with_grey():
    image = np.zeros((100, 80, 3), dtype=np.uint8)
    result = center_to_target_size(image, (384, 512))
    assert result.image.shape == (512, 384, 3)
    assert result.crop_box == (152, 206, 232, 306)
    x0, y0, x1, y1 = result.crop_box
    assert not result.image[y0:y1, x0:x1].any()
    assert (result.image[:y0] == SINGLE_HUMAN_PAD_VALUE).all()
    assert (result.image[:, x1:] == SINGLE_HUMAN_PAD_VALUE).all()


def test_center_to_target_size_keeps_one_pixel_deficit_unpadded():
    # pad_left == pad_top == 0: the reference returns the image as it is (the network's zero padding fills in).
    image = np.full((511, 383, 3), 7, dtype=np.uint8)
    result = center_to_target_size(image, (384, 512))
    assert result.image.shape == (511, 383, 3)
    assert result.crop_box == (0, 0, 383, 511)


def test_center_to_target_size_downscales_tall_images():
    image = np.zeros((600, 300, 3), dtype=np.uint8)
    result = center_to_target_size(image, (384, 512))
    assert result.crop_box == (64, 0, 320, 512)
    assert result.original_size == (600, 300)


def test_preprocess_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((4, 4, 3), dtype=np.int16), single_human=False)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        preprocess_image(np.zeros((4, 4), dtype=np.uint8), single_human=True)
