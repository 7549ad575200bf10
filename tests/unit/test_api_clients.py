"""Who a client is (IPv4 address, IPv6 prefix) and the per-request read deadline; no services."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from api.abuse import client_network
from api.read_deadline import ReadDeadlines
from shared.config import load_settings
from shared.errors import ConfigError


@pytest.mark.parametrize(
    ("address", "prefix", "expected"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff::9", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6/128"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),  # IPv4-mapped: the IPv4 client
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("not-an-address", 64, "invalid"),
        ("", 64, "invalid"),
        (None, 64, "invalid"),
    ],
)
def test_client_network(address, prefix, expected):
    assert client_network(address, prefix) == expected


def test_gateway_settings(settings_env):
    settings = load_settings(settings_env)
    assert (settings.gateway_workers, settings.gateway_threads, settings.request_read_timeout) == (
        2,
        16,
        30,
    )
    assert (settings.ipv6_prefix, settings.max_jobs_per_client, settings.submit_attempt_limit) == (
        64,
        3,
        "30/minute",
    )
    tuned = load_settings(
        {
            **settings_env,
            "M2FP_GATEWAY_WORKERS": "4",
            "M2FP_GATEWAY_THREADS": "8",
            "M2FP_REQUEST_READ_TIMEOUT": "5",
            "M2FP_IPV6_PREFIX": "56",
            "M2FP_MAX_JOBS_PER_CLIENT": "0",
            "M2FP_SUBMIT_ATTEMPT_LIMIT": "10/second",
        }
    )
    assert (tuned.gateway_workers, tuned.gateway_threads, tuned.request_read_timeout) == (4, 8, 5)
    assert (tuned.ipv6_prefix, tuned.max_jobs_per_client, tuned.submit_attempt_limit) == (
        56,
        0,
        "10/second",
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("M2FP_IPV6_PREFIX", "129"),
        ("M2FP_IPV6_PREFIX", "8"),
        ("M2FP_GATEWAY_WORKERS", "0"),
        ("M2FP_GATEWAY_THREADS", "x"),
        ("M2FP_REQUEST_READ_TIMEOUT", "0"),
        ("M2FP_SUBMIT_ATTEMPT_LIMIT", "lots"),
    ],
)
def test_gateway_settings_fail_fast(settings_env, name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({**settings_env, name: value})


def _reader(sock: socket.socket, out: dict) -> None:
    started = time.monotonic()
    received = b""
    while True:
        chunk = sock.recv(1024)
        if not chunk:
            break
        received += chunk
    out.update(seconds=time.monotonic() - started, received=received)


def test_a_deadline_cuts_a_trickling_reader_but_not_the_write_side():
    deadlines = ReadDeadlines()
    server, client = socket.socketpair()
    with server, client:
        entry = deadlines.arm(server, 0.5)
        out: dict = {}
        reader = threading.Thread(target=_reader, args=(server, out))
        reader.start()
        for _ in range(20):  # one byte every 0.1 s: each recv returns in time
            if not reader.is_alive():
                break
            try:
                client.send(b"x")
            except OSError:
                break
            time.sleep(0.1)
        reader.join(5)
        assert not reader.is_alive(), "the deadline did not end the read"
        assert out["seconds"] < 3 and 0 < len(out["received"]) < 20
        assert deadlines.fired(server) and deadlines.fired_total == 1
        server.sendall(b"408")  # the response still goes out
        assert client.recv(16) == b"408"
        deadlines.disarm(entry)
        assert not deadlines.fired(server)


def test_a_disarmed_deadline_never_fires():
    deadlines = ReadDeadlines()
    server, client = socket.socketpair()
    with server, client:
        deadlines.disarm(deadlines.arm(server, 0.2))
        keep = deadlines.arm(client, 30)
        time.sleep(0.5)
        client.sendall(b"still open")
        assert server.recv(16) == b"still open"
        assert not deadlines.fired(server) and deadlines.fired_total == 0
        deadlines.disarm(keep)
