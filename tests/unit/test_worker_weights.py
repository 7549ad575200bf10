"""worker.weights: encrypted checkpoints decrypt in memory only; the SHA-256 pin is enforced."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from shared.crypto import generate_key
from tests.conftest import REPO
from worker.m2fp.checkpoint import build_model
from worker.weights import WeightsError, load_predictor, main, read_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model, _ = build_model("random", variant="tiny")
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save({"model": sd}, model_dir / "pytorch_model.pt")
    key = tmp_path / "weights.key"
    key.write_text(generate_key())
    return model_dir, key, model


def test_encrypt_then_load_in_memory(tiny_checkpoint, tmp_path, capsys):
    model_dir, key, model = tiny_checkpoint
    plaintext = (model_dir / "pytorch_model.pt").read_bytes()
    assert (
        main(
            [
                "encrypt",
                "--key-file",
                str(key),
                str(model_dir),
                str(model_dir / "pytorch_model.pt.enc"),
            ]
        )
        == 0
    )
    digest = capsys.readouterr().out.strip()
    assert digest == hashlib.sha256(plaintext).hexdigest()
    sealed = (model_dir / "pytorch_model.pt.enc").read_bytes()
    assert plaintext[:64] not in sealed and b"backbone" not in sealed
    (model_dir / "pytorch_model.pt").unlink()  # only the encrypted file is at rest
    predictor = load_predictor(
        str(model_dir), variant="tiny", device="cpu", max_side=256, sha256=digest, key_file=str(key)
    )
    assert not predictor.untrained
    for name, tensor in predictor.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    result = predictor.predict(np.zeros((40, 30, 3), np.uint8))
    assert result.label_map.shape == (40, 30)


def test_pin_mismatch_refuses(tiny_checkpoint):
    model_dir, _, _ = tiny_checkpoint
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        read_checkpoint(model_dir, sha256="0" * 64)


def test_wrong_key_refuses(tiny_checkpoint, tmp_path):
    model_dir, key, _ = tiny_checkpoint
    main(
        ["encrypt", "--key-file", str(key), str(model_dir), str(model_dir / "pytorch_model.pt.enc")]
    )
    other = tmp_path / "other.key"
    other.write_text(generate_key())
    with pytest.raises(WeightsError, match="cannot be decrypted"):
        read_checkpoint(model_dir, key_file=str(other))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no checkpoint"):
        read_checkpoint(tmp_path)


def test_worker_refuses_to_start_on_pin_mismatch(tiny_checkpoint, settings_env):
    model_dir, _, _ = tiny_checkpoint
    env = {
        **settings_env,
        "M2FP_WEIGHTS": str(model_dir),
        "M2FP_VARIANT": "cihp",
        "M2FP_WEIGHTS_SHA256": "1" * 64,
        "PYTHONPATH": str(REPO),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "worker"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "SHA-256 mismatch" in proc.stderr and "not starting" in proc.stderr


def test_worker_refuses_to_start_without_weights(settings_env, tmp_path):
    env = {**settings_env, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "M2FP_WEIGHTS" in proc.stderr
