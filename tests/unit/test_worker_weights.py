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
    predictor = load_predictor(  # direct convolution: the Winograd layer_1 has no `.weight`
        str(model_dir),
        variant="tiny",
        device="cpu",
        max_side=256,
        sha256=digest,
        key_file=str(key),
        winograd="off",
        precision_mode="fp32",  # bf16x3 (auto on AMX) holds the linears as AMX tiles only
    )
    assert not predictor.untrained
    loaded = predictor.model.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("backbone."):  # the CPU backbone runs fused: compared below
            assert torch.equal(loaded[name], tensor), name
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = model.eval().backbone(images), predictor.model.backbone(images)
    for stage, features in expected.items():
        torch.testing.assert_close(got[stage], features, rtol=1e-4, atol=1e-5)
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
