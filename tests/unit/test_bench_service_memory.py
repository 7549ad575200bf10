"""The figures of bench/service_ratio.py and bench/worker_memory.py from made-up samples (no stack)."""

from __future__ import annotations

import pytest

from bench.service_ratio import service_timeline, summarise, synthetic_jpeg
from bench.worker_memory import rss_growth, uploads


def test_ratio_and_overhead_per_job() -> None:
    phases = [
        {"phase": "raw", "images_per_s": 0.30},
        {"phase": "service", "images_per_s": 0.28, "images_per_s_service_view": 0.29},
        {"phase": "raw", "images_per_s": 0.32},
        {"phase": "service", "images_per_s": 0.26, "images_per_s_service_view": 0.285},
        {"phase": "raw", "images_per_s": 0.28},
    ]
    summary = summarise(phases, processes=2)
    assert summary["ratio"] == pytest.approx(0.27 / 0.30, abs=1e-3)
    assert summary["target_met"] is False
    assert summary["ratio_service_view"] == pytest.approx(0.2875 / 0.30, abs=1e-3)
    assert summary["target_met_service_view"] is True
    # each service phase against the raw phases on either side of it
    assert summary["ratio_service_view_each"] == pytest.approx(
        [0.29 / 0.31, 0.285 / 0.30], abs=1e-3
    )
    # 2 slots: 2 / 0.27 s per service job vs 2 / 0.30 s per raw image.
    assert summary["overhead_per_job_s"] == pytest.approx(2 / 0.27 - 2 / 0.30, abs=1e-3)


def test_rss_growth_from_first_to_last_sample() -> None:
    samples = [
        {"children": {"7": {"VmRSS": 1000.0, "VmHWM": 1200.0}}},
        {"children": {"7": {"VmRSS": 1080.0, "VmHWM": 1250.0}}},
        {"children": {"7": {"VmRSS": 1040.0, "VmHWM": 1250.0}}},
    ]
    figures = rss_growth(samples)
    assert figures["growth_percent"] == pytest.approx(4.0)
    assert figures["rss_max_mib"] == 1080.0
    assert figures["same_pool_children_throughout"] is True
    recycled = rss_growth([samples[0], {"children": {"8": {"VmRSS": 900.0, "VmHWM": 900.0}}}])
    assert recycled["same_pool_children_throughout"] is False
    assert recycled["growth_percent"] is None


def test_uploads_cycle_through_sizes() -> None:
    jpegs = uploads(((16, 24), (24, 16)), 3)
    assert jpegs[0] == jpegs[2] != jpegs[1]
    assert synthetic_jpeg(16, 24)[:2] == b"\xff\xd8"


def test_service_timeline_from_the_stacks_event_log(tmp_path) -> None:
    """First job_started to last job_done of the phase's jobs; other jobs and lines are skipped."""
    log = tmp_path / "stack.log"
    lines = [
        "stack: worker-1 started (pid 7)",
        '{"ts": 5.0, "event": "job_started", "job_id": "warm"}',
        '{"ts": 10.0, "event": "job_started", "job_id": "a"}',
        '{"ts": 10.5, "event": "job_started", "job_id": "b"}',
        '{"ts": 12.0, "event": "job_done", "job_id": "a"}',
        '{"event": "job_done", "job_id": "b"}',
        '{"ts": 13.5, "event": "job_done", "job_id": "b"}',
        '{"ts": 20.0, "event": "job_done", "job_id": "warm"}',
    ]
    log.write_text("\n".join(lines) + "\n")
    assert service_timeline(log, {"a", "b"}) == (10.0, 13.5)
    with pytest.raises(SystemExit, match="1 of 2 jobs done"):
        service_timeline(log, {"a", "missing"})
