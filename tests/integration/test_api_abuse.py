"""Rate limits, bans, proxies, admission control, readiness and Redis outages, on a real Redis."""

from __future__ import annotations

import time

import pytest

from shared import heartbeat
from shared.config import load_settings
from shared.constants import BAN_PREFIX, LIMITER_PREFIX, STRIKES_PREFIX, worker_key
from shared.crypto import generate_key
from tests.conftest import free_port
from tests.helpers import METRICS_TOKEN, bearer, metrics_headers, png_bytes, upload

pytestmark = pytest.mark.integration


def test_submit_limit_gives_429_with_retry_after(make_app, clean_redis):
    client = make_app(M2FP_SUBMIT_LIMIT="2/minute").test_client()
    job = upload(client, png_bytes()).get_json()
    assert upload(client, png_bytes()).status_code == 202
    limited = upload(client, png_bytes())
    assert limited.status_code == 429
    assert limited.get_json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # Polling has its own bucket: a throttled submitter can still follow its jobs.
    assert client.get(job["status_url"], headers=bearer(job["token"])).status_code == 200
    keys = list(clean_redis.scan_iter(f"{LIMITER_PREFIX}:*"))
    assert keys and all(clean_redis.ttl(key) > 0 for key in keys)


def test_poll_limit_is_separate(make_app):
    client = make_app(M2FP_POLL_LIMIT="2/minute").test_client()
    job = upload(client, png_bytes()).get_json()
    for _ in range(2):
        assert client.get(job["status_url"], headers=bearer(job["token"])).status_code == 200
    limited = client.get(job["result_url"], headers=bearer(job["token"]))
    assert limited.status_code == 429 and "Retry-After" in limited.headers
    assert upload(client, png_bytes()).status_code == 202


def test_limits_are_shared_by_every_app_on_the_same_redis(make_app):
    """Two gateway processes (here: two apps) count against one limit: storage is Redis."""
    keys = (
        f"k1:{generate_key()}"  # gateways of one deployment share the keyring (and so pseudonyms)
    )
    first = make_app(M2FP_SUBMIT_LIMIT="1/minute", M2FP_DATA_KEYS=keys).test_client()
    second = make_app(M2FP_SUBMIT_LIMIT="1/minute", M2FP_DATA_KEYS=keys).test_client()
    assert upload(first, png_bytes()).status_code == 202
    assert upload(second, png_bytes()).status_code == 429


def test_invalid_uploads_do_not_spend_the_submit_limit(make_app):
    client = make_app(M2FP_SUBMIT_LIMIT="2/minute").test_client()
    for _ in range(3):
        assert upload(client, b"junk", "x.png").status_code == 415
    assert upload(client, png_bytes()).status_code == 202
    assert upload(client, png_bytes()).status_code == 202


def test_three_invalid_uploads_ban_the_client(make_app, clean_redis):
    client = make_app(M2FP_BAN_AFTER="3", M2FP_BAN_SECONDS="600").test_client()
    assert upload(client, png_bytes(), "x.gif").status_code == 415
    assert client.post("/v1/jobs", data={}).status_code == 400
    assert upload(client, png_bytes(), "x.jpg").status_code == 415
    banned = upload(client, png_bytes())
    assert banned.status_code == 403 and banned.get_json()["error"] == "banned"
    assert upload(client, b"junk", "x.png").status_code == 403  # refused before validation
    ban_keys = list(clean_redis.scan_iter(f"{BAN_PREFIX}:*"))
    assert len(ban_keys) == 1 and 0 < clean_redis.ttl(ban_keys[0]) <= 600
    assert not list(clean_redis.scan_iter(f"{STRIKES_PREFIX}:*"))


def test_a_valid_upload_resets_the_strikes(make_app, clean_redis):
    client = make_app(M2FP_BAN_AFTER="3").test_client()
    for _ in range(2):
        assert upload(client, b"junk", "x.png").status_code == 415
    strikes = list(clean_redis.scan_iter(f"{STRIKES_PREFIX}:*"))
    assert len(strikes) == 1 and clean_redis.ttl(strikes[0]) > 0
    assert upload(client, png_bytes()).status_code == 202
    for _ in range(2):
        assert upload(client, b"junk", "x.png").status_code == 415
    assert upload(client, png_bytes()).status_code == 202


