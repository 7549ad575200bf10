"""The worker reports its deformable-attention path: `model_loaded` log event and heartbeat field `deform_op`.

A real pool-child model load (tiny random network) against a real Redis; the op must be in use
where `make install` built it, and forcing the reference must show in the heartbeat.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from shared.config import load_settings
from shared.constants import worker_key
from shared.jobstore import JobStore
from tests.conftest import wait_for
from worker.m2fp import ops
from worker.process import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def restore_mode():
    before = ops.mode()
    yield
    ops.configure(before)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("auto", "op"),
        ("op", "op"),
        ("reference", "reference: forced by M2FP_DEFORM_ATTN=reference"),
    ],
)
def test_worker_logs_and_heartbeats_its_deform_attn_path(
    mode, expected, settings_env, clean_redis, caplog
) -> None:
    settings = dataclasses.replace(
        load_settings({**settings_env, "M2FP_DEFORM_ATTN": mode}), weights="random", variant="tiny"
    )
    assert settings.deform_attn == mode
    process = WorkerProcess(settings)
    process.store = JobStore.from_settings(settings, client=clean_redis)
    with caplog.at_level(logging.INFO, logger="worker.process"):
        process._load_model()
    try:
        assert process.load_error is None, process.load_error
        loaded = [record for record in caplog.records if record.getMessage() == "model_loaded"]
        assert loaded and loaded[0].fields["deform_op"] == expected
        fields = wait_for(
            lambda: clean_redis.hgetall(worker_key(process.name)), timeout=10, what="the heartbeat"
        )
        assert fields[b"deform_op"].decode() == expected
    finally:
        process.stop()
