"""Memory watchdog: alert when the machine's (or container's) memory use passes a threshold.

A daemon thread samples memory use every `interval` seconds. Crossing
`M2FP_MEMORY_ALERT_PERCENT` (default 90) logs a `memory_alert` event at ERROR and, when
`M2FP_ALERT_WEBHOOK` is set, POSTs a small JSON alert there (no job data, just the figures and
the host). It alerts once per crossing and again only after use fell below the threshold minus a
5-point hysteresis, so a process hovering at the line does not flood the webhook. Used by the
gateway and by each worker process.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from shared.logging import event

log = logging.getLogger(__name__)
HYSTERESIS = 5.0


def memory_percent() -> float:
    """Memory in use, percent: the cgroup's limit when one is set, else the whole machine's."""
    limit_file, usage_file = (
        Path("/sys/fs/cgroup/memory.max"),
        Path("/sys/fs/cgroup/memory.current"),
    )
    try:
        limit = limit_file.read_text().strip()
        if limit != "max":
            return 100.0 * int(usage_file.read_text()) / int(limit)
    except (OSError, ValueError):
        pass
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        info[name] = int(rest.split()[0])
    return 100.0 * (1 - info["MemAvailable"] / info["MemTotal"])


def post_alert(url: str, payload: dict, timeout: float = 5.0) -> int:
    """POST a JSON alert; returns the HTTP status (raises on network errors)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return reply.status


class MemoryWatchdog:
    """Samples memory use and alerts on threshold crossings."""

    def __init__(
        self,
        threshold: float,
        webhook: str | None = None,
        *,
        interval: float = 15.0,
        component: str = "m2fp",
        sample: Callable[[], float] = memory_percent,
    ):
        self.threshold, self.webhook, self.interval = threshold, webhook, interval
        self.component, self.sample = component, sample
        self.alerting = False
        self._stop = threading.Event()

    def check(self) -> bool:
        """Take one sample; returns True if it raised an alert."""
        percent = self.sample()
        if self.alerting and percent < self.threshold - HYSTERESIS:
            self.alerting = False
            event(log, "memory_recovered", percent=round(percent, 1))
            return False
        if self.alerting or percent < self.threshold:
            return False
        self.alerting = True
        event(
            log,
            "memory_alert",
            logging.ERROR,
            percent=round(percent, 1),
            threshold=self.threshold,
            component=self.component,
        )
        if self.webhook:
            payload = {
                "alert": "memory_high",
                "component": self.component,
                "host": socket.gethostname(),
                "percent": round(percent, 1),
                "threshold": self.threshold,
                "ts": int(time.time()),
            }
            try:
                post_alert(self.webhook, payload)
            except OSError:
                event(log, "alert_webhook_failed", logging.WARNING)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.warning("memory_watchdog_error", exc_info=True)

    def start(self) -> MemoryWatchdog:
        """Run in a daemon thread."""
        threading.Thread(target=self._run, name="m2fp-memory-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