def test_ban_after_zero_disables_bans(make_app, clean_redis):
    client = make_app(M2FP_BAN_AFTER="0").test_client()
    for _ in range(6):
        assert upload(client, b"junk", "x.png").status_code == 415
    assert upload(client, png_bytes()).status_code == 202
    assert not list(clean_redis.scan_iter(f"{BAN_PREFIX}:*"))
    assert not list(clean_redis.scan_iter(f"{STRIKES_PREFIX}:*"))


def test_spoofed_forwarded_for_is_ignored_without_trusted_proxies(make_app):
    client = make_app(M2FP_SUBMIT_LIMIT="1/minute", M2FP_TRUSTED_PROXIES="0").test_client()
    peer = {"REMOTE_ADDR": "10.0.0.7"}
    first = upload(client, png_bytes(), headers={"X-Forwarded-For": "1.1.1.1"}, environ_base=peer)
    second = upload(client, png_bytes(), headers={"X-Forwarded-For": "2.2.2.2"}, environ_base=peer)
    assert (first.status_code, second.status_code) == (202, 429)


def test_forwarded_for_is_honoured_for_trusted_hops(make_app):
    client = make_app(M2FP_SUBMIT_LIMIT="1/minute", M2FP_TRUSTED_PROXIES="1").test_client()
    peer = {"REMOTE_ADDR": "10.0.0.7"}  # the proxy

    def send(forwarded):
        return upload(
            client, png_bytes(), headers={"X-Forwarded-For": forwarded}, environ_base=peer
        )

    assert send("1.1.1.1").status_code == 202
    assert send("2.2.2.2").status_code == 202
    # Only the last hop (added by the trusted proxy) counts; a client-written first entry does not.
    assert send("9.9.9.9, 2.2.2.2").status_code == 429


def test_ban_follows_the_forwarded_client(make_app):
    client = make_app(M2FP_TRUSTED_PROXIES="1", M2FP_BAN_AFTER="1").test_client()
    peer = {"REMOTE_ADDR": "10.0.0.7"}
    assert (
        upload(
            client, b"junk", "x.png", headers={"X-Forwarded-For": "1.1.1.1"}, environ_base=peer
        ).status_code
        == 415
    )
    assert (
        upload(
            client, png_bytes(), headers={"X-Forwarded-For": "1.1.1.1"}, environ_base=peer
        ).status_code
        == 403
    )
    assert (
        upload(
            client, png_bytes(), headers={"X-Forwarded-For": "3.3.3.3"}, environ_base=peer
        ).status_code
        == 202
    )


def test_queue_full_gives_503_with_retry_after(make_app):
    client = make_app(M2FP_MAX_QUEUE="1").test_client()
    assert upload(client, png_bytes()).status_code == 202
    full = upload(client, png_bytes())
    assert full.status_code == 503
    assert full.get_json()["error"] == "queue_full"
    assert int(full.headers["Retry-After"]) > 0


@pytest.mark.parametrize("ban_after", ["3", "0"])  # 0: the first Redis call is the rate limiter's
def test_redis_unreachable_is_a_quick_503_never_a_500(ban_after):
    from api import create_app

    env = {
        "M2FP_REDIS_URL": f"redis://:pw@127.0.0.1:{free_port()}/0",
        "M2FP_DATA_KEYS": f"k1:{generate_key()}",
        "M2FP_BAN_AFTER": ban_after,
        "M2FP_METRICS_TOKEN": METRICS_TOKEN,
    }
    client = create_app(load_settings(env)).test_client()
    started = time.monotonic()
    responses = [
        upload(client, png_bytes()),
        client.get("/v1/jobs/" + "A" * 24, headers=bearer("B" * 43)),
        client.get("/v1/jobs/" + "A" * 24 + "/result", headers=bearer("B" * 43)),
        client.delete("/v1/jobs/" + "A" * 24, headers=bearer("B" * 43)),
    ]
    for response in responses:
        assert response.status_code == 503, response.get_json()
        assert response.get_json() == {
            "error": "unavailable",
            "message": "The service is temporarily unavailable; retry shortly.",
        }
        assert int(response.headers["Retry-After"]) > 0
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["status"] == "unavailable"
    assert "Retry-After" in ready.headers
    assert client.get("/healthz").status_code == 200
    metrics = client.get("/metrics", headers=metrics_headers())
    assert metrics.status_code == 200 and b"m2fp_redis_up 0.0" in metrics.data
    assert time.monotonic() - started < 20


