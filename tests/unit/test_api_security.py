"""Security headers, JSON errors without internals, request ids, API keys, CORS, OpenAPI."""

from __future__ import annotations

import re

import pytest

from api import create_app
from api.routes import JOB_ID_RE
from api.security import CSP
from shared.config import load_settings
from shared.crypto import hash_secret, new_job_id
from shared.errors import ConfigError
from tests.unit.test_api_helpers import (  # noqa: F401  (fixtures)
    app,
    bearer,
    client,
    make_app,
    png_bytes,
    upload,
)

EXPECTED_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
LEAKS = re.compile(
    r"Traceback|/work/|\.py\b|site-packages|werkzeug|flask|gunicorn|redis-py|torch", re.I
)


def assert_secure(response) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert "Server" not in response.headers
    assert not LEAKS.search(response.get_data(as_text=True))


@pytest.fixture
def offline_app(settings):
    """An app whose Redis is not running: enough for routes that never touch it."""
    return create_app(settings)


def test_csp_is_the_agreed_policy():
    assert CSP == (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


def test_headers_and_json_on_200_404_405(offline_app):
    client = offline_app.test_client()
    ok = client.get("/healthz")
    assert ok.status_code == 200 and ok.get_json() == {"status": "ok"}
    assert_secure(ok)
    missing = client.get("/no/such/page")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": "not_found", "message": "No such resource."}
    assert_secure(missing)
    wrong_method = client.put("/v1/jobs")
    assert wrong_method.status_code == 405
    assert wrong_method.get_json()["error"] == "method_not_allowed"
    assert "POST" in wrong_method.headers["Allow"]
    assert_secure(wrong_method)


@pytest.mark.integration
def test_headers_and_json_on_413(make_app):
    client = make_app(M2FP_MAX_UPLOAD_BYTES="2048").test_client()
    response = upload(client, png_bytes(100, 100, noise=True))
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    assert_secure(response)


@pytest.mark.integration
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


@pytest.mark.integration
def test_headers_on_202_and_429(make_app):
    client = make_app(M2FP_SUBMIT_LIMIT="1/minute").test_client()
    assert_secure(upload(client, png_bytes()))
    limited = upload(client, png_bytes())
    assert limited.status_code == 429
    assert_secure(limited)


def test_request_id_is_generated_or_a_safe_client_one(offline_app):
    client = offline_app.test_client()
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert (
        client.get("/healthz", headers={"X-Request-ID": "trace-1234-abcd"}).headers["X-Request-ID"]
        == "trace-1234-abcd"
    )
    for bad in (
        "short",
        "has space in it",
        "x" * 65,
        "<script>alert(1)</script>",
        "a\u00e9bcdefgh",
    ):
        echoed = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert echoed != bad and re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_job_id_pattern_matches_the_generator():
    for _ in range(200):
        assert JOB_ID_RE.fullmatch(new_job_id())


# --- API keys ---------------------------------------------------------------------------------
@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(
        f"# team A\n{hash_secret('key-alpha-0123456789')}\n\n"
        f"{hash_secret('key-beta-0123456789')}  # team B\n"
    )
    return str(path)


@pytest.mark.integration
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


@pytest.mark.integration
def test_each_api_key_has_its_own_limit(make_app, keys_file):
    client = make_app(M2FP_API_KEYS_FILE=keys_file, M2FP_SUBMIT_LIMIT="1/minute").test_client()
    alpha, beta = {"X-API-Key": "key-alpha-0123456789"}, {"X-API-Key": "key-beta-0123456789"}
    assert upload(client, png_bytes(), headers=alpha).status_code == 202
    assert upload(client, png_bytes(), headers=alpha).status_code == 429
    assert upload(client, png_bytes(), headers=beta).status_code == 202


@pytest.mark.integration
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


@pytest.mark.parametrize("content", ["", "# only a comment\n", "not-a-hash\n", "ABC" * 30 + "\n"])
def test_bad_api_key_files_fail_fast(settings_env, tmp_path, content):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ConfigError):
        create_app(load_settings({**settings_env, "M2FP_API_KEYS_FILE": str(path)}))
    with pytest.raises(ConfigError):
        create_app(load_settings({**settings_env, "M2FP_API_KEYS_FILE": str(tmp_path / "absent")}))


# --- CORS -------------------------------------------------------------------------------------
@pytest.mark.integration
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
        assert not any(h.startswith("Access-Control-Allow") for h in refused.headers.keys()), origin
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


def test_no_cors_without_an_allow_list(offline_app):
    response = offline_app.test_client().options(
        "/v1/jobs",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert "Access-Control-Allow-Origin" not in response.headers


# --- OpenAPI ----------------------------------------------------------------------------------
def test_openapi_documents_every_route(offline_app):
    document = offline_app.test_client().get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    for rule in offline_app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        assert path in document["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = document["paths"][path].get(method.lower())
            assert operation and operation["responses"], (path, method)
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule), method.lower())
        for rule in offline_app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == served
    codes = set(document["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    assert {
        "missing_image",
        "payload_too_large",
        "image_too_large",
        "unsupported_type",
        "type_mismatch",
        "undecodable_image",
        "rate_limited",
        "banned",
        "queue_full",
        "unavailable",
        "not_found",
        "result_gone",
        "not_ready",
        "unauthorized",
    } <= codes
    submit = document["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"202", "400", "401", "403", "413", "415", "422", "429", "503"} <= set(submit)


def test_openapi_leaks_nothing_about_the_deployment(offline_app):
    text = offline_app.test_client().get("/openapi.json").get_data(as_text=True)
    assert not LEAKS.search(text)


# --- cross-site submissions ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("origin", "fetch_site", "host", "allowed"),
    [
        (None, None, "svc.example", True),  # an API client: no browser headers
        (None, "same-origin", "svc.example", True),
        (None, "none", "svc.example", True),  # typed into the address bar
        (None, "cross-site", "svc.example", False),
        ("https://svc.example", "same-origin", "svc.example", True),
        (
            "http://svc.example",
            None,
            "svc.example",
            True,
        ),  # TLS ends at the proxy: scheme may differ
        ("https://svc.example", None, "svc.example:443", True),  # default port written out
        ("http://127.0.0.1:8000", None, "127.0.0.1:8000", True),
        ("http://127.0.0.1:8001", None, "127.0.0.1:8000", False),  # another port is another origin
        ("https://evil.example", "cross-site", "svc.example", False),
        ("https://svc.example.evil.example", None, "svc.example", False),
        (
            "https://evil.example",
            None,
            "svc.example",
            False,
        ),  # Origin decides even without Sec-Fetch-Site
        ("null", "cross-site", "svc.example", False),  # sandboxed frame, file: page
        ("https://app.example", "cross-site", "svc.example", True),  # listed in M2FP_CORS_ORIGINS
    ],
)
def test_write_allowed(origin, fetch_site, host, allowed):
    from api.security import write_allowed

    assert write_allowed(origin, fetch_site, host, frozenset({"https://app.example"})) is allowed


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
