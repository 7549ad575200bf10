"""The Predictor and the offline CLI on tiny random-weight networks (fast, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worker.m2fp.checkpoint import build_untrained_model
from worker.m2fp.config import LIP_CLASS_NAMES, TINY
from worker.m2fp.persons import mask_box
from worker.m2fp.predictor import Predictor, downsize_to_max_side, upscale_nearest

REPO = Path(__file__).resolve().parents[2]
MAX_SIDE = 64
# Smaller network inputs than the real 640-pixel / 384x512 preprocessing keep these tests fast.
TINY_FAST = TINY.replace(min_size_test=160, max_size_test=320)
TINY_SINGLE_HUMAN = TINY.replace(
    name="tiny-lip",
    single_human=True,
    num_classes=20,
    class_names=LIP_CLASS_NAMES,
    single_human_input_size=(96, 128),
)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random (height, width, 3) uint8 RGB image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_predictor() -> Predictor:
    """The public constructor's path: `weights="random"`, preset "tiny" (real 640-pixel preprocessing)."""
    return Predictor.from_weights("random", variant="tiny", max_side=MAX_SIDE)


@pytest.fixture(scope="module")
def fast_predictor() -> Predictor:
    return Predictor(build_untrained_model(TINY_FAST).eval(), untrained=True, max_side=MAX_SIDE)


@pytest.fixture(scope="module")
def crowded_predictor() -> Predictor:
    """A tiny multi-human model biased so that every query predicts Human: persons are guaranteed."""
    model = build_untrained_model(TINY_FAST).eval()
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.bias[TINY.num_parsing] += 20.0
    return Predictor(model, untrained=True, max_side=MAX_SIDE)


@pytest.fixture(scope="module")
def single_human_predictor() -> Predictor:
    return Predictor(
        build_untrained_model(TINY_SINGLE_HUMAN).eval(), untrained=True, max_side=MAX_SIDE
    )


def check_result(result, height: int, width: int) -> None:
    """Shapes, dtypes and internal consistency of a ParsingResult at (height, width)."""
    assert result.label_map.shape == (height, width) and result.label_map.dtype == np.uint8
    assert result.instance_map.shape == (height, width) and result.instance_map.dtype == np.uint8
    assert int(result.label_map.max()) <= 19
    assert int(result.instance_map.max()) <= len(result.persons)
    assert not result.instance_map[result.label_map == 0].any()
    for person in result.persons:
        pixels = result.instance_map == person["index"]
        assert person["area"] == int(pixels.sum())
        if person["area"]:
            assert person["box"] == mask_box(pixels)
        x0, y0, x1, y1 = person["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    for part in result.parts:
        x0, y0, x1, y1 = part["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert 0 <= part["person"] <= len(result.persons)
    assert set(result.timings) == {"preprocess", "forward", "postprocess"}
    json.dumps({"persons": result.persons, "parts": result.parts, "timings": result.timings})


@pytest.mark.parametrize("size", [(37, 53), (64, 48), (150, 97), (5, 300)])
def test_outputs_are_at_input_size(fast_predictor, size):
    result = fast_predictor.predict(random_image(*size))
    check_result(result, *size)


def test_attributes_and_output_of_the_public_constructor(tiny_predictor):
    result = tiny_predictor.predict(random_image(71, 33))
    check_result(result, 71, 33)
    assert tiny_predictor.untrained is True
    assert tiny_predictor.variant == "tiny" and tiny_predictor.device == "cpu"
    assert len(tiny_predictor.class_names) == 20 and tiny_predictor.class_names[13] == "Face"


def test_persons_survive_downsizing(crowded_predictor):
    height, width = 131, 90  # longer side 131 > 64: parsed at 64x44, mapped back
    result = crowded_predictor.predict(random_image(height, width, seed=3))
    check_result(result, height, width)
    assert result.persons, "the Human-biased model should find persons"
    scores = [person["score"] for person in result.persons]
    assert scores == sorted(scores, reverse=True)


def test_working_size_results_match_input_size_results(crowded_predictor):
    image = random_image(48, 60, seed=4)  # below max_side: no resizing
    inference = crowded_predictor.infer(image)
    result = crowded_predictor.predict(image)
    np.testing.assert_array_equal(result.label_map, inference.parsing.label_map)
    np.testing.assert_array_equal(result.instance_map, inference.parsing.instance_map)
    assert result.persons == inference.parsing.persons


def test_single_human_variant(single_human_predictor):
    image = random_image(90, 41, seed=5)
    result = single_human_predictor.predict(image)
    check_result(result, 90, 41)
    foreground = result.label_map != 0
    np.testing.assert_array_equal(result.instance_map, foreground.astype(np.uint8))
    assert len(result.persons) == (1 if foreground.any() else 0)


def test_single_human_batch_equals_single_images(single_human_predictor):
    images = [random_image(30, 20, seed=6), random_image(50, 70, seed=7)]
    batch = single_human_predictor.predict_batch(images)
    for image, batched in zip(images, batch, strict=True):
        alone = single_human_predictor.predict(image)
        np.testing.assert_array_equal(batched.label_map, alone.label_map)
        assert [person["area"] for person in batched.persons] == [
            person["area"] for person in alone.persons
        ]
        # Batched matmuls round differently: scores agree to float precision.
        for batched_person, alone_person in zip(batched.persons, alone.persons, strict=True):
            assert batched_person["score"] == pytest.approx(alone_person["score"], abs=1e-5)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "uint8"),
        (np.zeros((8, 8), dtype=np.uint8), r"\(H, W, 3\)"),
        (np.zeros((8, 8, 4), dtype=np.uint8), r"\(8, 8, 4\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "at least"),
    ],
)
def test_invalid_images_are_rejected(tiny_predictor, image, message):
    with pytest.raises(ValueError, match=message):
        tiny_predictor.predict(image)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="max_side"):
        Predictor.from_weights("random", variant="tiny", max_side=8)
    with pytest.raises(ValueError, match="variant"):
        Predictor.from_weights("random", variant="nope")


