"""The web page at `/`: upload a photo, watch its job, see the parsing drawn in the browser.

The page is one Jinja template plus static JS/CSS (no CDN, no inline script or style, so the
gateway's strict CSP holds). The browser talks to the same v1 API as any client; the server
never sees anything the page does with the result. The only server-side input to the template
is the upload limits, so the page can refuse a file before sending it.
"""

from __future__ import annotations

import flask

from api.security import SECURITY_HEADERS
from shared.config import Settings

# The gateway's own CSP and content headers (api.security sets them on every response); set here
# too so the page is never served without them, e.g. on a bare app in a test.
PAGE_HEADERS = {
    name: SECURITY_HEADERS[name]
    for name in ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy")
}

bp = flask.Blueprint(
    "web", __name__, static_folder="static", static_url_path="/static", template_folder="templates"
)


def upload_limits() -> dict[str, int]:
    """The limits the page checks before uploading: bytes, pixels, longest side."""
    gateway = flask.current_app.extensions.get("m2fp")
    settings = getattr(gateway, "settings", None)
    return {
        name: int(getattr(settings, name, None) or _default(name))
        for name in ("max_upload_bytes", "max_pixels", "max_image_side")
    }


def _default(name: str) -> int:
    """A Settings field's default (a bare app in a test has no settings)."""
    default = Settings.__dataclass_fields__[name].default
    assert isinstance(default, int)
    return default


@bp.get("/")
def index() -> flask.Response:
    """The upload page."""
    response = flask.make_response(flask.render_template("index.html", limits=upload_limits()))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.after_request
def page_headers(response: flask.Response) -> flask.Response:
    """Security headers on the page and its static files (the app's own hooks may overwrite them)."""
    for name, value in PAGE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
