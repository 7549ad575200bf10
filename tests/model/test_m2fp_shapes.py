"""Fast checks of the M2FP port: tiny-config forward shapes, deformable attention maths, config presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.m2fp.checkpoint import build_untrained_model
from worker.m2fp.config import CIHP, LIP, TINY, M2FPConfig, get_config
from worker.m2fp.deformable_attention import MultiScaleDeformableAttention
from worker.m2fp.model import M2FP, M2FPOutput, normalize_and_pad
from worker.m2fp.position_encoding import PositionEmbeddingSine


@pytest.fixture(scope="module")
def tiny_model() -> M2FP:
    """Untrained TINY model (deterministic)."""
    return build_untrained_model(TINY).eval()


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    """uint8 RGB (3, H, W) images."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        for height, width in sizes
    ]


# --------------------------------------------------------------------------- tiny forward


@pytest.mark.parametrize(
    ("sizes", "padded_size"),
    [
        ([(64, 64)], (64, 64)),
        ([(50, 70)], (64, 96)),
        ([(33, 97)], (64, 128)),
        ([(40, 90), (70, 33)], (96, 96)),  # batch of 2 with different sizes
    ],
)
def test_tiny_forward_shapes_and_finiteness(tiny_model: M2FP, sizes, padded_size) -> None:
    padded, image_sizes = tiny_model.normalize_and_pad(random_images(sizes))
    assert tuple(padded.shape) == (len(sizes), 3, *padded_size)
    assert image_sizes == sizes
    with torch.inference_mode():
        output = tiny_model(padded)
    batch = len(sizes)
    height, width = padded_size
    assert tuple(output.pred_logits.shape) == (batch, TINY.num_queries, TINY.num_classes + 1)
    assert tuple(output.pred_masks.shape) == (batch, TINY.num_queries, height // 4, width // 4)
    assert torch.isfinite(output.pred_logits).all() and torch.isfinite(output.pred_masks).all()
    assert output.aux_pred_logits is None and output.backbone_features is None


def test_tiny_forward_intermediates(tiny_model: M2FP) -> None:
    padded, _ = tiny_model.normalize_and_pad(random_images([(64, 96), (64, 96)]))
    with torch.inference_mode():
        output = tiny_model(padded, return_intermediates=True)
    assert isinstance(output, M2FPOutput)
    expected_backbone = {
        "res2": (64, 16, 24),
        "res3": (128, 8, 12),
        "res4": (256, 4, 6),
        "res5": (512, 2, 3),
    }
    assert {
        name: tuple(t.shape[1:]) for name, t in output.backbone_features.items()
    } == expected_backbone
    assert tuple(output.mask_features.shape) == (2, TINY.mask_dim, 16, 24)
    assert [tuple(t.shape[2:]) for t in output.multi_scale_features] == [(2, 3), (4, 6), (8, 12)]
    assert len(output.aux_pred_logits) == len(output.aux_pred_masks) == TINY.decoder_layers
    for logits, masks in zip(output.aux_pred_logits, output.aux_pred_masks, strict=True):
        assert logits.shape == output.pred_logits.shape and masks.shape == output.pred_masks.shape
    assert output["pred_logits"] is output.pred_logits
    assert {"pred_logits", "aux_pred_masks"} <= set(output.keys())
    with pytest.raises(KeyError):
        output["nonexistent"]


def test_attention_masks_from_resized_features_equal_resized_masks(tiny_model: M2FP) -> None:
    """The decoder's shortcut for intermediate predictions: resize the features, not the masks."""
    decoder = tiny_model.sem_seg_head.predictor
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(TINY.num_queries, 2, TINY.hidden_dim, generator=generator)
    mask_features = torch.randn(2, TINY.mask_dim, 24, 40, generator=generator)
    for size in [(3, 5), (6, 10), (12, 20), (7, 9)]:
        resized = torch.nn.functional.interpolate(
            mask_features, size=size, mode="bilinear", align_corners=False
        )
        with torch.inference_mode():
            classes, masks, expected = decoder.prediction_heads(queries, mask_features, size)
            classes_fast, no_masks, got = decoder.prediction_heads(
                queries, mask_features, size, resized
            )
            small = torch.einsum(
                "bqc,bchw->bqhw",
                decoder.mask_embed(decoder.decoder_norm(queries).transpose(0, 1)),
                resized,
            )
        assert no_masks is None and masks is not None and torch.equal(classes, classes_fast)
        near_zero = (small.abs() < 1e-5).flatten(2)
        assert got.shape == expected.shape
        assert torch.equal(got[~near_zero], expected[~near_zero]), size


def test_without_intermediates_the_outputs_are_the_same(tiny_model: M2FP) -> None:
    padded, _ = tiny_model.normalize_and_pad(random_images([(64, 96)], seed=4))
    with torch.inference_mode():
        fast = tiny_model(padded)
        full = tiny_model(padded, return_intermediates=True)
    torch.testing.assert_close(fast.pred_logits, full.pred_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.pred_masks, full.pred_masks, rtol=0, atol=1e-4)


def test_batch_items_are_independent(tiny_model: M2FP) -> None:
    first, second = random_images([(64, 64), (64, 64)], seed=3)
    with torch.inference_mode():
        together = tiny_model(tiny_model.normalize_and_pad([first, second])[0])
        alone = tiny_model(tiny_model.normalize_and_pad([second])[0])
    torch.testing.assert_close(together.pred_logits[1:], alone.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together.pred_masks[1:], alone.pred_masks, rtol=1e-4, atol=1e-4)


def test_forward_is_device_agnostic() -> None:
    """On the `meta` device any tensor created on a hard-coded device (or a host sync) would fail."""
    with torch.device("meta"):
        model = M2FP(TINY).eval()
    padded, sizes = model.normalize_and_pad(
        torch.zeros(2, 3, 50, 60, dtype=torch.uint8)
    )  # CPU input moved
    assert padded.device.type == "meta" and sizes == [(50, 60), (50, 60)]
    with torch.inference_mode():
        output = model(padded, return_intermediates=True)
    assert output.pred_masks.device.type == "meta" and tuple(output.pred_masks.shape) == (
        2,
        10,
        16,
        16,
    )


@pytest.mark.parametrize(
    "bad_input",
    [
        torch.zeros(1, 3, 50, 64),
        torch.zeros(1, 1, 64, 64),
        torch.zeros(3, 64, 64),
        torch.zeros(1, 3, 64, 64).long(),
    ],
)
def test_forward_rejects_bad_input(tiny_model: M2FP, bad_input: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        tiny_model(bad_input)


def test_normalize_and_pad_values() -> None:
    image = torch.tensor([[[0, 255]], [[128, 10]], [[5, 6]]], dtype=torch.uint8)  # (3, 1, 2)
    padded, sizes = normalize_and_pad(image.unsqueeze(0))
    assert sizes == [(1, 2)] and tuple(padded.shape) == (1, 3, 32, 32)
    mean = torch.tensor(CIHP.pixel_mean).view(3, 1, 1)
    std = torch.tensor(CIHP.pixel_std).view(3, 1, 1)
    torch.testing.assert_close(padded[0, :, :1, :2], (image.float() - mean) / std)
    assert (
        padded[0, :, 1:, :].abs().sum() == 0 and padded[0, :, :, 2:].abs().sum() == 0
    )  # zero padding
    float_padded, _ = normalize_and_pad(image.float())
    torch.testing.assert_close(float_padded, padded, rtol=0, atol=0)
    with pytest.raises(ValueError):
        normalize_and_pad(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError):
        normalize_and_pad([])


def test_untrained_model_is_deterministic_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = build_untrained_model(TINY)
    after = torch.rand(3)
    second = build_untrained_model(TINY)
    torch.testing.assert_close(before, after)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


# --------------------------------------------------------------------------- deformable attention


def bilinear_sample(feature_map: np.ndarray, x: float, y: float) -> np.ndarray:
    """Sample (C, H, W) at pixel coordinates (x, y) (pixel centres at integers), zeros outside."""
    _, height, width = feature_map.shape
    x0, y0 = math.floor(x), math.floor(y)
    result = np.zeros(feature_map.shape[0], dtype=np.float64)
    for corner_y, weight_y in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for corner_x, weight_x in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= corner_x < width and 0 <= corner_y < height:
                result += weight_x * weight_y * feature_map[:, corner_y, corner_x]
    return result


def identity_attention(embed_dim: int, num_heads: int, num_levels: int, num_points: int):
    """Deformable attention with identity value/output projections and zero offset/attention weights."""
    attention = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
    with torch.no_grad():
        for linear in (attention.value_proj, attention.output_proj):
            linear.weight.copy_(torch.eye(embed_dim))
            linear.bias.zero_()
        for linear in (attention.sampling_offsets, attention.attention_weights):
            linear.weight.zero_()
            linear.bias.zero_()
    return attention


def flatten_levels(levels: list[np.ndarray]) -> torch.Tensor:
    """[(C, H_l, W_l)] -> (1, sum H_l*W_l, C)."""
    return torch.from_numpy(
        np.concatenate([level.reshape(level.shape[0], -1).T for level in levels])[None]
    ).float()


def test_deformable_attention_zero_offsets_is_bilinear_sampling_at_reference() -> None:
    generator = np.random.default_rng(0)
    embed_dim, height, width = 16, 5, 7
    feature_map = generator.standard_normal((embed_dim, height, width)).astype(np.float32)
    attention = identity_attention(embed_dim, num_heads=4, num_levels=1, num_points=3)
    # normalised reference points: generic, on a pixel centre, the top-left corner, partly outside
    references = [(0.37, 0.61), (2.5 / 7, 1.5 / 5), (0.0, 0.0), (0.98, 0.03)]
    reference_points = torch.tensor(references, dtype=torch.float32).view(1, len(references), 1, 2)
    query = torch.randn(
        1, len(references), embed_dim
    )  # irrelevant: offset and attention weights are zero
    with torch.no_grad():
        output = attention(
            query, reference_points, flatten_levels([feature_map]), [(height, width)]
        )
    for index, (x, y) in enumerate(references):
        # normalised x in [0, 1] covers pixels [-0.5, W - 0.5]: pixel coordinate = x * W - 0.5
        expected = bilinear_sample(feature_map, x * width - 0.5, y * height - 0.5)
        np.testing.assert_allclose(output[0, index].numpy(), expected, rtol=1e-5, atol=1e-5)
    # a pixel centre reproduces the pixel exactly
    np.testing.assert_allclose(output[0, 1].numpy(), feature_map[:, 1, 2], rtol=1e-5, atol=1e-5)


def test_deformable_attention_head_major_offsets_and_weights() -> None:
    """Head h must use offset/attention entries [h, level, point] and value channels [h*D:(h+1)*D]."""
    generator = np.random.default_rng(1)
    num_heads, num_levels, num_points, head_dim = 4, 2, 3, 2
    embed_dim = num_heads * head_dim
    shapes = [(6, 8), (3, 4)]
    levels = [generator.standard_normal((embed_dim, h, w)).astype(np.float32) for h, w in shapes]
    attention = identity_attention(embed_dim, num_heads, num_levels, num_points)
    offsets = generator.uniform(-1.5, 1.5, (num_heads, num_levels, num_points, 2)).astype(
        np.float32
    )
    chosen = [(0, 2), (1, 0), (1, 2), (0, 1)]  # (level, point) each head attends to
    logits = np.full((num_heads, num_levels, num_points), -30.0, dtype=np.float32)
    for head, (level, point) in enumerate(chosen):
        logits[head, level, point] = 30.0
    with torch.no_grad():
        attention.sampling_offsets.bias.copy_(torch.from_numpy(offsets.reshape(-1)))
        attention.attention_weights.bias.copy_(torch.from_numpy(logits.reshape(-1)))
    reference = (0.41, 0.58)
    reference_points = torch.tensor(reference).view(1, 1, 1, 2).expand(1, 1, num_levels, 2)
    with torch.no_grad():
        output = attention(
            torch.zeros(1, 1, embed_dim), reference_points, flatten_levels(levels), shapes
        )
    for head, (level, point) in enumerate(chosen):
        height, width = shapes[level]
        x = (
            reference[0] * width - 0.5 + offsets[head, level, point, 0]
        )  # offsets are in pixels of the level
        y = reference[1] * height - 0.5 + offsets[head, level, point, 1]
        channels = slice(head * head_dim, (head + 1) * head_dim)
        expected = bilinear_sample(levels[level][channels], x, y)
        np.testing.assert_allclose(output[0, 0, channels].numpy(), expected, rtol=1e-4, atol=1e-4)


def naive_deformable_sampling(value, offsets, weights, reference_points, shapes) -> np.ndarray:
    """Multi-scale deformable attention before the output projection, one loop per query, head,
    level and point: the weighted bilinear samples of each head's channels of each level.

    `value` (batch, sum of H*W, embed_dim); `offsets` (batch, queries, heads, levels, points, 2) in
    pixels of the level; `weights` (batch, queries, heads, levels, points), already softmaxed;
    `reference_points` (batch, queries, levels, 2) in [0, 1].
    """
    batch, num_queries, num_heads, _, num_points, _ = offsets.shape
    head_dim = value.shape[-1] // num_heads
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    expected = np.zeros((batch, num_queries, value.shape[-1]))
    for b in range(batch):
        for q in range(num_queries):
            for m in range(num_heads):
                channels = slice(m * head_dim, (m + 1) * head_dim)
                for level, (height, width) in enumerate(shapes):
                    level_map = value[b, starts[level] : starts[level + 1], channels].T.reshape(
                        head_dim, height, width
                    )
                    reference_x, reference_y = reference_points[b, q, level].tolist()
                    for p in range(num_points):
                        offset_x, offset_y = offsets[b, q, m, level, p].tolist()
                        x = reference_x * width - 0.5 + offset_x  # pixel coordinates of the level
                        y = reference_y * height - 0.5 + offset_y
                        expected[b, q, channels] += float(
                            weights[b, q, m, level, p]
                        ) * bilinear_sample(level_map, x, y)
    return expected


def test_deformable_attention_matches_naive_loop() -> None:
    torch.manual_seed(0)
    num_heads, num_levels, num_points, embed_dim = 2, 2, 3, 8
    shapes = [(4, 5), (2, 3)]
    attention = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0, 0.5)
    batch, num_queries = 2, 3
    query = torch.randn(batch, num_queries, embed_dim)
    value_input = torch.randn(batch, sum(h * w for h, w in shapes), embed_dim)
    reference_points = torch.rand(batch, num_queries, num_levels, 2)
    with torch.no_grad():
        output = attention(query, reference_points, value_input, shapes).numpy()
        value = attention.value_proj(value_input).numpy()
        offsets = attention.sampling_offsets(query).view(
            batch, num_queries, num_heads, num_levels, num_points, 2
        )
        weights = attention.attention_weights(query).view(
            batch, num_queries, num_heads, num_levels * num_points
        )
        weights = weights.softmax(-1).view(batch, num_queries, num_heads, num_levels, num_points)
    expected = naive_deformable_sampling(value, offsets, weights, reference_points, shapes)
    expected = (
        expected @ attention.output_proj.weight.detach().numpy().T
        + attention.output_proj.bias.detach().numpy()
    )
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


def test_deformable_attention_rejects_inconsistent_shapes() -> None:
    attention = MultiScaleDeformableAttention(16, 4, 2, 2)
    with pytest.raises(ValueError):
        attention(
            torch.zeros(1, 3, 16), torch.zeros(1, 3, 2, 2), torch.zeros(1, 10, 16), [(2, 2), (2, 2)]
        )
    with pytest.raises(ValueError):
        MultiScaleDeformableAttention(30, 8)


# --------------------------------------------------------------------------- position embedding


def test_position_embedding_known_values() -> None:
    height, width = 4, 8
    embedding = PositionEmbeddingSine(128)(torch.zeros(2, 5, height, width))
    assert tuple(embedding.shape) == (2, 256, height, width)
    # y comes first; channel 0 = sin(y * 2pi / H) at the lowest frequency 1, channel 1 its cos
    row = 0  # y = 1 / (4 + 1e-6) * 2pi ~ pi / 2
    torch.testing.assert_close(embedding[0, 0, row, 3], torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(embedding[0, 1, row, 3], torch.tensor(0.0), atol=1e-5, rtol=0)
    column = 1  # x = 2 / 8 * 2pi = pi / 2 for x channels 128 (sin), 129 (cos)
    torch.testing.assert_close(embedding[1, 128, 2, column], torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(embedding[1, 129, 2, column], torch.tensor(0.0), atol=1e-5, rtol=0)
    # channels 2k and 2k+1 share frequency 10000 ** (2k / 128)
    y = 3 / (4 + 1e-6) * 2 * math.pi
    frequency = 10000 ** (2 * 5 / 128)
    torch.testing.assert_close(
        embedding[0, 10, 2, 0], torch.tensor(math.sin(y / frequency)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        embedding[0, 11, 2, 0], torch.tensor(math.cos(y / frequency)), atol=1e-5, rtol=0
    )


def grid_embedding(module: PositionEmbeddingSine, batch: int, height: int, width: int):
    """The embedding computed over the whole (B, H, W) grid, as the reference implementation does."""
    ones = torch.ones((batch, height, width), dtype=torch.float32)
    y_embed, x_embed = ones.cumsum(1), ones.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * module.scale
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * module.scale
    index = torch.arange(module.num_pos_feats, dtype=torch.float32)
    frequencies = module.temperature ** (
        2 * torch.div(index, 2, rounding_mode="floor") / module.num_pos_feats
    )
    px, py = x_embed[..., None] / frequencies, y_embed[..., None] / frequencies
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3)


@pytest.mark.parametrize(
    ("batch", "height", "width"), [(1, 20, 27), (2, 40, 54), (1, 80, 108), (1, 1, 3)]
)
def test_position_embedding_per_axis_equals_the_whole_grid(batch, height, width) -> None:
    module = PositionEmbeddingSine(128)
    computed = module.channels_last(torch.zeros(batch, 4, height, width))
    assert computed.is_contiguous()
    assert torch.equal(computed, grid_embedding(module, batch, height, width))


# --------------------------------------------------------------------------- config


def test_presets() -> None:
    assert get_config("cihp") is CIHP and get_config("LIP") is LIP and get_config("tiny") is TINY
    assert (
        CIHP.num_classes == 21 and len(CIHP.class_names) == 21 and CIHP.class_names[20] == "Human"
    )
    assert CIHP.human_class_id == 20 and not CIHP.single_human
    assert LIP.num_classes == 20 and LIP.class_names[10] == "Jumpsuits" and LIP.single_human
    assert LIP.human_class_id is None
    assert CIHP.backbone_depth == 101 and CIHP.backbone_stage_blocks == (3, 4, 23, 3)
    assert (CIHP.decoder_layers, CIHP.num_queries, CIHP.encoder_feedforward_dim) == (9, 100, 1024)
    assert TINY.conv_dim % TINY.norm_groups == 0 and TINY.class_names == CIHP.class_names
    with pytest.raises(ValueError, match="unknown M2FP variant"):
        get_config("ade20k")


@pytest.mark.parametrize(
    "changes",
    [
        {"conv_dim": 100, "hidden_dim": 100},
        {"hidden_dim": 128},
        {"num_classes": 5},
        {"backbone_stage_blocks": (1, 1, 1)},
        {"decoder_layers": 0},
    ],
)
def test_invalid_config_raises(changes: dict) -> None:
    with pytest.raises(ValueError):
        M2FPConfig(**changes)


@pytest.mark.parametrize("batch", [1, 3])
def test_masked_cross_attention_equals_multihead_attention_with_a_mask_per_head(batch: int) -> None:
    """The decoder's cross-attention: one (B, Q, S) mask for all heads, the module's arithmetic."""
    from worker.m2fp.transformer_decoder import masked_cross_attention

    generator = torch.Generator().manual_seed(11)
    attention = torch.nn.MultiheadAttention(64, 8, dropout=0.0).eval()
    with torch.no_grad():
        attention.in_proj_bias.normal_(generator=generator)
        attention.out_proj.bias.normal_(generator=generator)
    query = torch.randn(10, batch, 64, generator=generator)
    key, value = torch.randn(2, 37, batch, 64, generator=generator).unbind(0)
    blocked = torch.rand(batch, 10, 37, generator=generator) < 0.6
    blocked[:, :, 0] = False  # no row fully blocked (the decoder opens those)
    with torch.inference_mode():
        expected = attention(
            query, key, value, attn_mask=blocked.repeat_interleave(8, 0), need_weights=False
        )[0]
        got = masked_cross_attention(attention, query, key, value, blocked)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_sampling_locations_equal_the_broadcast_formula_bit_for_bit() -> None:
    """`MultiScaleDeformableAttention.locations` is `reference + offsets / (W_l, H_l)`, exactly."""
    attention = MultiScaleDeformableAttention(64, 4, 3, 4)
    shapes = [(5, 7), (3, 4), (2, 2)]
    generator = torch.Generator().manual_seed(3)
    reference = torch.rand(2, 11, 3, 2, generator=generator)
    offsets = torch.randn(2, 11, 4, 3, 4, 2, generator=generator) * 3
    normalizer = torch.tensor([[width, height] for height, width in shapes], dtype=torch.float32)
    expected = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None]
    assert torch.equal(attention.locations(reference, offsets, shapes), expected)
