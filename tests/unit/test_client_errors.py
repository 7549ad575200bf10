"""m2fp_client.errors: every error code of the contract raises its class (through a real HTTP
exchange with the scripted double), unknown codes fall back on the status, and non-JSON error
bodies still raise typed errors."""

from __future__ import annotations

import pytest

from m2fp_client import (
    Banned,
    InvalidImage,
    NotReady,
    RateLimited,
    ResultGone,
    ServerUnavailable,
    Unauthorized,
)
from m2fp_client.errors import BadRequest, M2FPError, NotFound, error_for
from tests.unit.client_doubles import make_client


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "missing_image", BadRequest),
        (401, "unauthorized", Unauthorized),
        (403, "banned", Banned),
        (404, "not_found", NotFound),
        (409, "not_ready", NotReady),
        (410, "result_gone", ResultGone),
        (413, "payload_too_large", InvalidImage),
        (413, "image_too_large", InvalidImage),
        (415, "unsupported_type", InvalidImage),
        (415, "type_mismatch", InvalidImage),
        (422, "undecodable_image", InvalidImage),
        (429, "rate_limited", RateLimited),
        (503, "queue_full", ServerUnavailable),
        (503, "unavailable", ServerUnavailable),
    ],
)
def test_every_contract_error_maps_to_its_class(server, sleeps, status, code, cls):
    server.responses = [(status, {}, {"error": code, "message": f"the {code} sentence"})]
    with pytest.raises(cls) as info:
        make_client(server.url, sleeps, max_retries=0).submit(b"x", filename="a.jpg")
    assert (info.value.code, info.value.status, info.value.message) == (
        code,
        status,
        f"the {code} sentence",
    )


def test_unknown_codes_fall_back_on_the_status():
    assert type(error_for("brand_new", "m", 422)) is InvalidImage
    assert type(error_for("brand_new", "m", 502)) is ServerUnavailable
    assert type(error_for("brand_new", "m", 418)) is M2FPError


def test_non_json_error_bodies_still_raise_typed_errors(server, sleeps):
    server.responses = [(502, {}, b"<html>bad gateway</html>")]
    with pytest.raises(ServerUnavailable) as info:
        make_client(server.url, sleeps, max_retries=0).health()
    assert info.value.code == "http_502"
