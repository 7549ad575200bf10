"""A real `python -m worker` refuses to start, with a clear message and a non-zero exit, when the
checkpoint does not match its pinned SHA-256 or when no weights are configured at all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import save_tiny_checkpoint

pytestmark = pytest.mark.integration


def test_worker_refuses_to_start_on_pin_mismatch(settings_env, tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_checkpoint(model_dir)
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
        check=False,  # the exit status is what is tested
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
        check=False,  # the exit status is what is tested
    )
    assert proc.returncode == 2 and "M2FP_WEIGHTS" in proc.stderr
