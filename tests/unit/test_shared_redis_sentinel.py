"""Redis Sentinel in the configuration (shared.config) and the connection builders that every
Redis user goes through (shared.redis_conn): no service, nothing listens on the addresses used."""

from __future__ import annotations

import time

import kombu
import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from api import create_app
from shared.config import ConfigError, RedisSentinel, load_settings, load_stack_settings
from shared.queue import make_celery
from shared.redis_conn import (
    celery_broker,
    limiter_storage,
    make_client,
    master_auth,
    sentinel_transport_options,
)
from tests.conftest import free_port

SENTINELS = "10.0.0.1:26379, sentinel-b.internal:26380,[fd00::3]:26381"
ADDRESSES = (("10.0.0.1", 26379), ("sentinel-b.internal", 26380), ("fd00::3", 26381))


@pytest.fixture
def sentinel_env(settings_env) -> dict[str, str]:
    """A valid environment in Sentinel mode: an ACL user and database 3 in the URL."""
    return {
        **settings_env,
        "M2FP_REDIS_URL": "redis://m2fp:p%40ss%2Fword@ignored.invalid:1/3",
        "M2FP_REDIS_SENTINELS": SENTINELS,
        "M2FP_REDIS_SENTINEL_MASTER": "m2fp-master",
        "M2FP_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
    }


# --- configuration ------------------------------------------------------------------------
def test_sentinels_are_parsed_and_their_password_stays_out_of_repr(sentinel_env):
    settings = load_settings(sentinel_env)
    assert settings.redis_sentinel == RedisSentinel(ADDRESSES, "m2fp-master", "sentinel-secret")
    assert "sentinel-secret" not in repr(settings)
    assert "p%40ss" not in repr(settings)


def test_no_sentinels_by_default(settings):
    assert settings.redis_sentinel is None


def test_sentinel_password_from_a_file(sentinel_env, tmp_path):
    path = tmp_path / "sentinel_password"
    path.write_text("from-the-file\n")
    del sentinel_env["M2FP_REDIS_SENTINEL_PASSWORD"]
    sentinel_env["M2FP_REDIS_SENTINEL_PASSWORD_FILE"] = str(path)
    sentinel = load_settings(sentinel_env).redis_sentinel
    assert sentinel is not None and sentinel.password == "from-the-file"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"M2FP_REDIS_SENTINEL_MASTER": ""}, "both"),
        ({"M2FP_REDIS_SENTINELS": ""}, "both"),
        ({"M2FP_REDIS_SENTINELS": "10.0.0.1"}, "host:port"),
        ({"M2FP_REDIS_SENTINELS": "10.0.0.1:0"}, "host:port"),
        ({"M2FP_REDIS_SENTINELS": "10.0.0.1:65536"}, "host:port"),
        ({"M2FP_REDIS_SENTINELS": "10.0.0.1:26379,,10.0.0.2:26379"}, "host:port"),
        ({"M2FP_REDIS_SENTINELS": "redis://10.0.0.1:26379"}, "host:port"),
        ({"M2FP_REDIS_SENTINELS": "a:1,a:1"}, "twice"),
        ({"M2FP_REDIS_SENTINEL_MASTER": "my master"}, "M2FP_REDIS_SENTINEL_MASTER"),
        ({"M2FP_REDIS_SENTINEL_PASSWORD": ""}, "M2FP_REDIS_SENTINEL_PASSWORD"),
        ({"M2FP_REDIS_URL": "rediss://:pw@h:6379/0"}, "redis:// URL"),
        ({"M2FP_REDIS_URL": "unix://:pw@/run/redis.sock"}, "redis:// URL"),
    ],
)
def test_invalid_sentinel_settings_are_refused(sentinel_env, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({**sentinel_env, **overrides})


def test_a_sentinel_password_needs_sentinels(settings_env):
    with pytest.raises(ConfigError, match="M2FP_REDIS_SENTINELS is not"):
        load_settings({**settings_env, "M2FP_REDIS_SENTINEL_PASSWORD": "x"})


def test_sentinels_without_a_password_only_in_dev_mode(sentinel_env):
    del sentinel_env["M2FP_REDIS_SENTINEL_PASSWORD"]
    with pytest.raises(ConfigError, match="name another master"):
        load_settings(sentinel_env)
    assert load_settings({**sentinel_env, "M2FP_DEV_MODE": "1"}).redis_sentinel is not None


def test_make_run_with_sentinels_needs_the_masters_credentials(sentinel_env):
    stack = load_stack_settings(sentinel_env)
    assert stack.redis_sentinel is not None and stack.redis_sentinel.addresses == ADDRESSES
    del sentinel_env["M2FP_REDIS_URL"]
    with pytest.raises(ConfigError, match="M2FP_REDIS_URL"):
        load_stack_settings(sentinel_env)
    assert load_stack_settings({}).redis_sentinel is None


# --- connection builders -------------------------------------------------------------------
def test_master_auth_keeps_user_password_and_database():
    url = "redis://m2fp:p%40ss%2Fword@ignored.invalid:1/3"
    assert master_auth(url) == {"username": "m2fp", "password": "p@ss/word", "db": 3}
    assert master_auth("redis://:pw@h:6379") == {"password": "pw"}


def test_plain_redis_is_used_as_configured(settings):
    client = make_client(settings, socket_timeout=5)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == (
        "127.0.0.1",
        6399,
        "secret-password",
    )
    assert kwargs["socket_timeout"] == 5 and kwargs["health_check_interval"] == 30
    assert celery_broker(settings) == (settings.redis_url, {})
    assert limiter_storage(settings, client) == (
        "redis://",
        {"connection_pool": client.connection_pool},
    )


def test_sentinel_client_follows_the_named_master_with_the_urls_credentials(sentinel_env):
    client = make_client(load_settings(sentinel_env), socket_connect_timeout=2, socket_timeout=5)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "m2fp-master"
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("m2fp", "p@ss/word", 3)
    assert "host" not in kwargs and kwargs["socket_timeout"] == 5
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"]) for s in sentinels] == [
        host for host, _ in ADDRESSES
    ]
    for sentinel in sentinels:
        sentinel_kwargs = sentinel.connection_pool.connection_kwargs
        # The sentinels get their own password, never the master's, and short timeouts.
        assert sentinel_kwargs["password"] == "sentinel-secret"
        assert sentinel_kwargs.get("username") is None
        assert sentinel_kwargs["socket_connect_timeout"] <= 1.0


