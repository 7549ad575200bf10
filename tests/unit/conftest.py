"""What tests/unit may not do: start a service.

Unit tests run in this process, with at most one-shot tools as subprocesses (`python -c` to
measure a fresh process's memory, `kubectl kustomize`, checkov, the secrets scripts). A test that
needs redis-server, gunicorn, a worker, Flower, nginx or a browser belongs in tests/integration.
Two guards hold that line, so `make test-fast` stays service-free as the suite grows:

- at collection, a unit test that asks for a fixture of the real stack (`redis_server` and what
  builds on it) is an error, and so is any other test that asks for one without the
  `integration` marker (`make test-fast` deselects by marker, not by folder);
- while the unit package runs, `subprocess.Popen` refuses to start a service's executable.

Fixtures of the client tests: `server`, the scripted HTTP double of tests/unit/client_doubles.py
on a loopback port in this process (a thread, not a service), and `sleeps`, the delays a Client
made by `make_client` asked for instead of sleeping.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.unit.client_doubles import Scripted, make_handler

UNIT = Path(__file__).resolve().parent
SERVICE_FIXTURES = frozenset({"redis_server", "redis_url", "clean_redis", "service_env"})
SERVICE_EXECUTABLES = frozenset(
    {
        "redis-server",
        "redis-sentinel",
        "gunicorn",
        "celery",
        "flower",
        "nginx",
        "chromium",
        "chromedriver",
    }
)
SERVICE_MODULES = frozenset({"gunicorn", "celery", "flower", "worker", "scripts.stack"})


def service_in(argv: str | bytes | os.PathLike | Sequence) -> str | None:
    """The service an argv (or shell command line) would start, or None for a one-shot tool."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        words = os.fsdecode(argv).split()
    else:
        words = [os.fsdecode(word) for word in argv]
    for index, word in enumerate(words):
        if os.path.basename(word) in SERVICE_EXECUTABLES:
            return word
        if word == "-m" and index + 1 < len(words) and words[index + 1] in SERVICE_MODULES:
            return f"-m {words[index + 1]}"
        if word.endswith("scripts/stack.py"):
            return word
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse, at collection, tests whose place or marker hides that they need the real stack."""
    offenders = []
    for item in items:
        uses = sorted(SERVICE_FIXTURES & set(item.fixturenames))
        if not uses:
            continue
        if UNIT in Path(item.path).parents:
            offenders.append(f"{item.nodeid} uses {uses}: move it to tests/integration")
        elif item.get_closest_marker("integration") is None:
            offenders.append(f"{item.nodeid} uses {uses}: mark it `integration`")
    if offenders:
        raise pytest.UsageError(
            "tests/unit starts no service, and `make test-fast` (-m 'not integration') none:\n  "
            + "\n  ".join(offenders)
        )


@pytest.fixture(scope="package", autouse=True)
def no_services() -> Iterator[None]:
    """While tests/unit runs, starting a service's process fails the test that tried."""
    original_init = subprocess.Popen.__init__

    def guarded_init(self, args, *rest, **kwargs):
        service = service_in(args)
        if service is not None:
            self._child_created = False  # what Popen.__del__ reads: nothing was started
            pytest.fail(f"a unit test tried to start a service ({service}): use tests/integration")
        original_init(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", guarded_init)
        yield


@pytest.fixture
def server() -> Iterator[Scripted]:
    """The scripted HTTP double, serving from a thread; set `.responses`, read `.requests`."""
    script = Scripted()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(script))
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield script
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    """Where a client made by `make_client` records the delays it would have slept."""
    return []
