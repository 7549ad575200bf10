"""Who the client is, how often it may call, whether it is banned, whether there is room for it.

- Client key: `key:<sha256 of the API key>` when API keys are configured (the key was checked
  by `api.security`), else `ip:<peer network>`: an IPv4 peer is its own address, an IPv6 peer
  is grouped by its `/M2FP_IPV6_PREFIX` (default /64, what one subscriber usually gets, so a
  client cannot mint 2^64 identities by rotating its interface id); IPv4-mapped IPv6 counts as
  the IPv4 address. An `X-API-Key` sent to a gateway without API keys is ignored here:
  otherwise a client could mint a new identity, and a fresh rate limit, per request. The peer
  address is what the WSGI server saw, rewritten by werkzeug's ProxyFix only for
  `trusted_proxies` hops (RESEARCH §2.9), so a spoofed X-Forwarded-For changes nothing when no
  proxy is trusted. Requests that carry X-Forwarded-For while no hop is trusted are counted
  (`m2fp_untrusted_forwarded_for_total`) and logged loudly once per process: behind a proxy
  that setting makes every user one client.
- Rate limits: Flask-Limiter on the service's own Redis (never `memory://`, which would give
  each gunicorn process its own count), keys under `shared.constants.LIMITER_PREFIX`, moving
  window. Submit *attempts* count against `submit_attempt_limit` before the body is even read
  (so junk uploads and the work of validating them are metered too); admitted-shaped submits
  count against `submit_limit` once the upload passed validation (DESIGN §5 order); status,
  result and delete share one `poll_limit` bucket per client. Storage errors propagate (no
  swallowing, no in-memory fallback) and become 503.
- Bans: `ban_after` invalid uploads in a row ban the client for `ban_seconds`; only a job
  that was actually admitted ends the run (a valid upload then refused with 429/503 does not
  reset it); 0 disables bans. The ban is checked before the body is parsed, so a banned client
  cannot keep the gateway busy with invalid uploads (it gets 403 at once).
- Fairness: a client may have at most `max_jobs_per_client` jobs queued or running
  (`JobStore.admit_for_client`, atomic in Redis), so one client cannot fill the whole queue;
  and the queue as a whole holds at most `max_queue` messages.
"""

from __future__ import annotations

import ipaddress
import logging
import time

import flask
import redis
from flask_limiter import Limiter

from shared.config import Settings
from shared.constants import LIMITER_PREFIX, QUEUE, ban_key, strikes_key
from shared.errors import Banned, QueueFull, TooManyJobs
from shared.jobstore import JobStore
from shared.logging import event
from shared.redis_conn import limiter_storage

log = logging.getLogger(__name__)

SUBMIT_SCOPE = "submit"
ATTEMPT_SCOPE = "submit-attempt"
POLL_SCOPE = "poll"
IPV6_PREFIX_CONFIG = "M2FP_IPV6_PREFIX"
_warned_untrusted_forwarded_for = False


def client_network(address: str | None, ipv6_prefix: int) -> str:
    """The network a peer address counts as: IPv4 itself, IPv6 its /ipv6_prefix, else 'invalid'."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return "invalid"  # an unparsable forwarded value: all such requests share one bucket
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


def client_key() -> str:
    """The identity limits and bans apply to: the checked API key's hash, else the peer network."""
    cached = flask.g.get("client_key")
    if cached:
        return cached
    api_key_hash = flask.g.get("api_key_hash")
    if api_key_hash:
        key = f"key:{api_key_hash}"
    else:
        prefix = flask.current_app.config.get(IPV6_PREFIX_CONFIG, 64)
        key = f"ip:{client_network(flask.request.remote_addr, prefix)}"
    flask.g.client_key = key
    return key


