"""Who the client is, how often it may call, whether it is banned, whether there is room.

- Client key: `key:<sha256 of the API key>` when API keys are configured (the key was checked
  by `api.security`), else `ip:<peer address>`. An `X-API-Key` sent to a gateway without API
  keys is ignored here: otherwise a client could mint a new identity, and a fresh rate limit,
  per request. The peer address is what the WSGI server saw, rewritten by werkzeug's ProxyFix
  only for `trusted_proxies` hops (RESEARCH §2.9), so a spoofed X-Forwarded-For changes nothing
  when no proxy is trusted.
- Rate limits: Flask-Limiter on the service's own Redis (never `memory://`, which would give
  each gunicorn process its own count), keys under `shared.constants.LIMITER_PREFIX`, moving
  window. Submits count against `submit_limit` only once the upload passed validation
  (DESIGN §5 order); status, result and delete share one `poll_limit` bucket per client.
  Storage errors propagate (no swallowing, no in-memory fallback) and become 503.
- Bans: `ban_after` invalid uploads in a row ban the client for `ban_seconds`; a valid upload
  resets the count; 0 disables bans. The ban is checked before the body is even parsed, so a
  banned client cannot keep the gateway busy with invalid uploads (it gets 403 at once).
- Admission control: refuse new jobs while the Celery queue holds `max_queue` messages.
"""

from __future__ import annotations

import logging
import time

import flask
import redis
from flask_limiter import Limiter

from shared.config import Settings
from shared.constants import BAN_PREFIX, LIMITER_PREFIX, QUEUE, STRIKES_PREFIX
from shared.crypto import hash_secret
from shared.errors import Banned, QueueFull
from shared.jobstore import JobStore
from shared.logging import event

log = logging.getLogger(__name__)

SUBMIT_SCOPE = "submit"
POLL_SCOPE = "poll"


def client_key() -> str:
    """The identity limits and bans apply to: the checked API key's hash, else the peer address."""
    api_key_hash = flask.g.get("api_key_hash")
    if api_key_hash:
        return f"key:{api_key_hash}"
    return f"ip:{flask.request.remote_addr or 'unknown'}"


def client_tag(client: str) -> str:
    """A short pseudonym of a client key for log lines (no addresses or keys in logs)."""
    return hash_secret(client)[:16]


def make_limiter(app: flask.Flask, settings: Settings, client: redis.Redis) -> Limiter:
    """Flask-Limiter bound to `app`, counting in the service's Redis through `client`'s pool."""
    # The URI only selects limits' Redis storage class; connections come from the shared pool,
    # so the limiter uses the same server, credentials and timeouts as the job store.
    scheme = "rediss" if settings.redis_url.startswith("rediss://") else "redis"
    limiter = Limiter(
        client_key,
        storage_uri=f"{scheme}://",
        storage_options={"connection_pool": client.connection_pool, "key_prefix": LIMITER_PREFIX},
        strategy="moving-window",
        swallow_errors=False,
        in_memory_fallback_enabled=False,
        headers_enabled=False,
    )
    limiter.init_app(app)
    return limiter


def enforce_submit_limit(limiter: Limiter, settings: Settings) -> None:
    """Count one submit against the client's limit; RateLimitExceeded (429) when over it."""
    with limiter.shared_limit(settings.submit_limit, scope=SUBMIT_SCOPE):
        pass


def enforce_poll_limit(limiter: Limiter, settings: Settings) -> None:
    """Count one status/result/delete call against the client's poll limit."""
    with limiter.shared_limit(settings.poll_limit, scope=POLL_SCOPE):
        pass


def retry_after(limiter: Limiter) -> int:
    """Seconds until the breached limit of this request lets the client in again."""
    breached = limiter.current_limit
    if breached is None:
        return 60
    return max(1, int(breached.reset_at - time.time()))


def _ban_key(client: str) -> str:
    return f"{BAN_PREFIX}:{client}"


def _strikes_key(client: str) -> str:
    return f"{STRIKES_PREFIX}:{client}"


def refuse_banned(client_redis: redis.Redis, settings: Settings, client: str) -> None:
    """Raise Banned (403) while the client serves a ban."""
    if settings.ban_after and client_redis.exists(_ban_key(client)):
        event(log, "client_banned_refused", logging.WARNING, client=client_tag(client))
        raise Banned()


def record_strike(client_redis: redis.Redis, settings: Settings, client: str, code: str) -> bool:
    """Count an invalid upload; ban the client at `ban_after` in a row. True if now banned."""
    if not settings.ban_after:
        return False
    strikes_key = _strikes_key(client)
    with client_redis.pipeline(transaction=True) as pipe:
        strikes, _ = pipe.incr(strikes_key).expire(strikes_key, settings.ban_seconds).execute()
    if strikes < settings.ban_after:
        return False
    with client_redis.pipeline(transaction=True) as pipe:
        pipe.set(_ban_key(client), "1", ex=settings.ban_seconds).delete(strikes_key).execute()
    event(log, "client_banned", logging.WARNING, client=client_tag(client), strikes=int(strikes),
          last_code=code, seconds=settings.ban_seconds)
    return True


def clear_strikes(client_redis: redis.Redis, settings: Settings, client: str) -> None:
    """A valid upload ends the run of invalid ones."""
    if settings.ban_after:
        client_redis.delete(_strikes_key(client))


def admit(store: JobStore, settings: Settings) -> None:
    """Raise QueueFull (503) when the queue already holds `max_queue` messages."""
    depth = store.queue_depth(QUEUE)
    if depth >= settings.max_queue:
        event(log, "queue_full", logging.WARNING, depth=depth, max_queue=settings.max_queue)
        raise QueueFull()
