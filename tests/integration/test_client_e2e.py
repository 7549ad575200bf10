"""m2fp_client and the `m2fp` command line against the live stack (real gateway, Redis, worker).

The stack runs M2FP with random weights: results have the right shape and say `untrained`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from m2fp_client import Client, InvalidImage, NotFound, ParsingResult, ResultGone
from tests.conftest import REPO
from tests.integration.conftest import photo_jpeg

pytestmark = pytest.mark.integration

WIDTH, HEIGHT = 320, 240


@pytest.fixture
def client(live_stack):
    with Client(live_stack.base_url, timeout=30) as client:
        yield client


def test_parse_returns_maps_of_the_image_size(client, tmp_path):
    path = tmp_path / "people.jpg"
    path.write_bytes(photo_jpeg(WIDTH, HEIGHT, seed=1))
    result = client.parse(path, poll_interval=0.25, timeout=240)
    assert isinstance(result, ParsingResult)
    assert (result.width, result.height) == (WIDTH, HEIGHT)
    assert result.label_map.shape == result.instance_map.shape == (HEIGHT, WIDTH)
    assert result.label_map.dtype == np.uint8 and int(result.label_map.max()) <= 19
    assert sorted(np.unique(result.label_map).tolist()) == sorted(result.classes_present)
    assert result.classes[0] == "Background" and len(result.classes) == 20
    assert int(result.instance_map.max()) <= len(result.persons)
    for person in result.persons:
        x0, y0, x1, y1 = person.box
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT
        assert person.area == int(result.person_mask(person.index).sum())
    assert result.untrained is True and result.warnings  # random weights, and it says so


def test_second_result_fetch_raises_result_gone(client):
    job = client.submit(photo_jpeg(WIDTH, HEIGHT, seed=2), filename="photo.jpg")
    assert client.wait(job, poll_interval=0.25, timeout=240).status == "done"
    first = client.result(job)
    assert first.label_map.shape == (HEIGHT, WIDTH)
    with pytest.raises(ResultGone) as info:
        client.result(job)
    assert info.value.status == 410 and info.value.code == "result_gone"


def test_palette_format_is_a_png_of_class_ids_and_is_also_fetched_once(client):
    job = client.submit(photo_jpeg(WIDTH, HEIGHT, seed=3), filename="photo.jpg")
    client.wait(job, poll_interval=0.25, timeout=240)
    png = client.result(job, format="palette")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "P" and image.size == (WIDTH, HEIGHT)
        assert int(np.asarray(image).max()) <= 19
    with pytest.raises(ResultGone):
        client.result(job)


def test_delete_withdraws_the_job(client):
    job = client.submit(photo_jpeg(WIDTH, HEIGHT, seed=4), filename="photo.jpg")
    client.delete(job)
    with pytest.raises(NotFound):
        client.status(job)


def test_refused_upload_raises_invalid_image_with_the_code(client):
    with pytest.raises(InvalidImage) as info:
        client.submit(b"GIF89a not what the name says", filename="photo.png")
    assert info.value.code in ("type_mismatch", "unsupported_type") and info.value.status == 415


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "client"), str(REPO)]))
    env.pop("M2FP_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "m2fp_client", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,  # callers assert on the exit status and the output
    )


def photo_folder(folder) -> None:
    """Two photos (one portrait), one truncated JPEG and a text file (which the CLI skips)."""
    folder.mkdir()
    (folder / "alice.jpg").write_bytes(photo_jpeg(WIDTH, HEIGHT, seed=5))
    (folder / "bob.jpeg").write_bytes(photo_jpeg(HEIGHT, WIDTH, seed=6))
    whole = photo_jpeg(WIDTH, HEIGHT, seed=7)
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 2])  # valid header, truncated data
    (folder / "notes.txt").write_text("not a photo")  # ignored: directories yield only images


def assert_bob_files_agree(out) -> None:
    """bob's label and instance PNGs are greyscale at his (portrait) size, and his JSON summary
    names his file, his size and exactly the classes of his label map."""
    with (
        Image.open(out / "bob.labels.png") as labels,
        Image.open(out / "bob.instances.png") as instances,
    ):
        assert labels.mode == instances.mode == "L"
        assert labels.size == instances.size == (HEIGHT, WIDTH)
        present = sorted(np.unique(np.asarray(labels)).tolist())
    summary = json.loads((out / "bob.json").read_text())
    assert summary["source"] == "bob.jpeg" and (summary["width"], summary["height"]) == (
        HEIGHT,
        WIDTH,
    )
    assert sorted(int(c) for c in summary["classes_present"]) == present
    assert summary["untrained"] is True and isinstance(summary["persons"], list)


def test_cli_parses_a_folder_and_reports_the_corrupt_file(live_stack, tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photo_folder(photos)

    done = run_cli(
        "parse",
        str(photos),
        "--server",
        live_stack.base_url,
        "-o",
        str(out),
        "--poll-interval",
        "0.25",
    )

    assert done.returncode == 1, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "alice.instances.png",
        "alice.json",
        "alice.labels.png",
        "bob.instances.png",
        "bob.json",
        "bob.labels.png",
    ]
    failures = [line for line in done.stderr.splitlines() if "FAILED" in line]
    assert (
        len(failures) == 1 and "broken.jpg" in failures[0] and "undecodable_image" in failures[0]
    ), done.stderr
    assert "[3/3]" in done.stderr and "2 of 3 parsed, 1 failed" in done.stderr
    assert "UNTRAINED" in done.stderr
    assert_bob_files_agree(out)


def test_cli_health_reports_ready_and_untrained(live_stack):
    done = run_cli("health", "--server", live_stack.base_url, timeout=60)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["status"] == "ready" and body["workers"] >= 1 and body["untrained"] is True
    assert "WARNING" in done.stderr
