"""The worker reports its deformable-attention path: `model_loaded` log event and heartbeat field `deform_op`.

A real pool-child model load (tiny random network) against a real Redis; the op must be in use
where `make install` built it, and forcing the reference must show in the heartbeat.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import tiny_worker_loaded
from worker.m2fp import ops

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
    with tiny_worker_loaded(settings_env, clean_redis, caplog, M2FP_DEFORM_ATTN=mode) as (
        loaded,
        fields,
    ):
        assert loaded.fields["deform_op"] == expected
        assert fields[b"deform_op"].decode() == expected
