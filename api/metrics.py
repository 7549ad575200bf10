"""Prometheus metrics of the gateway, correct under gunicorn with several worker processes.

Counters and the latency histogram live in a per-app registry. When `PROMETHEUS_MULTIPROC_DIR`
is set (gunicorn with N processes; the variable is prometheus_client's own, read by it at
import, and by us through `shared.config.prometheus_multiproc_dir`), their values go to per-process files in that directory and `/metrics` merges all of
them with `MultiProcessCollector`, so any process answers for the whole gateway. The queue
depth and Redis reachability are read from Redis at scrape time (not a per-process value).
Labels are route templates (`/v1/jobs/<job_id>`), never raw paths, so ids cannot explode the
series count. `/metrics` is not public: it answers only a scraper that sends
`Authorization: Bearer <M2FP_METRICS_TOKEN>` (401 otherwise), and 404 when no token is set.
"""

from __future__ import annotations

import hmac
import time

import flask
import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from shared.config import prometheus_multiproc_dir
from shared.constants import QUEUE
from shared.errors import MetricsUnauthorized, NotFound
from shared.jobstore import JobStore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ALLOWED_METHODS = frozenset({"GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH"})


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes values to PROMETHEUS_MULTIPROC_DIR (gunicorn, N processes)."""
    return prometheus_multiproc_dir() is not None


class QueueCollector:
    """Scrape-time gauges read from Redis: queue depth and whether Redis answers."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        """Yield m2fp_queue_depth (when Redis answers) and m2fp_redis_up."""
        up = GaugeMetricFamily("m2fp_redis_up", "1 if the gateway reached Redis at scrape time")
        try:
            depth = self.store.queue_depth(QUEUE)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "m2fp_queue_depth", "Parse tasks waiting in the Celery queue", value=depth
        )


class Metrics:
    """The gateway's metric objects and the hooks that feed them."""

    def __init__(self, store: JobStore, token: str | None = None):
        self.token = token
        # No auto_describe: it would call QueueCollector.collect (Redis) at app creation.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "m2fp_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "m2fp_http_request_duration_seconds",
            "Request latency by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "m2fp_rejections", "Requests refused, by error code", ["reason"], registry=self.registry
        )
        self.jobs_submitted = Counter(
            "m2fp_jobs_submitted", "Jobs accepted and enqueued", registry=self.registry
        )
        self.untrusted_forwarded = Counter(
            "m2fp_untrusted_forwarded_for",
            "Requests carrying X-Forwarded-For while M2FP_TRUSTED_PROXIES=0",
            registry=self.registry,
        )
        self.queue = QueueCollector(store)
        self.registry.register(self.queue)

    def reject(self, reason: str) -> None:
        """Count one refused request."""
        self.rejections.labels(reason=reason).inc()

    def exposition(self) -> bytes:
        """The text exposition: all processes' values in multiprocess mode, else this process's."""
        if not multiprocess_mode():
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.queue)
        return generate_latest(registry)

    def init_app(self, app: flask.Flask) -> None:
        """Time every request and count it by route template and status; serve /metrics."""

        @app.before_request
        def start_timer() -> None:
            flask.g.started = time.perf_counter()

        @app.after_request
        def observe(response: flask.Response) -> flask.Response:
            rule = flask.request.url_rule
            route = rule.rule if rule is not None else "unmatched"
            method = flask.request.method if flask.request.method in ALLOWED_METHODS else "OTHER"
            elapsed = time.perf_counter() - flask.g.get("started", time.perf_counter())
            self.requests.labels(method, route, str(response.status_code)).inc()
            self.latency.labels(method, route).observe(elapsed)
            return response

        @app.get("/metrics")
        def metrics() -> flask.Response:
            self.authorize(flask.request.headers.get("Authorization", ""))
            return flask.Response(self.exposition(), content_type=CONTENT_TYPE_LATEST)

    def authorize(self, authorization: str) -> None:
        """404 when metrics are off (no token), 401 unless `authorization` is `Bearer <token>`."""
        if self.token is None:
            raise NotFound()
        expected = f"Bearer {self.token}".encode()
        if not hmac.compare_digest(authorization.encode("utf-8", "replace"), expected):
            raise MetricsUnauthorized()
