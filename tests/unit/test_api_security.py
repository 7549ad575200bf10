"""Security headers, JSON errors, request ids, API key files, CORS and OpenAPI, on an app whose
Redis is not running (the routes here never reach it). What needs Redis (413/429/500 bodies, API
keys and CORS on real submits, cross-site refusals, HSTS) is in tests/integration/test_api_security.py."""

from __future__ import annotations

import re

import pytest

from api import create_app
from api.security import CSP
from shared.config import load_settings
from shared.constants import JOB_ID_RE
from shared.crypto import new_job_id
from shared.errors import ConfigError
from tests.helpers import LEAKS, assert_secure


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


@pytest.mark.parametrize("content", ["", "# only a comment\n", "not-a-hash\n", "ABC" * 30 + "\n"])
def test_bad_api_key_files_fail_fast(settings_env, tmp_path, content):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ConfigError):
        create_app(load_settings({**settings_env, "M2FP_API_KEYS_FILE": str(path)}))
    with pytest.raises(ConfigError):
        create_app(load_settings({**settings_env, "M2FP_API_KEYS_FILE": str(tmp_path / "absent")}))


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
