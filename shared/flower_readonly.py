"""`python -m shared.flower_readonly flower ...`: Flower that never sends a remote-control command.

Flower is a window on the workers, not a remote control: its Redis user (scripts/make_secrets.sh,
and `make run`'s own Redis) may not PUBLISH at all, so it cannot reach Celery's pidbox
(`/0.celery.pidbox`: shutdown, pool restart, rate limits, revoke...), nor run CLIENT KILL/PAUSE,
CONFIG, FLUSHALL or touch a job key. Two things in Flower publish anyway:
- `--enable_events` (on by default) broadcasts `enable_events` every few seconds: turned off by
  the callers (`--enable_events=False`); our workers start with `--task-events`.
- its event receiver broadcasts a `heartbeat` wake-up once when it starts capturing, and a
  refused PUBLISH makes the whole capture fail and retry forever. The wake-up only makes idle
  workers announce themselves sooner (they send a heartbeat every 2 s anyway), so it is dropped
  here, before `celery flower` runs.
Flower's inspect calls (worker details pages) are refused by Redis and logged as warnings.
Imports neither flask nor torch; the broker URL comes from CELERY_BROKER_URL (never argv).
With Redis Sentinel (`make run` passes Flower the `sentinel://` broker URL and the sentinel
variables, shared.config.redis_sentinel), Celery's default app gets the master's name and the
sentinels' password as transport options, which `celery flower` cannot take on its command line.
"""

from __future__ import annotations

import sys

from celery.events.receiver import EventReceiver


def _no_wakeup(self, channel=None) -> None:
    """Replace EventReceiver.wakeup_workers: no broadcast."""


def follow_sentinels(app) -> bool:
    """Give `app` the Sentinel transport options when the sentinel variables are set."""
    from shared.config import redis_sentinel
    from shared.redis_conn import sentinel_transport_options

    sentinel = redis_sentinel()
    if sentinel is None:
        return False
    app.conf.broker_transport_options = sentinel_transport_options(sentinel)
    return True


def main() -> int:
    """Run `celery <argv>` with the wake-up broadcast removed (and the sentinels followed)."""
    from celery import current_app

    EventReceiver.wakeup_workers = _no_wakeup
    follow_sentinels(current_app)
    from celery.bin.celery import main as celery_main

    sys.argv[0] = "celery"
    return celery_main()


if __name__ == "__main__":
    sys.exit(main())
