"""X-Request-ID: a client's id is kept only when it matches the one strict pattern
(`shared.constants.REQUEST_ID_RE`), which the gateway and gunicorn's access log share."""

from __future__ import annotations

import re
import uuid

import pytest

from api import create_app
from api.security import request_id
from shared.constants import REQUEST_ID_RE
from tests.conftest import REPO

FRESH = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    "supplied", ["trace-1234-abcd", "ABCDEFGH", str(uuid.uuid4()), uuid.uuid4().hex, "a" * 64]
)
def test_a_plain_client_id_is_kept(supplied):
    assert request_id(supplied) == supplied


@pytest.mark.parametrize(
    "supplied",
    [
        "",
        "short",  # under 8
        "a" * 65,  # over 64
        "--------",  # hyphens only
        "-leading-hyphen",
        "trailing-hyphen-",
        "has space",
        "dots.are.out",
        "under_score_id",
        "line\nbreak-id",
        "id-with-newline\n",
        "caf\u00e9-1234",
        "<script>alert(1)</script>",
    ],
)
def test_anything_else_is_replaced_by_a_fresh_id(supplied):
    replaced = request_id(supplied)
    assert replaced != supplied and FRESH.fullmatch(replaced)
    assert REQUEST_ID_RE.fullmatch(replaced)


def test_the_response_echoes_only_a_strict_id(settings):
    client = create_app(settings).test_client()
    kept = client.get("/healthz", headers={"X-Request-ID": "trace-1234-abcd"})
    assert kept.headers["X-Request-ID"] == "trace-1234-abcd"
    for bad in ("--------", "-abcdefgh", "abcdefgh-"):
        echoed = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert echoed != bad and FRESH.fullmatch(echoed)


def test_gunicorn_access_log_uses_the_same_pattern():
    source = (REPO / "api" / "gunicorn_conf.py").read_text()
    assert "REQUEST_ID_RE.fullmatch" in source and "{8,64}" not in source
