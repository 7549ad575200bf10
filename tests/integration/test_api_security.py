"""Security headers and JSON errors of the gateway app on the session's real Redis: 413, 429 and 500
bodies, API keys and their limits, CORS on real submits, cross-site refusals before they count,
HSTS only behind a trusted TLS proxy. The offline checks are in tests/unit/test_api_security.py."""

from __future__ import annotations

import pytest

from shared.crypto import hash_secret, new_job_id
from tests.helpers import assert_secure, bearer, png_bytes, upload

pytestmark = pytest.mark.integration


def test_headers_and_json_on_413(make_app):
    client = make_app(M2FP_MAX_UPLOAD_BYTES="2048").test_client()
    response = upload(client, png_bytes(100, 100, noise=True))
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    assert_secure(response)


def test_500_is_bare_json_with_headers(app, client, monkeypatch):
    def explode(job_id):
        raise RuntimeError("/srv/m2fp/secret_module.py: torch 2.13 exploded")

    monkeypatch.setattr(app.extensions["m2fp"].store, "status", explode)
    response = client.get("/v1/jobs/" + new_job_id(), headers=bearer("A" * 43))
    assert response.status_code == 500
    assert response.get_json() == {
        "error": "internal_error",
        "message": "The server could not complete the request.",
    }
    assert "secret" not in response.get_data(as_text=True)
    assert_secure(response)


def test_headers_on_202_and_429(make_app):
    client = make_app(M2FP_SUBMIT_LIMIT="1/minute").test_client()
    assert_secure(upload(client, png_bytes()))
    limited = upload(client, png_bytes())
    assert limited.status_code == 429
    assert_secure(limited)


# --- API keys ---------------------------------------------------------------------------------
@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(
        f"# team A\n{hash_secret('key-alpha-0123456789')}\n\n"
        f"{hash_secret('key-beta-0123456789')}  # team B\n"
    )
    return str(path)


def test_api_keys_are_required_when_configured(make_app, keys_file):
    client = make_app(M2FP_API_KEYS_FILE=keys_file).test_client()
    no_key = upload(client, png_bytes())
    assert no_key.status_code == 401
    assert no_key.get_json() == {
        "error": "unauthorized",
        "message": "A valid API key is required in the 'X-API-Key' header.",
    }
    assert_secure(no_key)
    assert (
        upload(client, png_bytes(), headers={"X-API-Key": "key-gamma-0123456789"}).status_code
        == 401
    )
    assert (
        upload(
            client, png_bytes(), headers={"Authorization": "Bearer key-alpha-0123456789"}
        ).status_code
        == 401
    )
    ok = upload(client, png_bytes(), headers={"X-API-Key": "key-alpha-0123456789"})
    assert ok.status_code == 202
    job = ok.get_json()
    assert client.get(job["status_url"], headers=bearer(job["token"])).status_code == 401
    both = {**bearer(job["token"]), "X-API-Key": "key-beta-0123456789"}
    assert client.get(job["status_url"], headers=both).status_code == 200
    # Outside /v1 nothing needs a key.
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_each_api_key_has_its_own_limit(make_app, keys_file):
    client = make_app(M2FP_API_KEYS_FILE=keys_file, M2FP_SUBMIT_LIMIT="1/minute").test_client()
    alpha, beta = {"X-API-Key": "key-alpha-0123456789"}, {"X-API-Key": "key-beta-0123456789"}
    assert upload(client, png_bytes(), headers=alpha).status_code == 202
    assert upload(client, png_bytes(), headers=alpha).status_code == 429
    assert upload(client, png_bytes(), headers=beta).status_code == 202


def test_unconfigured_api_keys_cannot_mint_identities(make_app):
    """Without an API keys file, X-API-Key is not an identity: the peer address is."""
    client = make_app(M2FP_SUBMIT_LIMIT="1/minute").test_client()
    assert (
        upload(client, png_bytes(), headers={"X-API-Key": "random-one-0123456789"}).status_code
        == 202
    )
    assert (
        upload(client, png_bytes(), headers={"X-API-Key": "random-two-0123456789"}).status_code
        == 429
    )


# --- CORS -------------------------------------------------------------------------------------
def test_cors_only_for_listed_origins(make_app, keys_file):
    client = make_app(
        M2FP_CORS_ORIGINS="https://app.example", M2FP_API_KEYS_FILE=keys_file
    ).test_client()
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }
    allowed = client.options("/v1/jobs", headers={"Origin": "https://app.example", **preflight})
    assert allowed.status_code == 204  # no API key needed: browsers send none on a preflight
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert set(allowed.headers["Access-Control-Allow-Headers"].split(", ")) == {
        "Authorization",
        "X-API-Key",
        "Content-Type",
    }
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert_secure(allowed)
    for origin in (
        "https://evil.example",
        "https://app.example.evil.example",
        "http://app.example",
        "null",
    ):
        refused = client.options("/v1/jobs", headers={"Origin": origin, **preflight})
        assert not any(
            name.startswith("Access-Control-Allow") for name, _ in refused.headers.items()
        ), origin
    simple = upload(
        client,
        png_bytes(),
        headers={"Origin": "https://app.example", "X-API-Key": "key-alpha-0123456789"},
    )
    assert simple.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Location" in simple.headers["Access-Control-Expose-Headers"]
    assert "Origin" in simple.headers["Vary"]
    other = upload(
        client,
        png_bytes(),
        headers={"Origin": "https://evil.example", "X-API-Key": "key-alpha-0123456789"},
    )
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cross_site_submissions_are_refused_before_they_count(make_app, clean_redis):
    client = make_app(M2FP_BAN_AFTER="1", M2FP_SUBMIT_ATTEMPT_LIMIT="2/minute").test_client()
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    for _ in range(4):  # junk from another site's page: refused, no strike, no attempt spent
        refused = upload(client, b"junk", "x.png", headers=evil)
        assert refused.status_code == 403 and refused.get_json()["error"] == "cross_origin"
        assert_secure(refused)
    assert not list(clean_redis.scan_iter("m2fp:strikes:*"))
    same_site = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
    job = upload(client, png_bytes(), headers=same_site)  # the service's own page
    assert job.status_code == 202
    assert upload(client, png_bytes()).status_code == 202  # an API client
    withdraw = client.delete(
        job.get_json()["status_url"], headers={**bearer(job.get_json()["token"]), **evil}
    )
    assert withdraw.status_code == 403 and withdraw.get_json()["error"] == "cross_origin"


def test_hsts_only_for_https_as_the_trusted_proxy_says(make_app):
    behind = make_app(M2FP_TRUSTED_PROXIES="1").test_client()
    via_tls = behind.get(
        "/healthz",
        headers={"X-Forwarded-For": "192.0.2.1", "X-Forwarded-Proto": "https"},
        environ_base={"REMOTE_ADDR": "10.0.0.2"},
    )
    assert via_tls.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "Strict-Transport-Security" not in behind.get("/healthz").headers
    direct = make_app(M2FP_TRUSTED_PROXIES="0").test_client()
    spoofed = direct.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert (
        "Strict-Transport-Security" not in spoofed.headers
    )  # no trusted hop: the header means nothing
