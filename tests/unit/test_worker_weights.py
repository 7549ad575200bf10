"""worker.weights: encrypted checkpoints decrypt in memory only; the SHA-256 pin is enforced.

That a real `python -m worker` refuses to start on a bad pin or without weights is in
tests/integration/test_worker_startup.py."""

import hashlib

import numpy as np
import pytest
import torch

from shared.crypto import generate_key
from tests.helpers import save_tiny_checkpoint
from worker.weights import WeightsError, load_predictor, main, read_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model_dir = tmp_path / "model"
    model = save_tiny_checkpoint(model_dir)
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
