"""Request ids, optional API keys, CORS for an exact allow-list, and security headers.

- Request id: a fresh uuid4 hex, or the client's `X-Request-ID` when it matches the strict
  `shared.constants.REQUEST_ID_RE` (8..64 letters, digits and inner hyphens); anything else is
  replaced. Bound to every log line of the request and echoed back.
- API keys (optional): with `M2FP_API_KEYS_FILE` set, the file holds one SHA-256 hex digest per
  line (`#` comments); every `/v1/*` call must send `X-API-Key` whose digest is listed (compared
  in constant time against every entry) or gets 401. `Authorization` is the job's bearer token.
- CORS: only origins listed in `M2FP_CORS_ORIGINS`, compared exactly; preflights are answered
  here (no API key needed, browsers do not send one); other origins get no CORS headers at all.
- Cross-site writes: a multipart POST is a CORS "simple" request, which any web page can make
  its visitors' browsers send (to spend their quota or get their address banned with junk).
  A state-changing `/v1/*` request whose `Origin` is neither this host nor a listed origin, or
  that says `Sec-Fetch-Site: cross-site` without such an Origin, gets a JSON 403
  `cross_origin` before anything else looks at it (no strike, no quota spent). API clients
  send neither header and are unaffected; the service's own page is same-origin.
- Headers on every response, errors included (`SECURITY_HEADERS`, the one definition of the
  CSP; the page's blueprint `api.web` reuses it): CSP, nosniff, no referrer, no framing, CORP, and
  `Cache-Control: no-store` (job data must not sit in any cache; the page's static files get
  `no-cache`, i.e. revalidate with their ETag).
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import flask

from shared import logging as slog
from shared.config import Settings
from shared.constants import REQUEST_ID_RE
from shared.crypto import hash_secret, secret_matches
from shared.errors import ConfigError, CrossOrigin, Unauthorized

log = logging.getLogger(__name__)

API_KEY_RE = re.compile(r"[\x21-\x7e]{16,256}")
HASH_RE = re.compile(r"[0-9a-f]{64}")
API_PREFIX = "/v1/"
STATIC_PREFIX = "/static/"
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
CORS_METHODS = "GET, POST, DELETE"
CORS_HEADERS = "Authorization, X-API-Key, Content-Type"
CORS_EXPOSE = "Location, Retry-After, X-Request-ID"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": "80", "https": "443"}


def load_api_key_hashes(path: str | None) -> tuple[str, ...]:
    """The SHA-256 digests listed in the API keys file (empty when no file is configured)."""
    if not path:
        return ()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"M2FP_API_KEYS_FILE={path!r} cannot be read: {exc.strerror}") from exc
    hashes = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not HASH_RE.fullmatch(entry):
            raise ConfigError(
                f"M2FP_API_KEYS_FILE line {number} is not a SHA-256 hex digest "
                "(make one with `python -m shared.keys hash-api-key`)"
            )
        hashes.append(entry)
    if not hashes:
        raise ConfigError(
            "M2FP_API_KEYS_FILE lists no key hashes; unset it to run without API keys"
        )
    return tuple(hashes)


def api_key_matches(presented: str, hashes: tuple[str, ...]) -> bool:
    """Constant-time membership: compares against every listed digest, without early exit."""
    matched = False
    for expected in hashes:
        matched |= secret_matches(presented, expected)
    return matched


def init_app(app: flask.Flask, settings: Settings) -> None:
    """Install the request-id, preflight, cross-site, API-key and header hooks on `app`, in order."""
    key_hashes = load_api_key_hashes(settings.api_keys_file)
    origins = frozenset(settings.cors_origins)
    app.before_request(bind_request_id)
    app.before_request(functools.partial(answer_preflight, origins))
    app.before_request(functools.partial(refuse_cross_site, origins))
    app.before_request(functools.partial(require_api_key, key_hashes))
    app.after_request(functools.partial(add_headers, origins))
    app.teardown_request(clear_log_context)


def request_id(supplied: str) -> str:
    """The client's X-Request-ID if it matches the strict pattern, else a fresh uuid4 hex."""
    return supplied if REQUEST_ID_RE.fullmatch(supplied) else uuid.uuid4().hex


def bind_request_id() -> None:
    """Give the request its id and bind it to every log line."""
    flask.g.request_id = request_id(flask.request.headers.get("X-Request-ID", ""))
    slog.clear()
    slog.bind(request_id=flask.g.request_id)


def answer_preflight(origins: frozenset[str]) -> flask.Response | None:
    """Answer a CORS preflight here (204); allow methods and headers only to a listed origin."""
    request = flask.request
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    response = flask.current_app.response_class(status=204)
    origin = request.headers.get("Origin", "")
    if request.path.startswith(API_PREFIX) and origin in origins:
        response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def refuse_cross_site(origins: frozenset[str]) -> None:
    """403 `cross_origin` for a state-changing /v1/* request from another site's page."""
    request = flask.request
    if (
        request.method in UNSAFE_METHODS
        and request.path.startswith(API_PREFIX)
        and not write_allowed(
            request.headers.get("Origin"),
            request.headers.get("Sec-Fetch-Site"),
            request.host,
            origins,
        )
    ):
        log.warning("cross_origin_refused")
        raise CrossOrigin()


def require_api_key(key_hashes: tuple[str, ...]) -> None:
    """With API keys configured, 401 for a /v1/* request without a listed `X-API-Key`."""
    if not key_hashes or not flask.request.path.startswith(API_PREFIX):
        return
    presented = flask.request.headers.get("X-API-Key", "")
    if not API_KEY_RE.fullmatch(presented) or not api_key_matches(presented, key_hashes):
        raise Unauthorized()
    flask.g.api_key_hash = hash_secret(presented)


def add_headers(origins: frozenset[str], response: flask.Response) -> flask.Response:
    """The security headers, the request id and (for a listed origin) CORS on every response."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if flask.request.path.startswith(STATIC_PREFIX) and response.status_code in (200, 304):
        # The page's own JS/CSS hold no job data; let Flask's revalidation headers stand.
        response.headers["Cache-Control"] = "no-cache"
    if flask.request.is_secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    response.headers["X-Request-ID"] = flask.g.get("request_id") or uuid.uuid4().hex
    add_cors(response, origins)
    return response


def clear_log_context(_exc: BaseException | None) -> None:
    """Drop the request's bound log fields."""
    slog.clear()


def _netloc(scheme: str, host: str) -> str:
    """host[:port] in lower case, without the scheme's default port."""
    host = host.lower()
    default = DEFAULT_PORTS.get(scheme)
    return host[: -len(default) - 1] if default and host.endswith(f":{default}") else host


def write_allowed(
    origin: str | None, fetch_site: str | None, host: str, origins: frozenset[str]
) -> bool:
    """Whether a state-changing request may proceed: no browser Origin, this host's, or listed."""
    if origin is None:
        # Browsers send Origin on every cross-site POST; Sec-Fetch-Site backs that up.
        return (fetch_site or "").lower() != "cross-site"
    if origin in origins:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return False  # "null" (sandboxed frames, file:) or anything else that is not a web origin
    # The scheme may differ behind a TLS proxy; the host (and explicit port) may not.
    return _netloc(parts.scheme, parts.netloc) in {_netloc(s, host) for s in DEFAULT_PORTS}


def add_cors(response: flask.Response, origins: frozenset[str]) -> None:
    """Allow an exactly listed origin to read a /v1/* response; nothing for any other origin."""
    if not flask.request.path.startswith(API_PREFIX):
        return
    response.vary.add("Origin")
    origin = flask.request.headers.get("Origin", "")
    if origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
