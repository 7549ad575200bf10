"""m2fp_client.cli: inputs taken from directories, unique output names, arguments and API keys,
the progress line, and `run_parse` against a stub client (outputs written, failures counted, an
error every file would hit stops the batch)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2fp_client import (
    InvalidImage,
    ParsingResult,
    Unauthorized,
    cli,
)
from m2fp_client.errors import M2FPError
from tests.unit.client_doubles import result_document


def test_expand_inputs_takes_images_from_directories(tmp_path):
    for name in ("b.JPG", "a.png", "c.jpeg", "notes.txt", ".hidden.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jpg").write_bytes(b"x")
    explicit = tmp_path / "notes.txt"
    files, missing = cli.expand_inputs(
        [tmp_path, explicit, tmp_path / "a.png", tmp_path / "nope.jpg"]
    )
    assert [f.name for f in files] == ["a.png", "b.JPG", "c.jpeg", "notes.txt"]
    assert missing == [tmp_path / "nope.jpg"]
    files, _ = cli.expand_inputs([tmp_path], recursive=True)
    assert [f.name for f in files] == ["a.png", "b.JPG", "c.jpeg", "d.jpg"]


def test_output_stems_are_unique():
    assert cli.output_stems(
        [Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg"), Path("c/x.jpeg")]
    ) == ["x", "x-2", "y", "x-3"]


def test_parser_requires_inputs_and_a_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["parse"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])
    args = cli.build_parser().parse_args(
        ["parse", "a.jpg", "dir", "--server", "http://h:1", "-o", "out", "--palette"]
    )
    assert (args.inputs, args.server, args.output, args.palette) == (
        ["a.jpg", "dir"],
        "http://h:1",
        "out",
        True,
    )


def test_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("  file-key-0123456789\n")
    monkeypatch.setenv("M2FP_API_KEY", "env-key")
    assert cli.read_api_key(str(key_file)) == "file-key-0123456789"
    assert cli.read_api_key(None) == "env-key"
    key_file.write_text("\n")
    with pytest.raises(ValueError):
        cli.read_api_key(str(key_file))


def test_main_rejects_a_missing_key_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["parse", str(tmp_path), "--api-key-file", str(tmp_path / "absent")])
    assert info.value.code == 2


def test_progress_shows_count_file_and_eta():
    now = [100.0]
    stream = io.StringIO()
    progress = cli.Progress(4, stream, clock=lambda: now[0])
    assert "ETA --:--" in progress.line(1, "a.jpg")
    now[0] += 10
    progress.finish_one()
    assert progress.eta() == pytest.approx(30)
    progress.show(2, "b.jpg")
    assert stream.getvalue() == "[2/4] b.jpg  elapsed 0:10  ETA 0:30\n"
    assert cli.format_seconds(3725) == "1:02:05"


class StubClient:
    """A null Client for CLI tests: returns a fixed parsing, or raises the scripted error per file name."""

    server_url = "http://stub"

    def __init__(self, errors: dict[str, M2FPError] | None = None) -> None:
        self.errors = errors or {}
        self.calls: list[str] = []

    def parse(self, path, poll_interval=0.5, timeout=300):
        self.calls.append(Path(path).name)
        if Path(path).name in self.errors:
            raise self.errors[Path(path).name]
        return ParsingResult.from_json(result_document())


def parse_args(*argv: str):
    return cli.build_parser().parse_args(["parse", *argv])


def test_run_parse_writes_outputs_and_reports_failures(tmp_path):
    photos, out = tmp_path / "in", tmp_path / "out"
    photos.mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        (photos / name).write_bytes(b"x")
    stub = StubClient({"b.png": InvalidImage("undecodable_image", "The image is corrupt.", 422)})
    stderr = io.StringIO()
    status = cli.run_parse(parse_args(str(photos), "-o", str(out)), stub, stderr)
    assert status == 1 and stub.calls == ["a.jpg", "b.png", "c.jpg"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.instances.png",
        "a.json",
        "a.labels.png",
        "c.instances.png",
        "c.json",
        "c.labels.png",
    ]
    log = stderr.getvalue()
    assert "FAILED b.png: undecodable_image: The image is corrupt." in log
    assert "2 of 3 parsed, 1 failed" in log and "WARNING: UNTRAINED MODEL" in log
    labels = np.array(Image.open(out / "a.labels.png"))
    assert labels.shape == (4, 6) and labels[1, 1] == 13
    summary = json.loads((out / "a.json").read_text())
    assert summary["source"] == "a.jpg" and summary["classes_present"] == {
        "0": "Background",
        "2": "Hair",
        "13": "Face",
    }


def test_run_parse_palette_keeps_class_ids(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert (
        cli.run_parse(
            parse_args(str(tmp_path / "a.jpg"), "-o", str(tmp_path), "--palette"),
            StubClient(),
            io.StringIO(),
        )
        == 0
    )
    with Image.open(tmp_path / "a.labels.png") as image:
        assert image.mode == "P" and np.array(image)[1, 1] == 13


def test_run_parse_stops_on_errors_every_file_would_hit(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    stub = StubClient({"a.jpg": Unauthorized("unauthorized", "A valid API key is required.", 401)})
    stderr = io.StringIO()
    assert cli.run_parse(parse_args(str(tmp_path), "-o", str(tmp_path / "o")), stub, stderr) == 1
    assert stub.calls == ["a.jpg"]
    assert (
        "2 remaining file(s) not sent" in stderr.getvalue()
        and "0 of 3 parsed, 3 failed" in stderr.getvalue()
    )


def test_run_parse_counts_missing_paths_and_empty_inputs(tmp_path):
    stderr = io.StringIO()
    assert cli.run_parse(parse_args(str(tmp_path / "nope.jpg")), StubClient(), stderr) == 1
    assert "FAILED" in stderr.getvalue() and "not_found" in stderr.getvalue()
    (tmp_path / "empty").mkdir()
    assert cli.run_parse(parse_args(str(tmp_path / "empty")), StubClient(), io.StringIO()) == 2
