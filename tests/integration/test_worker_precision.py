"""The worker reports its precision (M2FP_PRECISION): `model_loaded` log, heartbeat, /readyz.

A real pool-child model load (tiny random network) against a real Redis, read back by the
gateway's /readyz; `auto` must say why it chose fp32.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import tiny_worker_loaded
from worker.m2fp import cpu

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("mode", "expected"), [("auto", "fp32"), ("int8", "int8")])
def test_worker_logs_heartbeats_and_readyz_show_its_precision(
    mode, expected, settings_env, clean_redis, client, caplog
) -> None:
    with tiny_worker_loaded(settings_env, clean_redis, caplog, M2FP_PRECISION=mode) as (
        loaded,
        fields,
    ):
        assert loaded.fields["precision"] == expected
        assert mode in loaded.fields["precision_reason"]  # "auto: ..." or "forced by ...=int8"
        assert loaded.fields["cpu_flags"] == cpu.describe_features(cpu.cpu_features())
        assert fields[b"precision"].decode() == expected
        assert client.get("/readyz").get_json()["precisions"] == {expected: 1}
