"""The batcher of worker/batching.py with a fake predictor: no services, no model.

It collects up to `max_batch` images that arrive within the wait, sends a lone image alone after
the wait, fails every caller of a batch whose forward raised (each with the same error type),
never mixes callers' results up, drops a caller that gave up before its batch ran, retries an
out-of-memory batch one image at a time, and calls `on_stuck` for a forward past the hard limit.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from worker.batching import Batcher, BatchTimeout


@dataclass
class FakeResult:
    value: int
    timings: dict = field(default_factory=dict)


class FakePredictor:
    """`predict_batch` of ints: each result is its input squared; records every batch."""

    def __init__(self, delay: float = 0.0, error: BaseException | None = None):
        self.batches: list[list[int]] = []
        self.delay, self.error = delay, error
        self.lock = threading.Lock()

    def predict_batch(self, images: list[int]) -> list[FakeResult]:
        with self.lock:
            self.batches.append(list(images))
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [FakeResult(image * image) for image in images]


def run_callers(batcher: Batcher, images: list[int], timeout: float | None = 10.0) -> list:
    """Submit every image from its own thread at once; each thread's result or exception."""
    start = threading.Barrier(len(images))

    def call(image):
        start.wait()
        try:
            return batcher.infer(image, timeout=timeout)
        except Exception as exc:  # the test looks at what each caller got
            return exc

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(call, images))


def test_collects_up_to_max_batch_within_the_wait():
    fake = FakePredictor()
    batcher = Batcher(fake.predict_batch, max_batch=4, wait_seconds=0.5).start()
    results = run_callers(batcher, list(range(10)))
    batcher.stop()
    assert [r.value for r in results] == [i * i for i in range(10)]
    assert sorted(len(b) for b in fake.batches) == [2, 4, 4]
    assert sorted(i for b in fake.batches for i in b) == list(range(10))
    size_of = {image: len(batch) for batch in fake.batches for image in batch}
    assert [r.timings["batch_size"] for r in results] == [size_of[i] for i in range(10)]


def test_a_single_job_goes_alone_after_the_wait():
    fake = FakePredictor()
    batcher = Batcher(fake.predict_batch, max_batch=8, wait_seconds=0.2).start()
    tic = time.monotonic()
    result = batcher.infer(7, timeout=5)
    waited = time.monotonic() - tic
    batcher.stop()
    assert result.value == 49 and fake.batches == [[7]]
    assert 0.2 <= waited < 2.0
    assert result.timings["batch_size"] == 1
    assert result.timings["batch_wait"] >= 0.19


def test_a_wait_of_zero_takes_only_what_is_already_waiting():
    fake = FakePredictor()
    batcher = Batcher(fake.predict_batch, max_batch=8, wait_seconds=0.0).start()
    assert batcher.infer(3, timeout=5).value == 9
    batcher.stop()
    assert fake.batches == [[3]]


def test_an_error_in_the_forward_fails_every_caller_of_that_batch():
    fake = FakePredictor(error=ValueError("bad batch"))
    batcher = Batcher(fake.predict_batch, max_batch=8, wait_seconds=0.5).start()
    results = run_callers(batcher, [1, 2, 3])
    batcher.stop()
    assert [len(b) for b in fake.batches] == [3]
    assert all(type(r) is ValueError and str(r) == "bad batch" for r in results)
    assert len({id(r) for r in results}) == 3  # each caller raises its own copy
    assert all(isinstance(r.__cause__, ValueError) for r in results)


def test_the_next_batch_runs_after_a_failed_one():
    fake = FakePredictor(error=RuntimeError("transient"))
    batcher = Batcher(fake.predict_batch, max_batch=2, wait_seconds=0.0).start()
    with pytest.raises(RuntimeError, match="transient"):
        batcher.infer(1, timeout=5)
    fake.error = None
    assert batcher.infer(5, timeout=5).value == 25
    batcher.stop()


def test_results_go_to_their_own_callers():
    fake = FakePredictor(delay=0.01)
    batcher = Batcher(fake.predict_batch, max_batch=5, wait_seconds=0.05).start()
    images = list(range(100, 140))
    results = run_callers(batcher, images)
    batcher.stop()
    assert [r.value for r in results] == [i * i for i in images]
    assert max(len(b) for b in fake.batches) > 1


def test_a_caller_past_its_deadline_times_out_and_its_image_is_dropped():
    fake = FakePredictor(delay=0.5)
    batcher = Batcher(fake.predict_batch, max_batch=1, wait_seconds=0.0).start()
    first = threading.Thread(target=batcher.infer, args=(1,), kwargs={"timeout": 5})
    first.start()
    time.sleep(0.1)  # the first image's forward runs now; the next one waits behind it
    with pytest.raises(BatchTimeout):
        batcher.infer(2, timeout=0.1)
    first.join()
    assert batcher.infer(3, timeout=5).value == 9
    batcher.stop()
    assert fake.batches == [[1], [3]]  # the abandoned image never ran


