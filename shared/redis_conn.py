"""Every connection to Redis is built here: the gateway's and the workers' clients (job store,
heartbeats, readiness, bans), Celery's broker (gateway producer and workers), the rate
limiter's storage and Flower's broker options.

Two shapes, chosen by shared.config:
- one Redis: `M2FP_REDIS_URL` as it is;
- Redis Sentinel (`M2FP_REDIS_SENTINELS` + `M2FP_REDIS_SENTINEL_MASTER`): every new connection
  asks the sentinels for the master's address, so broker, job store and rate limiter all follow
  the master after a failover. The master's user, password and database come from
  `M2FP_REDIS_URL` (its host and port are ignored); the sentinels get only their own password
  (`M2FP_REDIS_SENTINEL_PASSWORD`), never the master's.

TLS (a rediss:// URL, optionally M2FP_REDIS_CA_FILE): `tls_options` gives redis-py and Celery's
broker the same certificate checks, and `flower_broker_url` puts them in Flower's broker URL.

What a failover looks like to a client: connections to the dead master fail (ConnectionError,
TimeoutError), a demoted master refuses writes (ReadOnlyError, which redis-py's sentinel
connection turns into a disconnect and a ConnectionError), and until the sentinels promote a
replica new connections are refused. Each of these is a RedisError: the gateway answers it 503
with Retry-After (api/errors.py), a worker requeues the job (worker/tasks.py), Celery reconnects.
The job store's Lua scripts are loaded again on NOSCRIPT by redis-py's Script objects.
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from shared.config import RedisSentinel

HEALTH_CHECK_INTERVAL = 30  # seconds a pooled connection may idle before a PING checks it
SENTINEL_TIMEOUT = 1.0  # seconds for one sentinel to answer; the next one is asked after it


class RedisSettings(Protocol):
    """What these builders read: `shared.config.Settings` and `StackSettings` both have it."""

    @property
    def redis_url(self) -> str | None: ...

    @property
    def redis_sentinel(self) -> RedisSentinel | None: ...

    @property
    def redis_ca_file(self) -> str | None: ...


def _url(settings: RedisSettings) -> str:
    if not settings.redis_url:
        raise ValueError("no Redis URL in these settings")
    return settings.redis_url


def master_auth(redis_url: str) -> dict[str, Any]:
    """The user, password and database of `redis_url` (what Sentinel mode keeps of it)."""
    parsed = parse_url(redis_url)
    return {key: parsed[key] for key in ("username", "password", "db") if parsed.get(key)}


def sentinel_kwargs(sentinel: RedisSentinel, timeout: float = SENTINEL_TIMEOUT) -> dict[str, Any]:
    """How to talk to the sentinels themselves: their own password, short timeouts and no retry.

    No retry: redis-py's default (3 retries, backing off 1, 2, 4 s) per sentinel made one lookup
    take 8 s when no sentinel answered (measured); the other sentinels are the retries here.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if sentinel.password:
        options["password"] = sentinel.password
    return options


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    """TLS arguments for a rediss:// URL, the same for redis-py and Celery's broker: the server's
    certificate is verified, against M2FP_REDIS_CA_FILE or else the system's CAs, and so is its
    host name (redis-py's default). Without them kombu would accept any certificate. {} for
    redis://. `ssl_*` parameters in the URL's query still win (both libraries read them)."""
    if not _url(settings).startswith("rediss://"):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_ca_file:
        options["ssl_ca_certs"] = settings.redis_ca_file
    return options


def flower_broker_url(redis_url: str, ca_file: str | None) -> str:
    """Flower's broker URL (CELERY_BROKER_URL: `celery flower` takes no broker options) with the
    CA and the certificate check in its query, for a rediss:// URL and a CA file."""
    if not ca_file or not redis_url.startswith("rediss://") or "ssl_ca_certs=" in redis_url:
        return redis_url
    query = urlencode({"ssl_ca_certs": ca_file, "ssl_cert_reqs": "required"})
    return f"{redis_url}{'&' if '?' in redis_url else '?'}{query}"


def make_client(settings: RedisSettings, **options: Any) -> redis.Redis:
    """A client on the master: the URL's server, or the one the sentinels name now.

    `options` are redis-py connection arguments (the gateway's short timeouts).
    """
    options = {"health_check_interval": HEALTH_CHECK_INTERVAL, **tls_options(settings), **options}
    sentinel = settings.redis_sentinel
    if sentinel is None:
        return redis.Redis.from_url(_url(settings), **options)
    timeout = min(SENTINEL_TIMEOUT, options.get("socket_connect_timeout") or SENTINEL_TIMEOUT)
    manager = Sentinel(
        list(sentinel.addresses),
        sentinel_kwargs=sentinel_kwargs(sentinel, timeout),
        **master_auth(_url(settings)),
        **options,
    )
    return manager.master_for(sentinel.master, redis_class=redis.Redis)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def celery_broker(settings: RedisSettings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it needs beyond the service's own.

    Sentinel mode: `sentinel://user:password@host:port/db;...` (kombu takes the master's
    credentials from the URLs and the sentinels' from `sentinel_kwargs`), `master_name`.
    """
    sentinel = settings.redis_sentinel
    if sentinel is None:
        return _url(settings), {}
    auth = master_auth(_url(settings))
    userinfo = ""
    if auth.get("username") or auth.get("password"):
        userinfo = quote(auth.get("username", ""), safe="")
        userinfo += f":{quote(auth['password'], safe='')}" if auth.get("password") else ""
        userinfo += "@"
    db = auth.get("db", 0)
    url = ";".join(
        f"sentinel://{userinfo}{_host(host)}:{port}/{db}" for host, port in sentinel.addresses
    )
    return url, sentinel_transport_options(sentinel)


def sentinel_transport_options(sentinel: RedisSentinel) -> dict[str, Any]:
    """kombu's Sentinel transport options: the master's name, how to reach the sentinels."""
    return {"master_name": sentinel.master, "sentinel_kwargs": sentinel_kwargs(sentinel)}


def limiter_storage(settings: RedisSettings, client: redis.Redis) -> tuple[str, dict[str, Any]]:
    """Flask-Limiter's storage URI and options: counting through `client`'s own pool.

    The URI only selects limits' Redis storage class; the connections come from the pool, so the
    limiter uses the same server (or the same sentinel-followed master), credentials and timeouts
    as the job store.
    """
    scheme = "rediss" if _url(settings).startswith("rediss://") else "redis"
    return f"{scheme}://", {"connection_pool": client.connection_pool}
