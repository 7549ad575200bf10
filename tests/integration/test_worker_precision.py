"""The worker reports its precision (M2FP_PRECISION): `model_loaded` log, heartbeat, /readyz.

A real pool-child model load (tiny random network) against a real Redis, read back by the
gateway's /readyz; `auto` must say why it chose fp32.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from shared.config import load_settings
from shared.constants import worker_key
from shared.jobstore import JobStore
from tests.conftest import wait_for
from worker.m2fp import cpu
from worker.process import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("mode", "expected"), [("auto", "fp32"), ("int8", "int8")])
def test_worker_logs_heartbeats_and_readyz_show_its_precision(
    mode, expected, settings_env, clean_redis, client, caplog
) -> None:
    settings = dataclasses.replace(
        load_settings({**settings_env, "M2FP_PRECISION": mode}), weights="random", variant="tiny"
    )
    process = WorkerProcess(settings)
    process.store = JobStore.from_settings(settings, client=clean_redis)
    with caplog.at_level(logging.INFO, logger="worker.process"):
        process._load_model()
    try:
        assert process.load_error is None, process.load_error
        loaded = [record for record in caplog.records if record.getMessage() == "model_loaded"]
        assert loaded and loaded[0].fields["precision"] == expected
        assert mode in loaded[0].fields["precision_reason"]  # "auto: ..." or "forced by ...=int8"
        assert loaded[0].fields["cpu_flags"] == cpu.describe_features(cpu.cpu_features())
        fields = wait_for(
            lambda: clean_redis.hgetall(worker_key(process.name)), timeout=10, what="the heartbeat"
        )
        assert fields[b"precision"].decode() == expected
        assert client.get("/readyz").get_json()["precisions"] == {expected: 1}
    finally:
        process.stop()
