"""The Celery configuration both sides share, and the one call the gateway makes.

The gateway builds a producer-only app with `make_celery(settings)` and calls
`enqueue_parse(app, job_id)`: the message carries the job id and nothing else. The worker
builds its app from the same function, so serializer, queue and broker options cannot drift.
Settings follow RESEARCH.md §2.4–§2.7: JSON only, late acks with requeue on a lost worker
(bounded by the job store's attempt counter), prefetch 1, a visibility timeout longer than the
hard time limit, no result backend (job state lives in the job store).
"""

from __future__ import annotations

import base64
import binascii
import json
import time

import redis
from celery import Celery
from kombu import Queue

from shared.constants import QUEUE, TASK_PARSE
from shared.redis_conn import celery_broker, tls_options

# billiard's per-child RSS limit where M2FP_MAX_MEMORY_PER_CHILD_MB sets none: no RSS reaches
# it (1 PiB, in KiB), so only a child's own retirement request ends a child there
NO_RSS_LIMIT_KB = 1 << 40

# kombu's Redis transport keeps a delivered, not yet acknowledged message in these two keys
# (its `unacked_key` and `unacked_index_key` defaults) until it is acked or, after the
# visibility timeout, restored to its queue.
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"


# long-by-design: the table of Celery settings both sides share, one setting per line
def make_celery(settings, name: str = "m2fp") -> Celery:
    """A Celery app wired to the settings' Redis (or its sentinels) with the service's safe defaults."""
    broker_url, transport = celery_broker(settings)  # Sentinel: master_name, sentinel_kwargs
    tls = tls_options(settings) or None  # rediss://: kombu checks the certificate only if told
    app = Celery(name, broker=broker_url, broker_use_ssl=tls, set_as_current=False)
    transport.update(visibility_timeout=settings.visibility_timeout, health_check_interval=30)
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_default_queue=QUEUE,
        task_queues=[Queue(QUEUE, routing_key=QUEUE)],
        task_routes={TASK_PARSE: {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raises is acked (not redelivered): the parse task turns every failure into
        # a job state itself, and a Redis error mid-job into Reject(requeue=True), which is the
        # one way to get the message back (worker/celery_app.py).
        task_acks_on_failure_or_timeout=True,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        task_track_started=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Off: a task running when the broker connection drops goes on (its message may come
        # back, and the job store's claim refuses that second delivery while the first run is
        # alive: `busy`). On, Celery terminates the running task, the pool child is replaced
        # and the next job waits for a fresh model load: 4 s of a 5 s recovery target
        # (docs/RELIABILITY.md, redis-restart).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Always set: billiard's check between jobs is how a child retires (worker/retirement.py)
        worker_max_memory_per_child=settings.max_memory_per_child_kb or NO_RSS_LIMIT_KB,
        # One broker connection per gateway thread at most: a thread never waits for another to publish.
        broker_pool_limit=max(4, settings.gateway_threads),
    )
    return app


def enqueue_parse(app: Celery, job_id: str) -> None:
    """Send the parse task by name: the message holds only the job id."""
    app.send_task(
        TASK_PARSE,
        args=[job_id],
        queue=QUEUE,
        ignore_result=True,
        argsrepr=repr([job_id]),
        kwargsrepr="{}",
    )


def unacked_job_ids(client: redis.Redis, older_than: float, limit: int = 1000) -> list[str]:
    """Job ids of parse messages delivered more than `older_than` seconds ago and not acked.

    A worker acks a parse message when the job ends, and claims the job right after it gets the
    message; a job id here whose job is still `queued` was taken by a worker that died before
    claiming it (the reaper re-sends those instead of waiting for the visibility timeout).
    """
    found = client.zrangebyscore(UNACKED_INDEX_KEY, "-inf", time.time() - older_than, 0, limit)
    tags = [tag for tag in found if isinstance(tag, bytes | str)]
    if not tags:
        return []
    job_ids = []
    for raw in client.hmget(UNACKED_KEY, tags):
        job_id = _parse_job_id(raw)
        if job_id is not None:
            job_ids.append(job_id)
    return job_ids


def _parse_job_id(raw: bytes | str | None) -> str | None:
    """The job id of one unacked entry (`[message, exchange, routing key]`), or None."""
    try:
        return message_job_id(json.loads(raw)[0] if raw else None)
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def message_job_id(message: dict | None) -> str | None:
    """The job id a parse message carries (a queued entry, decoded), or None for anything else."""
    try:
        if not message or message["headers"].get("task") != TASK_PARSE:
            return None
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return args[0] if args and isinstance(args[0], str) else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, binascii.Error):
        return None