def test_resize_helpers():
    image = random_image(100, 50)
    assert downsize_to_max_side(image, 100) is image
    assert downsize_to_max_side(image, 40).shape == (40, 20, 3)
    small = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(
        upscale_nearest(small, 4, 6), np.repeat(np.repeat(small, 2, 0), 2, 1)
    )


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """Run `python -m worker.m2fp` from the repository root."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "worker.m2fp", *arguments],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,  # callers assert on the exit status and the output
    )


def test_cli_writes_three_files_per_image_and_reports_broken_ones(tmp_path):
    Image.fromarray(random_image(70, 45, seed=1)).save(tmp_path / "first.png")
    Image.fromarray(random_image(33, 81, seed=2)).save(tmp_path / "second.jpg", quality=90)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    out = tmp_path / "out"
    completed = run_cli(
        "--weights",
        "random",
        "--variant",
        "tiny",
        "--max-side",
        "64",
        str(tmp_path / "first.png"),
        str(tmp_path / "broken.jpg"),
        str(tmp_path / "second.jpg"),
        "--out",
        str(out),
    )
    assert completed.returncode == 1, completed.stderr
    assert "UNTRAINED" in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "broken.jpg" in error_lines[0]
    assert "[3/3]" in completed.stderr
    for name, (height, width) in {"first": (70, 45), "second": (33, 81)}.items():
        for suffix in ("labels", "instances"):
            with Image.open(out / f"{name}.{suffix}.png") as png:
                assert png.mode == "L" and png.size == (width, height)
        document = json.loads((out / f"{name}.json").read_text())
        assert (document["width"], document["height"]) == (width, height)
        assert document["untrained"] is True
        assert {"persons", "parts", "classes_present", "timings", "classes"} <= set(document)
    assert not list(out.glob("broken*"))


def test_cli_help_and_bad_variant():
    completed = run_cli("--help")
    assert (
        completed.returncode == 0
        and "--weights" in completed.stdout
        and "tiny" not in completed.stdout
    )
    completed = run_cli("--weights", "random", "--variant", "huge", "x.png", "--out", "o")
    assert completed.returncode == 2 and "invalid choice" in completed.stderr