def test_an_out_of_memory_batch_is_retried_one_image_at_a_time():
    class OomOnBatches(FakePredictor):
        def predict_batch(self, images):
            if len(images) > 1 or images[0] == 13:
                self.batches.append(list(images))
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            return super().predict_batch(images)

    fake = OomOnBatches()
    batcher = Batcher(fake.predict_batch, max_batch=4, wait_seconds=0.5).start()
    results = run_callers(batcher, [11, 12, 13])
    batcher.stop()
    assert [r.value for r in results[:2]] == [121, 144]
    assert isinstance(results[2], RuntimeError)  # alone it still does not fit: out_of_memory
    assert len(fake.batches[0]) == 3  # the batch first, then each image alone


def test_a_forward_past_the_hard_limit_calls_on_stuck():
    stuck: list[float] = []
    fake = FakePredictor(delay=2.5)
    batcher = Batcher(
        fake.predict_batch, max_batch=1, wait_seconds=0.0, hard_limit=0.5, on_stuck=stuck.append
    ).start()
    assert batcher.infer(2, timeout=10).value == 4
    batcher.stop()
    assert len(stuck) == 1 and stuck[0] > 0.5


def test_a_failing_metrics_hook_loses_neither_the_results_nor_the_thread():
    def broken_hook(size, seconds):
        raise OSError("metrics directory gone")

    fake = FakePredictor()
    batcher = Batcher(fake.predict_batch, max_batch=2, wait_seconds=0.0, on_batch=broken_hook)
    batcher.start()
    assert batcher.infer(4, timeout=5).value == 16
    assert batcher.infer(5, timeout=5).value == 25  # the inference thread lives on
    batcher.stop()


def test_on_batch_reports_each_forward():
    seen: list[tuple[int, float]] = []
    fake = FakePredictor()
    batcher = Batcher(
        fake.predict_batch,
        max_batch=3,
        wait_seconds=0.5,
        on_batch=lambda size, seconds: seen.append((size, seconds)),
    ).start()
    run_callers(batcher, [1, 2, 3])
    batcher.stop()
    assert [size for size, _ in seen] == [3]


@pytest.mark.parametrize(("max_batch", "wait"), [(0, 0.01), (2, -1.0)])
def test_bad_arguments_are_refused(max_batch, wait):
    with pytest.raises(ValueError):
        Batcher(lambda images: images, max_batch=max_batch, wait_seconds=wait)


# --- when the batching path is on ---------------------------------------------------------------
def settings_for(**env: str):
    from shared.config import load_settings
    from shared.crypto import generate_key

    base = {
        "M2FP_REDIS_URL": "redis://:pw@127.0.0.1:6399/0",
        "M2FP_DATA_KEYS": f"k1:{generate_key()}",
    }
    return load_settings({**base, **env})


def never_probed() -> bool:
    raise AssertionError("the CUDA probe runs only for M2FP_DEVICE=auto")


@pytest.mark.parametrize(
    ("env", "cuda", "batching"),
    [
        ({}, False, "off"),  # auto on a CPU-only host: per job
        ({}, True, "on"),  # auto where torch sees CUDA
        ({"M2FP_DEVICE": "cuda:1"}, None, "on"),
        ({"M2FP_DEVICE": "cpu"}, None, "off"),
        ({"M2FP_DEVICE": "cpu", "M2FP_BATCHING": "on"}, None, "on"),  # CI tests it on CPU
        ({"M2FP_DEVICE": "cuda", "M2FP_BATCHING": "off"}, None, "off"),
    ],
)
def test_batching_is_on_for_cuda_by_default_and_on_cpu_only_when_asked(env, cuda, batching):
    from worker.__main__ import resolve_batching

    settings = settings_for(**env)
    resolved = resolve_batching(
        settings, probe=(lambda: cuda) if cuda is not None else never_probed
    )
    assert resolved.batching == batching


def test_a_batching_worker_is_one_process_of_threads_and_per_job_stays_prefork():
    from worker.__main__ import _celery_argv, resolve_batching

    cpu = resolve_batching(
        settings_for(M2FP_DEVICE="cpu", M2FP_BATCHING="on", M2FP_GPU_BATCH="4"), never_probed
    )
    argv = _celery_argv(cpu, [])
    assert argv[argv.index("--pool") + 1] == "threads"
    assert argv[argv.index("--concurrency") + 1] == "8"  # two batches of job threads
    assert cpu.worker_concurrency == 1 and cpu.child_memory_limit_mb == 4096
    cuda = resolve_batching(settings_for(M2FP_DEVICE="cuda"), never_probed)
    assert cuda.child_memory_limit_mb is None  # the GPU's memory bounds a batch
    per_job = resolve_batching(settings_for(M2FP_WORKER_CONCURRENCY="3"), lambda: False)
    argv = _celery_argv(per_job, [])
    assert argv[argv.index("--pool") + 1] == "prefork"
    assert argv[argv.index("--concurrency") + 1] == "3"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("M2FP_BATCHING", "sometimes"),
        ("M2FP_GPU_BATCH", "0"),
        ("M2FP_GPU_BATCH", "65"),
        ("M2FP_BATCH_WAIT_MS", "-1"),
        ("M2FP_BATCH_WAIT_MS", "soon"),
    ],
)
def test_bad_batching_settings_fail_fast_naming_the_variable(name, value):
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match=name):
        settings_for(**{name: value})