def note_untrusted_forwarded_for(settings: Settings, count) -> None:
    """Count (and log loudly, once per process) X-Forwarded-For arriving while no hop is trusted."""
    global _warned_untrusted_forwarded_for  # noqa: PLW0603  (one warning per process)
    if settings.trusted_proxies or "X-Forwarded-For" not in flask.request.headers:
        return
    count()
    if not _warned_untrusted_forwarded_for:
        _warned_untrusted_forwarded_for = True
        # Behind a proxy this setting makes every user one client (one rate limit, one ban).
        event(
            log,
            "untrusted_forwarded_for",
            logging.WARNING,
            trusted_proxies=0,
            meaning="every_user_behind_the_proxy_is_one_client",
            fix="set_M2FP_TRUSTED_PROXIES_to_the_number_of_proxy_hops",
        )


def client_tag(client: str) -> str:
    """The client's keyed pseudonym (`Keyring.pseudonym`): what log lines and Redis key names
    carry instead of an address or API key."""
    tags = flask.g.setdefault("client_tags", {})  # a submit asks up to six times: two HMACs once
    if client not in tags:
        tags[client] = flask.current_app.extensions["m2fp"].settings.keyring.pseudonym(client)
    return tags[client]


def limit_key() -> str:
    """What rate limits count by: the client's pseudonym, so Redis keys carry no address."""
    return client_tag(client_key())


def make_limiter(app: flask.Flask, settings: Settings, client: redis.Redis) -> Limiter:
    """Flask-Limiter bound to `app`, counting in the service's Redis through `client`'s pool."""
    # Connections come from the shared pool (shared.redis_conn.limiter_storage), so the limiter
    # uses the same server, credentials and timeouts as the job store, and follows the master
    # the sentinels name. Flask-Limiter types storage options as str | int; `limits` takes the
    # pool object as it is.
    storage_uri, options = limiter_storage(settings, client)
    options["key_prefix"] = LIMITER_PREFIX
    limiter = Limiter(
        limit_key,
        storage_uri=storage_uri,
        storage_options=options,
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


def enforce_attempt_limit(limiter: Limiter, settings: Settings) -> None:
    """Count one submit attempt, valid or not, before its body is read; 429 when over the limit."""
    with limiter.shared_limit(settings.submit_attempt_limit, scope=ATTEMPT_SCOPE):
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
    return ban_key(client_tag(client))


def _strikes_key(client: str) -> str:
    return strikes_key(client_tag(client))


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
        pipe.incr(strikes_key)
        pipe.expire(strikes_key, settings.ban_seconds)
        strikes, _ = pipe.execute()
    if strikes < settings.ban_after:
        return False
    with client_redis.pipeline(transaction=True) as pipe:
        pipe.set(_ban_key(client), "1", ex=settings.ban_seconds)
        pipe.delete(strikes_key)
        pipe.execute()
    event(
        log,
        "client_banned",
        logging.WARNING,
        client=client_tag(client),
        strikes=int(strikes),
        last_code=code,
        seconds=settings.ban_seconds,
    )
    return True


def clear_strikes(client_redis: redis.Redis, settings: Settings, client: str) -> None:
    """An admitted job ends the run of invalid uploads (call it only once the job is queued)."""
    if settings.ban_after:
        client_redis.delete(_strikes_key(client))


def admit(store: JobStore, settings: Settings) -> None:
    """Raise QueueFull (503) when the queue already holds `max_queue` messages."""
    depth = store.queue_depth(QUEUE)
    if depth >= settings.max_queue:
        event(log, "queue_full", logging.WARNING, depth=depth, max_queue=settings.max_queue)
        raise QueueFull()


def admit_for_client(store: JobStore, settings: Settings, client: str, job_id: str) -> None:
    """Raise TooManyJobs (429) when the client already has `max_jobs_per_client` jobs in flight."""
    if not settings.max_jobs_per_client:
        return
    if not store.admit_for_client(client_tag(client), job_id, settings.max_jobs_per_client):
        event(
            log,
            "client_jobs_full",
            logging.WARNING,
            client=client_tag(client),
            max_jobs=settings.max_jobs_per_client,
        )
        raise TooManyJobs()
