"""gunicorn entry point: `gunicorn -c api/gunicorn_conf.py api.wsgi:app` (one app per process)."""

from api import create_app
from shared.config import load_settings
from shared.hardening import disable_core_dumps
from shared.watchdog import MemoryWatchdog

disable_core_dumps()  # before the keys or any request are held: no core dumps, not dumpable
settings = load_settings()
app = create_app(settings)
# Alerts (log, optional webhook) when memory use passes M2FP_MEMORY_ALERT_PERCENT.
watchdog = MemoryWatchdog(
    settings.memory_alert_percent, settings.alert_webhook, component="gateway"
).start()
