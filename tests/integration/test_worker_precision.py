"""The worker reports its precision (M2FP_PRECISION): `model_loaded` log, heartbeat, /readyz.

A real pool-child model load (tiny random network) against a real Redis, read back by the
gateway's /readyz; `auto` must say why it chose what it chose.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import tiny_worker_loaded
from worker.m2fp import cpu, precision

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["auto", "int8"])
def test_worker_logs_heartbeats_and_readyz_show_its_precision(
    mode, settings_env, clean_redis, client, caplog
) -> None:
    # auto: bf16x3 on a CPU with AMX-BF16 (where the op runs), fp32 elsewhere
    expected = precision.choose_precision(mode).precision
    with tiny_worker_loaded(settings_env, clean_redis, caplog, M2FP_PRECISION=mode) as (
        loaded,
        fields,
    ):
        assert loaded.fields["precision"] == expected
        assert loaded.fields["amx"].startswith("bf16x3 for" if expected == "bf16x3" else "off:")
        assert mode in loaded.fields["precision_reason"]  # "auto: ..." or "forced by ...=int8"
        assert loaded.fields["cpu_flags"] == cpu.describe_features(cpu.cpu_features())
        assert fields[b"precision"].decode() == expected
        assert client.get("/readyz").get_json()["precisions"] == {expected: 1}
