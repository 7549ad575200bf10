"""Worker resources: decode cost refused from the header, JPEG draft() to the inference size (maps
still at upload size), the pool child's memory limit, core dumps off, and a Redis error mid-job
requeued (not acked) so the job ends in a clear state."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import redis
from celery.exceptions import Reject
from PIL import Image

from shared.crypto import new_data_key, open_result, result_public_key
from shared.errors import JOB_ERRORS, DecodeTooLarge
from tests.conftest import REPO
from worker.imaging import decode_cost, decode_upload

MP40 = 40_000_000
BUDGET = 128 * 1024 * 1024


def png_header_only(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A valid PNG of a blank image, compressed with zlib (an 'image bomb': tiny file, huge decode)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(width * channels * bit_depth // 8)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    ihdr = (
        width.to_bytes(4, "big")
        + height.to_bytes(4, "big")
        + bytes([bit_depth, colour_type, 0, 0, 0])
    )
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    image = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8))
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, format="JPEG", quality=85, exif=exif.tobytes())
    return out.getvalue()


def run_python(code: str, *arguments: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter at the repository root (process-wide state stays there)."""
    return subprocess.run(
        [sys.executable, "-c", code, *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_a_small_rgba_png_that_decodes_to_160_mb_is_refused_from_its_header():
    data = png_header_only(10000, 4000, 8, 6)
    assert len(data) < 400_000
    # In a fresh process, so the peak RSS is this decode's alone.
    code = textwrap.dedent(f"""
        import resource, sys
        from worker.imaging import decode_upload
        from shared.errors import DecodeTooLarge
        data = open(sys.argv[1], "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_upload(data, max_pixels={MP40}, max_decode_bytes={BUDGET})
        except DecodeTooLarge:
            print("refused", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    path = REPO / ".pytest_cache" / "bomb.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    try:
        out = run_python(code, str(path)).stdout.split()
    finally:
        path.unlink()
    assert out[0] == "refused"
    assert int(out[1]) < 30 * 1024  # KiB: nothing near the 160 MB of pixels was allocated


@pytest.mark.parametrize(
    ("bit_depth", "colour_type", "per_pixel"),
    [(8, 0, 1), (16, 0, 2), (8, 2, 3), (16, 2, 6), (8, 4, 2), (8, 6, 4), (16, 6, 8)],
)
def test_decode_cost_is_channels_times_bit_depth_times_pixels(bit_depth, colour_type, per_pixel):
    data = png_header_only(64, 32, bit_depth, colour_type)
    with Image.open(io.BytesIO(data)) as image:
        assert decode_cost(image, data) == 64 * 32 * per_pixel


def test_the_budget_is_a_limit_not_a_guess():
    data = png_header_only(1000, 1000, 8, 6)  # 4 MB decoded
    with pytest.raises(DecodeTooLarge):
        decode_upload(data, max_pixels=MP40, max_decode_bytes=4_000_000 - 1)
    assert decode_upload(data, max_pixels=MP40, max_decode_bytes=4_000_000).rgb.shape == (
        1000,
        1000,
        3,
    )
    assert DecodeTooLarge.code in JOB_ERRORS


def test_large_jpeg_decodes_with_draft_down_to_but_not_below_the_inference_size():
    decoded = decode_upload(jpeg(4000, 3000), max_pixels=MP40, target_side=1920)
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.rgb.shape == (1500, 2000, 3)  # 1/2: 1/4 would be under 1920
    small = decode_upload(jpeg(4000, 3000), max_pixels=MP40, target_side=500)
    assert small.rgb.shape == (375, 500, 3)  # 1/8: exactly the inference size
    assert decode_upload(jpeg(800, 600), max_pixels=MP40, target_side=1920).rgb.shape == (
        600,
        800,
        3,
    )


def test_draft_keeps_the_upright_upload_size_of_a_rotated_jpeg():
    decoded = decode_upload(jpeg(4000, 3000, orientation=6), max_pixels=MP40, target_side=1920)
    assert (decoded.width, decoded.height) == (3000, 4000)
    assert decoded.rgb.shape == (2000, 1500, 3)


def test_drafted_jpeg_cost_is_counted_at_the_drafted_size():
    data = jpeg(4000, 3000)  # 36 MB full, 2.25 MB at 1/8
    with pytest.raises(DecodeTooLarge):
        decode_upload(data, max_pixels=MP40, max_decode_bytes=10_000_000)
    assert (
        decode_upload(
            data, max_pixels=MP40, max_decode_bytes=10_000_000, target_side=500
        ).rgb.shape[1]
        == 500
    )


def test_maps_come_back_at_upload_size_when_the_jpeg_was_drafted():
    from worker.m2fp.predictor import Predictor
    from worker.pipeline import JobContext, _parse_and_seal

    predictor = Predictor.from_weights("random", max_side=128)
    ctx = JobContext(
        store=None,
        keyring=None,
        predictor=lambda: predictor,
        worker_name="t",
        max_pixels=MP40,
        max_decode_bytes=BUDGET,
        infer_max_side=128,
    )
    key, job_id, token = new_data_key(), "job-draft-0000000001", "the-bearer-token"
    public = result_public_key(token, job_id)
    sealed, _ = _parse_and_seal(ctx, job_id, jpeg(1024, 768), key, public)
    document = json.loads(open_result(token, key, job_id, sealed))
    assert (document["width"], document["height"]) == (1024, 768)
    for name in ("label_map_png", "instance_map_png"):
        with Image.open(io.BytesIO(base64.b64decode(document[name]))) as image:
            assert image.size == (1024, 768)
    for person in document["persons"]:
        assert person["box"][2] <= 1024 and person["box"][3] <= 768


def test_child_memory_limit_turns_an_outlier_into_a_memory_error_not_an_oom_kill():
    code = textwrap.dedent("""
        import numpy as np
        from shared.hardening import limit_memory
        limit_memory(1024)
        try:
            np.ones(2 << 30, dtype=np.uint8)
        except MemoryError:
            print("memory_error")
        small = np.ones(64 << 20, dtype=np.uint8)   # the process goes on
        print("alive", small.sum() == 64 << 20)
    """)
    out = run_python(code).stdout.split()
    assert out == ["memory_error", "alive", "True"]


def test_out_of_memory_is_its_own_job_code():
    from worker.pipeline import is_out_of_memory

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 67108864 bytes"
        )
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert "out_of_memory" in JOB_ERRORS


def test_a_child_out_of_memory_retires_through_billiards_check_between_jobs(settings):
    # In a fresh interpreter: the hook patches billiard's module, which must not leak into others.
    code = textwrap.dedent("""
        from billiard import pool
        from worker import retirement
        retirement.request("out_of_memory")          # no hook yet (tests, CLI): nothing happens
        print(retirement.requested() == "", pool.mem_rss() < 1 << 30)
        print(retirement.install(), retirement.install(), pool.mem_rss() < 1 << 30)
        retirement.request("out_of_memory")
        retirement.request("something else")          # the first reason stays
        print(retirement.requested(), pool.mem_rss() == retirement.ABOVE_EVERY_LIMIT_KB)
    """)
    out = run_python(code)
    assert out.stdout.split() == ["True", "True", "True", "True", "True", "out_of_memory", "True"]
    assert "child_retiring" in out.stderr  # logged once, at warning level

    # billiard compares that reading with the pool's limit only where one is set: always.
    from shared.queue import NO_RSS_LIMIT_KB, make_celery
    from worker.retirement import ABOVE_EVERY_LIMIT_KB

    assert make_celery(settings, "t").conf.worker_max_memory_per_child == NO_RSS_LIMIT_KB
    assert NO_RSS_LIMIT_KB < ABOVE_EVERY_LIMIT_KB


def test_core_dumps_off_and_not_dumpable():
    code = textwrap.dedent("""
        import resource
        from shared.hardening import disable_core_dumps, is_dumpable
        before = is_dumpable()
        disable_core_dumps()
        print(before, is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE))
    """)
    out = run_python(code).stdout.strip()
    assert out == "True False (0, 0)"


def test_hardening_imports_neither_flask_nor_torch():
    code = "import sys, shared.hardening; print('flask' in sys.modules, 'torch' in sys.modules)"
    out = run_python(code)
    assert out.stdout.strip() == "False False"


class _BrokenStore:
    redis = None

    def claim(self, job_id, worker):
        raise redis.ConnectionError("Redis went away")


def test_redis_error_mid_job_requeues_the_message_instead_of_acking_it(settings, monkeypatch):
    from shared.constants import TASK_PARSE
    from worker import tasks
    from worker.celery_app import create_worker_app
    from worker.pipeline import JobContext

    monkeypatch.setattr(tasks, "REDIS_ERROR_PAUSE", 0)
    app = create_worker_app(settings)
    task = app.tasks[TASK_PARSE]
    process = task.setup(settings)
    process.store = _BrokenStore()
    process.predictor = object()  # "loaded": the task claims only once its model is there
    process.loaded.set()
    monkeypatch.setattr(
        process,
        "context",
        lambda: JobContext(
            store=process.store,
            keyring=settings.keyring,
            predictor=lambda: None,
            worker_name="t",
            max_pixels=MP40,
        ),
    )
    with pytest.raises(Reject) as rejected:
        task.run("A" * 24)
    assert rejected.value.requeue is True
    # A Reject is the one failure Celery neither acks nor drops: it requeues the message; the
    # job store's attempt counter (claim) then bounds the redeliveries.
    assert task.acks_late and task.reject_on_worker_lost
