"""The HTTP gateway: `create_app()` builds the Flask app from `shared.config.Settings`.

Importing this package opens no socket and reads no key: the Redis client, the job store, the
Celery producer and the limiter are built by the factory, lazily connecting on first use.
The gateway never imports torch or worker code; it sends the parse task by name.
"""

from __future__ import annotations

import logging

import flask
import redis
from celery import Celery
from werkzeug.middleware.proxy_fix import ProxyFix

from api import abuse, security
from api.errors import register_error_handlers
from api.metrics import Metrics
from api.routes import Gateway, bp
from api.validation import InMemoryRequest
from api.web import bp as web_bp
from shared.config import Settings, load_settings
from shared.jobstore import JobStore
from shared.logging import configure_logging, event
from shared.queue import make_celery
from shared.redis_conn import make_client

# Non-file multipart fields are not used: keep them small. Werkzeug also applies this bound to
# its decoder's buffer, which takes the body in 64 KiB reads, so it must stay well above that.
MAX_FORM_MEMORY_SIZE = 256 * 1024
MAX_FORM_PARTS = 8


def make_redis(settings: Settings) -> redis.Redis:
    """The gateway's Redis client (the master the sentinels name, when they are configured):
    short timeouts so that an outage or a failover is a quick 503."""
    return make_client(settings, socket_connect_timeout=2, socket_timeout=5)


def create_app(
    settings: Settings | None = None,
    *,
    redis_client: redis.Redis | None = None,
    celery_app: Celery | None = None,
) -> flask.Flask:
    """Build the gateway app (settings default: the environment via load_settings())."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    app = flask.Flask(__name__, static_folder=None)
    configure(app, settings)
    client = redis_client or make_redis(settings)
    store = JobStore.from_settings(settings, client)
    metrics = Metrics(store, settings.metrics_token)
    metrics.init_app(app)  # first: its timer sees every other hook
    security.init_app(app, settings)
    app.before_request(
        lambda: abuse.note_untrusted_forwarded_for(settings, metrics.untrusted_forwarded.inc)
    )
    limiter = abuse.make_limiter(app, settings, client)
    register_error_handlers(app, limiter, metrics.reject)
    app.extensions["m2fp"] = Gateway(
        settings=settings,
        redis=client,
        store=store,
        celery=celery_app or make_celery(settings),
        limiter=limiter,
        metrics=metrics,
    )
    app.register_blueprint(bp)
    app.register_blueprint(web_bp)
    return app


def configure(app: flask.Flask, settings: Settings) -> None:
    """In-memory uploads under the body limits; ProxyFix for exactly the trusted proxy hops."""
    app.request_class = InMemoryRequest
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        MAX_FORM_MEMORY_SIZE=MAX_FORM_MEMORY_SIZE,
        MAX_FORM_PARTS=MAX_FORM_PARTS,
        TRAP_HTTP_EXCEPTIONS=False,
        **{abuse.IPV6_PREFIX_CONFIG: settings.ipv6_prefix},
    )
    if settings.trusted_proxies:
        # Only the configured number of proxy hops may rewrite the peer address (RESEARCH §2.9).
        # X-Forwarded-Proto too: behind the TLS proxy the request was HTTPS, so HSTS is sent.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]  # Flask's middleware pattern
            app.wsgi_app,
            x_for=settings.trusted_proxies,
            x_proto=settings.trusted_proxies,
            x_host=0,
            x_port=0,
            x_prefix=0,
        )


def warm_up(app: flask.Flask) -> None:
    """Connect to Redis, load the job store's scripts and open a broker connection now.

    Called once per gunicorn worker process after the app is loaded, so that the first clients
    after a start do not pay for it (measured: the first submits took 65-130 ms instead of
    ~10 ms). Redis being down is no reason not to start: the gateway answers 503 until it is back.
    """
    gw = app.extensions["m2fp"]
    try:
        gw.redis.ping()
        gw.store.load_scripts()
        with gw.celery.pool.acquire(block=True, timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        event(
            logging.getLogger(__name__),
            "warm_up_failed",
            logging.WARNING,
            exc_type=type(exc).__name__,
        )
