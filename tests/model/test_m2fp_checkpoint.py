"""Checkpoint loading: official file layout quirks, strict key/shape matching, safe unpickling."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from tests.golden_weights import golden_state_dict, read_keys_file
from worker.m2fp.checkpoint import (
    CheckpointError,
    build_model,
    build_model_from_state_dict,
    load_into,
    load_state_dict_bytes,
    load_state_dict_file,
)
from worker.m2fp.config import TINY, get_config
from worker.m2fp.model import M2FP, count_trainable_parameters

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
# SPEC 2.5: model card "63.0M" (CIHP); frozen BN affine terms are buffers. LIP has one class fewer: 257 less.
OFFICIAL_PARAMETER_COUNTS = {"cihp": 63_018_390, "lip": 63_018_390 - 257}

PAYLOAD_RUNS: list[str] = []  # what an unsafe unpickler would have run


def _mark_payload_ran() -> None:
    """Side effect an unsafe unpickler would trigger."""
    PAYLOAD_RUNS.append("ran")


class ArbitraryObject:
    """A custom class instance; unpickling it would call `_mark_payload_ran`."""

    def __reduce__(self):
        return (_mark_payload_ran, ())


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    """Non-trivial deterministic TINY weights (the golden recipe applied to the TINY keys)."""
    return golden_state_dict(TINY)


@pytest.fixture(scope="module")
def tiny_input() -> torch.Tensor:
    """A normalised, padded (1, 3, 64, 96) batch."""
    generator = torch.Generator().manual_seed(7)
    image = torch.randint(0, 256, (1, 3, 60, 90), generator=generator, dtype=torch.uint8)
    return M2FP(TINY).normalize_and_pad(image)[0]


@pytest.fixture(scope="module")
def tiny_reference_logits(tiny_state_dict, tiny_input) -> torch.Tensor:
    """Outputs of a TINY model loaded directly from the in-memory state_dict."""
    model = M2FP(TINY).eval()
    load_into(model, tiny_state_dict)
    with torch.inference_mode():
        return model(tiny_input).pred_logits


def official_layout(state_dict: dict[str, torch.Tensor], num_classes: int) -> dict[str, object]:
    """Wrap like the hub file: {"model": state_dict + criterion.empty_weight}, no num_batches_tracked."""
    empty_weight = torch.ones(num_classes + 1)
    empty_weight[-1] = 0.1
    return {"model": {**state_dict, "criterion.empty_weight": empty_weight}}


def predict_logits(model: M2FP, images: torch.Tensor) -> torch.Tensor:
    """Final class logits."""
    with torch.inference_mode():
        return model(images).pred_logits


def test_official_wrapped_file_loads_and_matches(
    tmp_path, tiny_state_dict, tiny_input, tiny_reference_logits
) -> None:
    path = tmp_path / "pytorch_model.pt"
    torch.save(official_layout(tiny_state_dict, TINY.num_classes), path)
    model, info = build_model(str(path), variant="tiny")
    assert not info.untrained and info.variant == "tiny" and info.source == str(path)
    assert info.ignored_keys == ("criterion.empty_weight",)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(
        predict_logits(model, tiny_input), tiny_reference_logits, rtol=0, atol=0
    )


def test_bare_state_dict_file_loads(
    tmp_path, tiny_state_dict, tiny_input, tiny_reference_logits
) -> None:
    path = tmp_path / "bare.pt"
    torch.save(tiny_state_dict, path)
    assert set(load_state_dict_file(path)) == set(tiny_state_dict)
    model, _ = build_model(path, variant="tiny")
    torch.testing.assert_close(
        predict_logits(model, tiny_input), tiny_reference_logits, rtol=0, atol=0
    )


def test_batchnorm_style_checkpoint_with_num_batches_tracked_loads(
    tmp_path, tiny_state_dict
) -> None:
    with_counters = dict(tiny_state_dict)
    with_counters["backbone.stem.conv1.norm.num_batches_tracked"] = torch.tensor(0)
    _, info = build_model_from_state_dict(with_counters, "tiny")
    assert info.ignored_keys == ("backbone.stem.conv1.norm.num_batches_tracked",)


def test_model_directory_loads(
    tmp_path, tiny_state_dict, tiny_input, tiny_reference_logits
) -> None:
    model_dir = tmp_path / "damo_m2fp"
    model_dir.mkdir()
    torch.save(official_layout(tiny_state_dict, TINY.num_classes), model_dir / "pytorch_model.pt")
    model_section = {
        "type": "m2fp",
        "single_human": False,
        "num_parsing": 20,
        "decoder": {"num_classes": 21},
    }
    (model_dir / "configuration.json").write_text(json.dumps({"model": model_section}))
    model, info = build_model(model_dir, variant="tiny")
    assert info.source == str(model_dir / "pytorch_model.pt")
    torch.testing.assert_close(
        predict_logits(model, tiny_input), tiny_reference_logits, rtol=0, atol=0
    )


def test_model_directory_with_contradicting_configuration_is_refused(
    tmp_path, tiny_state_dict
) -> None:
    model_dir = tmp_path / "lip_dir"
    model_dir.mkdir()
    torch.save(official_layout(tiny_state_dict, TINY.num_classes), model_dir / "pytorch_model.pt")
    (model_dir / "configuration.json").write_text(json.dumps({"model": {"single_human": True}}))
    with pytest.raises(CheckpointError, match="single_human"):
        build_model(model_dir, variant="tiny")


def test_missing_file_and_empty_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        build_model(tmp_path / "nope.pt", variant="tiny")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.pt"):
        load_state_dict_file(tmp_path)


def test_wrong_shape_names_key_and_both_shapes(tiny_state_dict) -> None:
    broken = dict(tiny_state_dict)
    key = "sem_seg_head.predictor.class_embed.weight"
    broken[key] = torch.zeros(
        21, TINY.hidden_dim
    )  # a LIP-sized classifier (20 + 1) in a 21-class model
    with pytest.raises(CheckpointError) as error:
        load_into(M2FP(TINY), broken)
    message = str(error.value)
    assert key in message and "(21, 64)" in message and "(22, 64)" in message


def test_missing_key_is_named(tiny_state_dict) -> None:
    broken = dict(tiny_state_dict)
    del broken["sem_seg_head.pixel_decoder.layer_1.norm.bias"]
    with pytest.raises(
        CheckpointError,
        match=re.escape("missing key 'sem_seg_head.pixel_decoder.layer_1.norm.bias'"),
    ):
        load_into(M2FP(TINY), broken)


def test_unexpected_key_is_named(tiny_state_dict) -> None:
    broken = dict(tiny_state_dict)
    broken["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(
        CheckpointError,
        match=re.escape("unexpected key 'sem_seg_head.predictor.extra_head.weight'"),
    ):
        load_into(M2FP(TINY), broken)


def test_first_problem_is_reported_with_a_count(tiny_state_dict) -> None:
    broken = dict(tiny_state_dict)
    del broken["backbone.stem.conv1.weight"]
    broken["something.else"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"missing key 'backbone.stem.conv1.weight'.*and 1 more problems"
    ):
        load_into(M2FP(TINY), broken)


def test_non_finite_and_non_tensor_values_are_refused(tmp_path, tiny_state_dict) -> None:
    broken = dict(tiny_state_dict)
    broken["backbone.stem.conv1.weight"] = torch.full_like(
        broken["backbone.stem.conv1.weight"], float("nan")
    )
    with pytest.raises(CheckpointError, match="non-finite"):
        load_into(M2FP(TINY), broken)
    path = tmp_path / "odd.pt"
    torch.save({"model": {"backbone.stem.conv1.weight": [1, 2, 3]}}, path)
    with pytest.raises(CheckpointError, match=r"backbone\.stem\.conv1\.weight"):
        load_state_dict_file(path)


def test_weights_only_refuses_arbitrary_objects(tmp_path, tiny_state_dict) -> None:
    path = tmp_path / "pytorch_model.pt"
    torch.save({"model": tiny_state_dict, "payload": ArbitraryObject()}, path)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_state_dict_file(path)
    with pytest.raises(CheckpointError):
        load_state_dict_bytes(path.read_bytes())
    assert PAYLOAD_RUNS == []


def test_load_from_bytes(tiny_state_dict, tiny_input, tiny_reference_logits) -> None:
    buffer = io.BytesIO()
    torch.save(official_layout(tiny_state_dict, TINY.num_classes), buffer)
    state_dict = load_state_dict_bytes(buffer.getvalue())
    model, info = build_model_from_state_dict(state_dict, "tiny")
    assert info.source == "<bytes>" and not info.untrained
    torch.testing.assert_close(
        predict_logits(model, tiny_input), tiny_reference_logits, rtol=0, atol=0
    )
    with pytest.raises(CheckpointError, match="cannot load checkpoint <bytes>"):
        load_state_dict_bytes(b"definitely not a checkpoint")


def test_random_weights_give_a_flagged_untrained_model(caplog, tiny_input) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.m2fp.checkpoint"):
        model, info = build_model("random", variant="tiny")
    assert info.untrained and info.source == "random" and info.to_dict()["untrained"] is True
    assert any(
        record.levelno == logging.WARNING and "UNTRAINED" in record.getMessage()
        for record in caplog.records
    )
    again, _ = build_model("random", variant="tiny")
    torch.testing.assert_close(
        predict_logits(model, tiny_input), predict_logits(again, tiny_input), rtol=0, atol=0
    )


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown M2FP variant"):
        build_model("random", variant="pascal")


@pytest.mark.parametrize("variant", ["cihp", "lip"])
def test_full_state_dict_matches_official_key_list(variant: str) -> None:
    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        model = M2FP(get_config(variant))
    expected = [
        (key, shape)
        for key, shape, _ in read_keys_file(DATA_DIR / f"state_dict_keys_{variant}.txt")
        if not key.endswith(".num_batches_tracked")
    ]
    assert len(expected) == 822
    assert [(key, tuple(tensor.shape)) for key, tensor in model.state_dict().items()] == expected
    assert count_trainable_parameters(model) == OFFICIAL_PARAMETER_COUNTS[variant]
