"""TLS to a real redis-server (TLS port only; a CA and certificate made by
tests/helpers.certificate_authority): the job store's client and a Celery producer built by
shared.redis_conn trust it through M2FP_REDIS_CA_FILE alone, and refuse it under another CA
(kombu would accept any certificate if it were not told to check)."""

from __future__ import annotations

import subprocess

import pytest
import redis
from kombu.exceptions import OperationalError

from shared.config import load_settings
from shared.queue import make_celery
from shared.redis_conn import make_client
from tests.conftest import free_port, stop_process, wait_for
from tests.helpers import certificate_authority

pytestmark = pytest.mark.integration


def tls_settings(settings_env, ca_file: str, url: str):
    return load_settings({**settings_env, "M2FP_REDIS_URL": url, "M2FP_REDIS_CA_FILE": ca_file})


def test_a_tls_only_redis_is_trusted_through_the_ca_file_alone(settings_env, tmp_path):
    ca, cert, key = certificate_authority(tmp_path / "tls", "redis", ip_addresses=("127.0.0.1",))
    other_ca, _, _ = certificate_authority(tmp_path / "other", "redis")
    port = free_port()
    config = [
        *("port 0", f"tls-port {port}", "bind 127.0.0.1", "tls-auth-clients no"),
        *(f"tls-cert-file {cert}", f"tls-key-file {key}", f"tls-ca-cert-file {ca}"),
        *('requirepass "secret-password"', 'save ""', "appendonly no", f"dir {tmp_path}"),
    ]
    proc = subprocess.Popen(["redis-server", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc.stdin.write(("\n".join(config) + "\n").encode())
    proc.stdin.close()
    url = f"rediss://:secret-password@127.0.0.1:{port}/0"
    try:
        trusted = tls_settings(settings_env, str(ca), url)
        wait_for(lambda: _pings(make_client(trusted)), 10, what="redis-server with TLS")
        with make_celery(trusted).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
        untrusted = tls_settings(settings_env, str(other_ca), url)
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            make_client(untrusted).ping()
        producer = make_celery(untrusted).connection_for_write()
        with producer, pytest.raises(OperationalError, match="CERTIFICATE_VERIFY_FAILED"):
            producer.ensure_connection(max_retries=1)
    finally:
        stop_process(proc)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()