def test_readyz_needs_a_live_worker_and_warns_when_untrained(client, clean_redis):
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.get_json()["status"] == "no_workers" and "Retry-After" in not_ready.headers
    heartbeat.beat(clean_redis, heartbeat.Heartbeat("w1@host", variant="cihp", device="cpu"))
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.get_json()
    summary = {key: body[key] for key in ("status", "workers", "untrained", "warnings")}
    assert summary == {"status": "ready", "workers": 1, "untrained": False, "warnings": []}
    assert body["batching"] == {"workers": 0, "max_batch": 1}
    heartbeat.beat(
        clean_redis,
        heartbeat.Heartbeat("w2@host", variant="cihp", device="cuda", untrained=True, batch=8),
    )
    body = client.get("/readyz").get_json()
    assert body["workers"] == 2 and body["untrained"] is True
    assert body["batching"] == {"workers": 1, "max_batch": 8}  # w2 batches up to 8 jobs
    assert any("UNTRAINED" in warning for warning in body["warnings"])
    assert "cuda" not in str(body) and "cihp" not in str(body)  # no model details
    # A worker whose heartbeat lapsed is not counted; one that stopped cleanly is gone at once.
    clean_redis.delete(worker_key("w2@host"))
    assert client.get("/readyz").get_json()["workers"] == 1
    heartbeat.remove(clean_redis, "w1@host")
    assert client.get("/readyz").status_code == 503
    assert clean_redis.zcard(heartbeat.INDEX_KEY) == 0


def test_readyz_reads_the_index_not_the_keyspace(client, clean_redis, monkeypatch):
    import redis as redis_module

    heartbeat.beat(clean_redis, heartbeat.Heartbeat("w1@host"))
    with clean_redis.pipeline(transaction=False) as pipe:
        for index in range(2000):
            pipe.set(f"m2fp:job:filler{index}", "x", ex=60)
        pipe.execute()

    def no_scan(*_args, **_kwargs):
        raise AssertionError("/readyz must not SCAN the keyspace")

    monkeypatch.setattr(redis_module.Redis, "scan_iter", no_scan)
    monkeypatch.setattr(redis_module.Redis, "scan", no_scan)
    assert client.get("/readyz").get_json()["workers"] == 1


def test_metrics_count_requests_rejections_and_jobs(make_app):
    client = make_app().test_client()
    upload(client, png_bytes())
    upload(client, b"junk", "x.png")
    client.get("/v1/jobs/" + "A" * 24)
    text = client.get("/metrics", headers=metrics_headers()).data.decode()
    assert 'm2fp_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert 'route="/v1/jobs/<job_id>",status="404"' in text
    assert 'm2fp_rejections_total{reason="type_mismatch"} 1.0' in text
    assert "m2fp_jobs_submitted_total 1.0" in text
    assert "m2fp_queue_depth 1.0" in text
    assert "m2fp_http_request_duration_seconds_bucket" in text
    assert "A" * 24 not in text  # route templates, never raw paths


def test_metrics_answer_only_the_scraper_with_its_token(make_app):
    client = make_app().test_client()
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-of-enough-length"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": METRICS_TOKEN},  # no scheme
        {"X-API-Key": METRICS_TOKEN},
    ):
        refused = client.get("/metrics", headers=headers)
        assert refused.status_code == 401, headers
        assert refused.get_json()["error"] == "unauthorized"
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert b"m2fp_http_requests_total" not in refused.data
    allowed = client.get("/metrics", headers=metrics_headers())
    assert allowed.status_code == 200 and b"m2fp_rejections_total" in allowed.data
    assert 'reason="unauthorized"} 5.0' in allowed.get_data(as_text=True)


