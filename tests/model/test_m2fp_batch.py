"""`Predictor.predict_batch` gives what `predict` gives on each image alone (fp32, CPU).

The network has no padding mask, as in the reference (SPEC section 2.2: the encoder's masks are all
False, the decoder attends to every pixel), and a batch must share one input size. Padding an image
beyond its own multiple of 32 therefore changes its features near and beyond its border (the
convolutions and both attentions see the extra zeros), and with them its label and instance maps:
padding three differently sized images to the largest of them gave 83-92 % equal label maps and
46-94 % equal instance maps with the network below. Cropping before the readout cannot undo that,
because the difference is in the features themselves. So `predict_batch` groups the images by the
size `predict` pads each of them to and runs one forward per group: inside a group every network
input is exactly the one `predict` would build, and the maps come out 100 % equal.

The network is the tiny test config with the golden weight recipe, its Human logit and mask
embeddings raised so that the maps show several classes, a person and part instances.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.diverse_weights import calibration_image as photo_like  # gradients + noise
from tests.golden_weights import golden_state_dict
from worker.m2fp.checkpoint import build_untrained_model
from worker.m2fp.config import TINY
from worker.m2fp.predictor import Predictor

TINY_FAST = TINY.replace(min_size_test=160, max_size_test=320)
# (60, 80) and (61, 80) resize to 160x213 and 160x210 and both pad to 160x224: one batched forward;
# (90, 50) resizes to 288x160 and runs in a group of its own.
SIZES = [(60, 80), (90, 50), (61, 80)]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    model = build_untrained_model(TINY_FAST)
    model.load_state_dict(golden_state_dict(TINY_FAST), strict=False)
    with torch.no_grad():
        head = model.sem_seg_head.predictor
        head.class_embed.bias[TINY_FAST.num_parsing] += 5.0  # Human
        head.class_embed.bias[1 : TINY_FAST.num_parsing] += 2.0  # parts
        for layer in head.mask_embed.layers:
            layer.weight *= 4.0 ** (1 / 3)
    return Predictor(model.eval(), untrained=True, deform_attn="reference")


def test_batch_equals_one_image_at_a_time(predictor):
    images = [photo_like(height, width, seed) for seed, (height, width) in enumerate(SIZES)]
    padded = [predictor.padded_size(predictor.preprocess(image)) for image in images]
    assert padded[0] == padded[2] != padded[1], (
        "the sizes must give one shared and one own padded size"
    )
    batch = predictor.predict_batch(images)
    assert len(batch) == len(images)
    for image, batched in zip(images, batch, strict=True):
        alone = predictor.predict(image)
        assert batched.label_map.shape == image.shape[:2]
        np.testing.assert_array_equal(batched.label_map, alone.label_map)
        np.testing.assert_array_equal(batched.instance_map, alone.instance_map)
        assert [(p["index"], p["area"], p["box"]) for p in batched.persons] == [
            (p["index"], p["area"], p["box"]) for p in alone.persons
        ]
    # The maps are not trivial: several classes and at least one person across the images.
    assert max(len(np.unique(result.label_map)) for result in batch) >= 2
    assert any(result.persons for result in batch)


def test_empty_batch(predictor):
    assert predictor.predict_batch([]) == []