def test_the_limiter_counts_through_the_sentinel_clients_pool(sentinel_env):
    settings = load_settings(sentinel_env)
    client = make_client(settings)
    uri, options = limiter_storage(settings, client)
    assert uri == "redis://" and options["connection_pool"] is client.connection_pool


def test_celery_broker_lists_every_sentinel_with_the_masters_credentials(sentinel_env):
    url, options = celery_broker(load_settings(sentinel_env))
    assert url == ";".join(
        f"sentinel://m2fp:p%40ss%2Fword@{host}:{port}/3"
        for host, port in (
            ("10.0.0.1", 26379),
            ("sentinel-b.internal", 26380),
            ("[fd00::3]", 26381),
        )
    )
    assert options["master_name"] == "m2fp-master"
    sentinel_options = options["sentinel_kwargs"]
    assert sentinel_options["password"] == "sentinel-secret"
    assert sentinel_options["socket_timeout"] == sentinel_options["socket_connect_timeout"] == 1.0
    assert sentinel_options["retry"].get_retries() == 0  # the other sentinels are the retries
    connection = kombu.Connection(url, transport_options=options)
    assert connection.transport_cls == "sentinel" and len(connection.alt) == 3
    assert (connection.userid, connection.password, connection.virtual_host) == (
        "m2fp",
        "p@ss/word",
        "3",
    )


def test_celery_app_in_sentinel_mode_keeps_the_services_transport_options(sentinel_env):
    settings = load_settings(sentinel_env)
    app = make_celery(settings)
    transport = app.conf.broker_transport_options
    assert transport["master_name"] == "m2fp-master"
    assert transport["visibility_timeout"] == settings.visibility_timeout
    assert app.conf.broker_url.startswith("sentinel://")


def test_sentinel_transport_options_without_a_password():
    options = sentinel_transport_options(RedisSentinel((("h", 1),), "m"))
    assert "password" not in options["sentinel_kwargs"]


def test_no_sentinel_answering_is_a_quick_503_with_retry_after(sentinel_env):
    """Every sentinel unreachable (as between a master's death and its replacement, when no
    master answers): the gateway's Redis calls fail with a RedisError, answered 503 JSON."""
    closed = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    settings = load_settings({**sentinel_env, "M2FP_REDIS_SENTINELS": closed})
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        make_client(settings, socket_connect_timeout=1).ping()
    # Quick: with redis-py's default retries on each sentinel, this took 8 s.
    assert time.monotonic() - started < 1.5
    app = create_app(settings)
    try:
        response = app.test_client().get(
            "/v1/jobs/" + "a" * 32, headers={"Authorization": "Bearer x"}
        )
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.json == {"error": "unavailable", "message": response.json["message"]}
        assert int(response.headers["Retry-After"]) >= 1
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 503 and ready.json["status"] == "unavailable"
        assert time.monotonic() - started < 10
    finally:
        app.extensions["m2fp"].celery.close()


def test_flower_follows_the_sentinels_it_is_given(monkeypatch):
    """`make run` gives Flower the sentinel variables: its Celery app then names the master."""
    from celery import Celery

    from shared.flower_readonly import follow_sentinels

    app = Celery("flower-test", set_as_current=False)
    for name in ("M2FP_REDIS_SENTINELS", "M2FP_REDIS_SENTINEL_MASTER"):
        monkeypatch.delenv(name, raising=False)
    assert not follow_sentinels(app)
    monkeypatch.setenv("M2FP_REDIS_SENTINELS", "127.0.0.1:26379")
    monkeypatch.setenv("M2FP_REDIS_SENTINEL_MASTER", "m2fp")
    monkeypatch.setenv("M2FP_REDIS_SENTINEL_PASSWORD", "sentinel-secret")
    assert follow_sentinels(app)
    options = app.conf.broker_transport_options
    assert options["master_name"] == "m2fp"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"


def test_make_run_with_sentinels_starts_no_redis_and_gives_flower_the_sentinels(sentinel_env):
    from scripts.stack import Stack, service_env

    stack = Stack()
    _, flower_broker, _ = service_env(stack, load_stack_settings(sentinel_env))
    assert stack.children == []  # no redis-server of its own
    assert flower_broker.startswith("sentinel://") and flower_broker.count(";") == 2