def test_metrics_are_off_without_a_token(make_app):
    client = make_app(M2FP_METRICS_TOKEN="").test_client()
    off = client.get("/metrics", headers=metrics_headers())
    assert off.status_code == 404 and off.get_json()["error"] == "not_found"
    assert b"m2fp_" not in off.data


# --- fairness and bypasses (issue: the gateway holds under load and attack) -----------------
def test_strikes_survive_a_valid_upload_that_is_then_refused(make_app, clean_redis):
    """junk, junk, a tiny valid PNG refused with 429, junk: that is three strikes, a ban."""
    client = make_app(M2FP_BAN_AFTER="3", M2FP_SUBMIT_LIMIT="1/minute").test_client()
    assert upload(client, png_bytes()).status_code == 202  # spends the one submit
    assert upload(client, b"junk", "x.png").status_code == 415
    assert upload(client, b"junk", "x.png").status_code == 415
    refused = upload(client, png_bytes())
    assert refused.status_code == 429  # valid, but not admitted
    assert upload(client, b"junk", "x.png").status_code == 415  # third strike
    banned = upload(client, png_bytes())
    assert banned.status_code == 403 and banned.get_json()["error"] == "banned"


def test_an_admitted_job_clears_the_strikes(make_app, clean_redis):
    client = make_app(M2FP_BAN_AFTER="3").test_client()
    for _ in range(2):
        assert upload(client, b"junk", "x.png").status_code == 415
    assert upload(client, png_bytes()).status_code == 202
    assert not list(clean_redis.scan_iter(f"{STRIKES_PREFIX}:*"))


@pytest.mark.parametrize(
    ("prefix", "expected"), [("64", [202, 202, 429, 202]), ("128", [202, 202, 202, 202])]
)
def test_ipv6_peers_share_a_limit_per_prefix(make_app, prefix, expected):
    client = make_app(M2FP_SUBMIT_LIMIT="2/minute", M2FP_IPV6_PREFIX=prefix).test_client()
    peers = ["2001:db8:a:b::1", "2001:db8:a:b:ffff:1:2:3", "2001:db8:a:b::3", "2001:db8:a:c::1"]
    statuses = [
        upload(client, png_bytes(), environ_base={"REMOTE_ADDR": peer}).status_code
        for peer in peers
    ]
    assert statuses == expected


def test_ipv6_peers_of_one_prefix_share_a_ban(make_app):
    client = make_app(M2FP_BAN_AFTER="2").test_client()
    for peer in ("2001:db8:1:2::a", "2001:db8:1:2::b"):
        assert (
            upload(client, b"junk", "x.png", environ_base={"REMOTE_ADDR": peer}).status_code == 415
        )
    assert (
        upload(client, png_bytes(), environ_base={"REMOTE_ADDR": "2001:db8:1:2::c"}).status_code
        == 403
    )
    assert (
        upload(client, png_bytes(), environ_base={"REMOTE_ADDR": "2001:db8:1:3::c"}).status_code
        == 202
    )


def test_submit_attempts_are_metered_before_validation(make_app):
    client = make_app(M2FP_SUBMIT_ATTEMPT_LIMIT="3/minute").test_client()
    for _ in range(3):
        assert upload(client, b"junk", "x.png").status_code == 415
    limited = upload(client, png_bytes())
    assert limited.status_code == 429 and limited.get_json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    # Another client is not affected.
    assert upload(client, png_bytes(), environ_base={"REMOTE_ADDR": "192.0.2.9"}).status_code == 202


