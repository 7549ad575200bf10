"""TLS to Redis (rediss://): M2FP_REDIS_CA_FILE in shared.config and what shared.redis_conn
builds from it. Every client must verify the server's certificate: redis-py does by default,
kombu (Celery's broker) accepts any certificate unless told, so the builders always tell it.

tests/integration/test_redis_tls.py does it against a real redis-server; test_multi_host.py
across hosts.
"""

from __future__ import annotations

import ssl

import pytest
import redis

from shared.config import ConfigError, load_settings, load_stack_settings
from shared.queue import make_celery
from shared.redis_conn import flower_broker_url, make_client, tls_options
from tests.helpers import certificate_authority

TLS_URL = "rediss://gateway:secret-password@redis.internal:6380/0"


@pytest.fixture
def ca_file(tmp_path) -> str:
    ca, _, _ = certificate_authority(tmp_path / "tls", "redis", dns_names=("redis.internal",))
    return str(ca)


def tls_settings(settings_env, ca_file: str | None, url: str = TLS_URL):
    env = {**settings_env, "M2FP_REDIS_URL": url}
    if ca_file:
        env["M2FP_REDIS_CA_FILE"] = ca_file
    return load_settings(env)


def test_the_ca_file_is_read_for_a_tls_url_only(settings_env, ca_file, tmp_path):
    assert tls_settings(settings_env, ca_file).redis_ca_file == ca_file
    assert load_settings(settings_env).redis_ca_file is None
    with pytest.raises(ConfigError, match="not a rediss:// URL"):
        tls_settings(settings_env, ca_file, url=settings_env["M2FP_REDIS_URL"])
    with pytest.raises(ConfigError, match=r"M2FP_REDIS_CA_FILE=.* is not a readable file"):
        tls_settings(settings_env, str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="not a readable file"):
        tls_settings(settings_env, str(tmp_path))  # a folder
    stack = load_stack_settings({"M2FP_REDIS_URL": TLS_URL, "M2FP_REDIS_CA_FILE": ca_file})
    assert stack.redis_ca_file == ca_file


def test_every_tls_client_verifies_the_certificate(settings_env, ca_file):
    plain = load_settings(settings_env)
    assert tls_options(plain) == {}
    assert not make_celery(plain).conf.broker_use_ssl  # Celery's default, False
    system = tls_settings(settings_env, None)
    assert tls_options(system) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # the system's CAs
    settings = tls_settings(settings_env, ca_file)
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_file}
    assert tls_options(settings) == expected
    pool = make_client(settings).connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert {k: pool.connection_kwargs[k] for k in expected} == expected
    app = make_celery(settings)
    assert app.conf.broker_use_ssl == expected
    with app.connection_for_write() as connection:
        assert connection.ssl == expected  # what kombu's Redis transport gives redis-py


def test_flower_gets_the_ca_in_its_broker_url(ca_file):
    url = flower_broker_url(TLS_URL, ca_file)
    assert url.startswith(TLS_URL + "?") and "ssl_cert_reqs=required" in url
    assert redis.connection.parse_url(url)["ssl_ca_certs"] == ca_file
    assert flower_broker_url(TLS_URL, None) == TLS_URL
    assert flower_broker_url("redis://:pw@redis:6379/0", ca_file) == "redis://:pw@redis:6379/0"
    given = TLS_URL + "?ssl_ca_certs=/etc/own.pem"
    assert flower_broker_url(given, ca_file) == given  # the operator's own query stays