def test_jobs_in_flight_are_capped_per_client(make_app, clean_redis):
    app = make_app(M2FP_MAX_JOBS_PER_CLIENT="2")
    client, store = app.test_client(), app.extensions["m2fp"].store
    jobs = [upload(client, png_bytes()).get_json() for _ in range(2)]
    capped = upload(client, png_bytes())
    assert capped.status_code == 429 and capped.get_json()["error"] == "too_many_jobs"
    assert int(capped.headers["Retry-After"]) >= 1
    # The refused job left nothing behind: two inputs, two records.
    assert len(list(clean_redis.scan_iter("m2fp:in:*"))) == 2
    assert len(list(clean_redis.scan_iter("m2fp:job:*"))) == 2
    assert app.extensions["m2fp"].store.queue_depth("m2fp") == 2
    # Others are admitted; a finished or withdrawn job frees its slot.
    assert upload(client, png_bytes(), environ_base={"REMOTE_ADDR": "192.0.2.9"}).status_code == 202
    assert client.delete(jobs[0]["status_url"], headers=bearer(jobs[0]["token"])).status_code == 204
    assert upload(client, png_bytes()).status_code == 202
    store.fail(jobs[1]["job_id"], "internal_error")
    assert upload(client, png_bytes()).status_code == 202
    assert upload(client, png_bytes()).status_code == 429
    inflight = list(clean_redis.scan_iter("m2fp:inflight:*"))
    assert inflight and all(clean_redis.ttl(key) > 0 for key in inflight)
    assert all(b"127.0.0.1" not in key for key in inflight)  # a pseudonym, not the address


def test_jobs_in_flight_cap_zero_disables_it(make_app):
    client = make_app(M2FP_MAX_JOBS_PER_CLIENT="0").test_client()
    assert [upload(client, png_bytes()).status_code for _ in range(5)] == [202] * 5


def test_untrusted_forwarded_for_is_counted_and_warned_once(make_app, caplog, monkeypatch):
    from api import abuse

    monkeypatch.setattr(abuse, "_warned_untrusted_forwarded_for", False)
    client = make_app(M2FP_TRUSTED_PROXIES="0").test_client()
    with caplog.at_level("WARNING", logger="api.abuse"):
        for _ in range(3):
            assert (
                client.get("/healthz", headers={"X-Forwarded-For": "198.51.100.1"}).status_code
                == 200
            )
        client.get("/healthz")
    warnings = [r for r in caplog.records if r.getMessage() == "untrusted_forwarded_for"]
    assert len(warnings) == 1
    text = client.get("/metrics", headers=metrics_headers()).get_data(as_text=True)
    assert "m2fp_untrusted_forwarded_for_total 3.0" in text


def test_trusted_proxies_raise_no_forwarded_for_warning(make_app, caplog, monkeypatch):
    from api import abuse

    monkeypatch.setattr(abuse, "_warned_untrusted_forwarded_for", False)
    client = make_app(M2FP_TRUSTED_PROXIES="1").test_client()
    with caplog.at_level("WARNING", logger="api.abuse"):
        client.get("/healthz", headers={"X-Forwarded-For": "198.51.100.1"})
    assert not [r for r in caplog.records if r.getMessage() == "untrusted_forwarded_for"]
    assert "m2fp_untrusted_forwarded_for_total 0.0" in client.get(
        "/metrics", headers=metrics_headers()
    ).get_data(as_text=True)


def test_redis_and_logs_carry_no_client_address(make_app, clean_redis, capsys):
    client = make_app(M2FP_BAN_AFTER="1", M2FP_MAX_JOBS_PER_CLIENT="1").test_client()
    peer = {"REMOTE_ADDR": "198.51.100.77"}
    assert upload(client, png_bytes(), environ_base=peer).status_code == 202
    assert upload(client, png_bytes(), environ_base=peer).status_code == 429  # in-flight cap
    assert upload(client, b"junk", "x.png", environ_base=peer).status_code == 415  # strike, ban
    assert upload(client, png_bytes(), environ_base=peer).status_code == 403
    keys = [key.decode() for key in clean_redis.scan_iter("*")]
    assert any(key.startswith(f"{BAN_PREFIX}:") for key in keys)
    assert not [key for key in keys if "198.51.100.77" in key or "ip:" in key]
    assert "198.51.100.77" not in capsys.readouterr().err
