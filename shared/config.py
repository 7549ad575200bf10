"""All configuration, read from `M2FP_*` environment variables in this one place.

`load_settings()` turns the environment into a frozen `Settings`; nothing else in the project
reads `os.environ` for configuration. It fails fast, naming the variable, when a secret is
missing or a value is invalid. There are no insecure defaults outside an explicit dev mode
(`M2FP_DEV_MODE=1`, which only relaxes the "Redis must have a password" rule and says so).

Secrets may be given inline or, better, as files (`*_FILE` variants, e.g. Docker/Kubernetes
secrets): `M2FP_DATA_KEYS` / `M2FP_DATA_KEYS_FILE` (the keyring) and `M2FP_REDIS_URL` /
`M2FP_REDIS_URL_FILE`. Every variable is documented in README.md and `.env.example`
(tests/unit/test_shared_env_docs.py checks both lists against what this module reads).

Besides `load_settings()`, four readers that need no Redis or keys: `deform_attn_mode()` and
`precision_mode()` (the offline CLI and the Predictor), `prometheus_multiproc_dir()` (prometheus_client's own variable,
for the gateway's /metrics under gunicorn), `redis_sentinel()` (Flower, which gets the sentinels
but not the keys) and `load_stack_settings()` (`make run`, which generates the keys and starts
the Redis that `load_settings` then requires).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from shared.constants import CHECKPOINT_FILE, RANDOM_WEIGHTS
from shared.crypto import Keyring
from shared.errors import ConfigError

RATE_LIMIT_RE = re.compile(
    r"^\s*\d+\s*(/|\s+per\s+)\s*(\d+\s+)?(second|minute|hour|day)s?\s*$", re.I
)
VARIANTS = ("cihp", "lip")
TEST_VARIANTS = ("tiny",)  # test-only network, see _check_variant
DEFORM_ATTN_MODES = (
    "auto",
    "op",
    "reference",
)  # compiled deformable-attention op or the PyTorch reference
PRECISION_MODES = (
    "auto",
    "fp32",
    "bf16x3",
    "bf16",
    "int8",
)  # M2FP_PRECISION, see worker/m2fp/precision.py
WINOGRAD_MODES = ("auto", "off")  # M2FP_WINOGRAD, see worker/m2fp/winograd.py
BATCHING_MODES = ("auto", "on", "off")  # M2FP_BATCHING: on CUDA only, always, never
DEFAULT_WEIGHTS_DIR = "weights/cihp"
PROMETHEUS_MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
SENTINEL_MASTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SENTINEL_ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})")


def torch_threads_per_child(torch_threads: int | None, processes: int) -> int:
    """Torch threads of each of `processes` pool processes on one host: `torch_threads` when
    set (M2FP_TORCH_THREADS), else the cores shared out so processes x threads <= cores
    (RESEARCH §2.2)."""
    if torch_threads:
        return torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, processes))


@dataclass(frozen=True)
class RedisSentinel:
    """Redis Sentinel: where to ask for the master's address (M2FP_REDIS_SENTINELS,
    M2FP_REDIS_SENTINEL_MASTER) and the sentinels' own password (M2FP_REDIS_SENTINEL_PASSWORD).
    The master's user, password and database still come from M2FP_REDIS_URL."""

    addresses: tuple[tuple[str, int], ...]
    master: str
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    """The service's settings; see README.md 'Configuration' for each variable."""

    redis_url: str = field(repr=False)
    keyring: Keyring = field(repr=False)
    dev_mode: bool = False
    redis_sentinel: RedisSentinel | None = None  # set: follow the master the sentinels name
    redis_ca_file: str | None = None  # rediss://: the CA of Redis's certificate (else the system's)
    # gateway
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_image_side: int = 10_000
    submit_limit: str = "5/minute"
    poll_limit: str = "120/minute"
    ban_after: int = 3
    ban_seconds: int = 3600
    max_queue: int = 100
    max_jobs_per_client: int = 3
    submit_attempt_limit: str = "30/minute"
    trusted_proxies: int = 0
    ipv6_prefix: int = 64
    gateway_workers: int = 2
    gateway_threads: int = 16
    request_read_timeout: int = 30
    api_keys_file: str | None = None
    cors_origins: tuple[str, ...] = ()
    # job lifecycle
    input_ttl: int = 600
    result_ttl: int = 600
    max_attempts: int = 2
    soft_time_limit: int = 300
    hard_time_limit: int = 360
    # worker / model
    weights: str | None = None
    weights_sha256: str | None = None
    weights_key_file: str | None = None
    variant: str = "cihp"
    device: str = "auto"
    worker_concurrency: int = 1
    torch_threads: int | None = None
    infer_max_side: int = 1920
    deform_attn: str = "auto"
    precision: str = "auto"
    winograd: str = "auto"
    max_memory_per_child_kb: int | None = None
    max_decode_mb: int = 128
    child_memory_limit_mb: int | None = 4096
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = 9100
    # dynamic batching (worker/batching.py): "auto" is resolved by `python -m worker`
    batching: str = "auto"
    gpu_batch: int = 8
    batch_wait_ms: int = 10
    # operations
    log_level: str = "INFO"
    memory_alert_percent: float = 90.0
    alert_webhook: str | None = None
    metrics_token: str | None = field(default=None, repr=False)  # unset: /metrics is off

    @property
    def job_ttl(self) -> int:
        """The job record outlives input and result so that a poll can say 'expired', not 404."""
        return self.input_ttl + self.result_ttl + self.hard_time_limit + 300

    @property
    def visibility_timeout(self) -> int:
        """Redis broker redelivery timeout: longer than the hard time limit (RESEARCH §2.5)."""
        return self.hard_time_limit + 60

    def torch_threads_per_child(self, workers_on_host: int = 1) -> int:
        """Torch threads of each pool process, with `workers_on_host` workers of this concurrency."""
        return torch_threads_per_child(
            self.torch_threads, workers_on_host * self.worker_concurrency
        )


@dataclass(frozen=True)
class StackSettings:
    """What `make run` (scripts/stack.py) needs before the services' own settings can load."""

    workers: int = 1
    worker_concurrency: int = 1
    torch_threads: int | None = None
    redis_url: str | None = field(default=None, repr=False)  # unset: make run starts its own
    redis_sentinel: RedisSentinel | None = None  # set: make run starts no Redis
    redis_ca_file: str | None = None  # for a rediss:// M2FP_REDIS_URL (Flower's broker URL too)
    redis_port: int = 6380
    has_data_keys: bool = False  # unset: make run generates a keyring
    weights: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    worker_metrics_port: int = 9100
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: str | None = field(default=None, repr=False)  # unset: generated
    has_metrics_token: bool = False  # unset: make run generates one


def _read_secret(env: Mapping[str, str], name: str) -> str | None:
    inline, path = env.get(name), env.get(f"{name}_FILE")
    if inline and path:
        raise ConfigError(f"set either {name} or {name}_FILE, not both")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from exc
    return inline.strip() if inline else None


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bounded(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    value = _int(env, name, default, minimum)
    if value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be 0/1/true/false, got {raw!r}")


def _rate(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, default).strip()
    if not RATE_LIMIT_RE.match(value):
        raise ConfigError(f"{name} must look like '5/minute' or '100 per hour', got {value!r}")
    return value


def _check_redis_url(url: str, dev_mode: bool, sentinel: RedisSentinel | None = None) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("M2FP_REDIS_URL must be a redis://, rediss:// or unix:// URL")
    if sentinel is not None and parsed.scheme != "redis":
        raise ConfigError(
            "with M2FP_REDIS_SENTINELS, M2FP_REDIS_URL must be a redis:// URL (it gives the user, "
            "password and database; its host is ignored); TLS through Sentinel is not supported yet"
        )
    if not parsed.password and not dev_mode:
        raise ConfigError(
            "M2FP_REDIS_URL has no password; Redis must require one "
            "(set M2FP_DEV_MODE=1 to allow this on a development machine only)"
        )


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    """A lower-cased value of `name` among `choices` (blank: `default`), else a ConfigError."""
    value = env.get(name, default).strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def deform_attn_mode(env: Mapping[str, str] | None = None) -> str:
    """M2FP_DEFORM_ATTN: `auto` (compiled op when built, else reference), `op` (required) or `reference`.

    Read on its own too, because the offline CLI and the Predictor need no Redis or keys.
    """
    return _choice(
        os.environ if env is None else env, "M2FP_DEFORM_ATTN", DEFORM_ATTN_MODES, "auto"
    )


def precision_mode(env: Mapping[str, str] | None = None) -> str:
    """M2FP_PRECISION: `auto` (what worker.m2fp.precision finds agrees with fp32 on this CPU:
    bf16x3 where it has AMX-BF16, fp32 elsewhere), `fp32`, `bf16x3`, `bf16` or `int8`.

    Read on its own too, for the offline CLI and the Predictor (no Redis or keys needed).
    """
    return _choice(os.environ if env is None else env, "M2FP_PRECISION", PRECISION_MODES, "auto")


def winograd_mode(env: Mapping[str, str] | None = None) -> str:
    """M2FP_WINOGRAD: `auto` (the 3x3 convolutions this CPU's plan names run as Winograd, where
    the compiled transforms load and the precision is fp32) or `off` (direct convolution).

    Read on its own too, for the offline CLI and the Predictor (no Redis or keys needed).
    """
    return _choice(os.environ if env is None else env, "M2FP_WINOGRAD", WINOGRAD_MODES, "auto")


def prometheus_multiproc_dir(env: Mapping[str, str] | None = None) -> str | None:
    """PROMETHEUS_MULTIPROC_DIR (prometheus_client's own variable, which it also reads at import):
    where gunicorn's processes write their metric values, or None for one-process metrics."""
    env = os.environ if env is None else env
    return env.get(PROMETHEUS_MULTIPROC_VARIABLE) or None


def redis_sentinel(env: Mapping[str, str] | None = None) -> RedisSentinel | None:
    """M2FP_REDIS_SENTINELS (`host:port,...`) and M2FP_REDIS_SENTINEL_MASTER, both or neither,
    and the sentinels' password (M2FP_REDIS_SENTINEL_PASSWORD or its _FILE).

    A sentinel that anyone can reach unauthenticated can be told to name another master, so its
    password is required outside dev mode (checked by `load_settings`). Read on its own too:
    Flower (shared.flower_readonly) gets the sentinels but none of the service's other secrets.
    """
    env = os.environ if env is None else env
    listed = env.get("M2FP_REDIS_SENTINELS", "").strip()
    master = env.get("M2FP_REDIS_SENTINEL_MASTER", "").strip()
    password = _read_secret(env, "M2FP_REDIS_SENTINEL_PASSWORD")
    if not listed and not master:
        if password:
            raise ConfigError("M2FP_REDIS_SENTINEL_PASSWORD is set but M2FP_REDIS_SENTINELS is not")
        return None
    if not listed or not master:
        raise ConfigError(
            "set both M2FP_REDIS_SENTINELS and M2FP_REDIS_SENTINEL_MASTER, or neither"
        )
    if not SENTINEL_MASTER_RE.fullmatch(master):
        raise ConfigError(
            f"M2FP_REDIS_SENTINEL_MASTER must be a name of letters, digits, . _ -, got {master!r}"
        )
    addresses = tuple(_sentinel_address(item) for item in listed.split(","))
    if len(set(addresses)) != len(addresses):
        raise ConfigError("M2FP_REDIS_SENTINELS lists a sentinel twice")
    return RedisSentinel(addresses, master, password)


def _sentinel_address(item: str) -> tuple[str, int]:
    """One `host:port` (or `[v6]:port`) of M2FP_REDIS_SENTINELS."""
    text = item.strip()
    match = SENTINEL_ADDRESS_RE.fullmatch(text)
    if not match or not 1 <= int(match[2]) <= 65535:
        raise ConfigError(
            f"M2FP_REDIS_SENTINELS must be host:port[,host:port...] ([v6]:port), got {text!r}"
        )
    return match[1].strip("[]"), int(match[2])


def redis_ca_file(env: Mapping[str, str], redis_url: str | None) -> str | None:
    """M2FP_REDIS_CA_FILE: the CA certificate(s), PEM, that signed Redis's TLS certificate.

    Only with a rediss:// URL; unset, the system's CAs are trusted. Either way every client
    (redis-py, Celery's broker, the limiter) verifies the certificate and the host name.
    """
    path = (env.get("M2FP_REDIS_CA_FILE") or "").strip() or None
    if path is None:
        return None
    if not (redis_url or "").startswith("rediss://"):
        raise ConfigError("M2FP_REDIS_CA_FILE is set but M2FP_REDIS_URL is not a rediss:// URL")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"M2FP_REDIS_CA_FILE={path!r} is not a readable file")
    return path


def environment() -> dict[str, str]:
    """A copy of this process's environment, for the children `make run` and the tests start."""
    return dict(os.environ)


def load_stack_settings(env: Mapping[str, str] | None = None) -> StackSettings:
    """`make run`'s settings: numbers of workers and threads, ports, Flower's login."""
    env = os.environ if env is None else env
    # M2FP_REDIS_URL or its _FILE: either one means "use that Redis, start none".
    sentinel, redis_url = redis_sentinel(env), _read_secret(env, "M2FP_REDIS_URL")
    if sentinel is not None and not redis_url:
        raise ConfigError(
            "M2FP_REDIS_SENTINELS is set: make run needs M2FP_REDIS_URL (the master's user, "
            "password and database, for Flower's broker too); it starts no Redis then"
        )
    return StackSettings(
        workers=_int(env, "M2FP_WORKERS", 1, 1),
        worker_concurrency=_int(env, "M2FP_WORKER_CONCURRENCY", 1, 1),
        torch_threads=_int(env, "M2FP_TORCH_THREADS", 0, 0) or None,
        redis_url=redis_url,
        redis_sentinel=sentinel,
        redis_ca_file=redis_ca_file(env, redis_url),
        redis_port=_int(env, "M2FP_REDIS_PORT", 6380, 1),
        has_data_keys=bool(env.get("M2FP_DATA_KEYS") or env.get("M2FP_DATA_KEYS_FILE")),
        has_metrics_token=_metrics_token(env) is not None,
        weights=(env.get("M2FP_WEIGHTS") or "").strip() or None,
        host=env.get("M2FP_HOST", "127.0.0.1").strip(),
        port=_int(env, "M2FP_PORT", 8000, 1),
        worker_metrics_port=_int(env, "M2FP_WORKER_METRICS_PORT", 9100, 0),
        flower_port=_int(env, "M2FP_FLOWER_PORT", 5555, 1),
        flower_user=env.get("M2FP_FLOWER_USER", "admin").strip() or "admin",
        flower_password=env.get("M2FP_FLOWER_PASSWORD") or None,
    )


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment, failing fast with the variable's name."""
    env = os.environ if env is None else env
    dev_mode = _bool(env, "M2FP_DEV_MODE")
    return Settings(
        **_secrets(env, dev_mode),
        dev_mode=dev_mode,
        **_gateway_fields(env),
        **_lifecycle_fields(env),
        **_model_fields(env),
        **_batching_fields(env),
        **_operations_fields(env),
    )


def _secrets(env: Mapping[str, str], dev_mode: bool) -> dict:
    """The Redis URL (with a password unless dev mode) and the keyring: both required."""
    redis_url = _read_secret(env, "M2FP_REDIS_URL")
    if not redis_url:
        raise ConfigError("M2FP_REDIS_URL (or M2FP_REDIS_URL_FILE) is not set")
    sentinel = redis_sentinel(env)
    _check_redis_url(redis_url, dev_mode, sentinel)
    if sentinel is not None and not sentinel.password and not dev_mode:
        raise ConfigError(
            "M2FP_REDIS_SENTINELS without M2FP_REDIS_SENTINEL_PASSWORD (or its _FILE): sentinels "
            "must require a password, or anyone who reaches one can name another master "
            "(set M2FP_DEV_MODE=1 to allow this on a development machine only)"
        )
    keys_text = _read_secret(env, "M2FP_DATA_KEYS")
    if not keys_text:
        raise ConfigError(
            "M2FP_DATA_KEYS (or M2FP_DATA_KEYS_FILE) is not set; generate a key with "
            "`python -m shared.keys new`"
        )
    return {
        "redis_url": redis_url,
        "redis_sentinel": sentinel,
        "redis_ca_file": redis_ca_file(env, redis_url),
        "keyring": Keyring.parse(keys_text),
    }


def _gateway_fields(env: Mapping[str, str]) -> dict:
    """Bind address, upload limits, rate limits, bans, admission, gunicorn, API keys, CORS."""
    return {
        "host": env.get("M2FP_HOST", "127.0.0.1").strip(),
        "port": _int(env, "M2FP_PORT", 8000, 1),
        "max_upload_bytes": _int(env, "M2FP_MAX_UPLOAD_BYTES", 10 * 1024 * 1024, 1024),
        "max_pixels": _int(env, "M2FP_MAX_PIXELS", 40_000_000, 1),
        "max_image_side": _int(env, "M2FP_MAX_IMAGE_SIDE", 10_000, 1),
        "submit_limit": _rate(env, "M2FP_SUBMIT_LIMIT", "5/minute"),
        "poll_limit": _rate(env, "M2FP_POLL_LIMIT", "120/minute"),
        "ban_after": _int(env, "M2FP_BAN_AFTER", 3, 0),
        "ban_seconds": _int(env, "M2FP_BAN_SECONDS", 3600, 1),
        "max_queue": _int(env, "M2FP_MAX_QUEUE", 100, 1),
        "max_jobs_per_client": _int(env, "M2FP_MAX_JOBS_PER_CLIENT", 3, 0),
        "submit_attempt_limit": _rate(env, "M2FP_SUBMIT_ATTEMPT_LIMIT", "30/minute"),
        "trusted_proxies": _int(env, "M2FP_TRUSTED_PROXIES", 0, 0),
        "ipv6_prefix": _bounded(env, "M2FP_IPV6_PREFIX", 64, 16, 128),
        "gateway_workers": _int(env, "M2FP_GATEWAY_WORKERS", 2, 1),
        "gateway_threads": _int(env, "M2FP_GATEWAY_THREADS", 16, 1),
        "request_read_timeout": _int(env, "M2FP_REQUEST_READ_TIMEOUT", 30, 1),
        "api_keys_file": env.get("M2FP_API_KEYS_FILE") or None,
        "cors_origins": _origins(env),
    }


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    """M2FP_CORS_ORIGINS: exact origins only (no `*`, no path)."""
    origins = tuple(o.strip() for o in env.get("M2FP_CORS_ORIGINS", "").split(",") if o.strip())
    for origin in origins:
        if origin == "*" or not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"M2FP_CORS_ORIGINS entries must be exact origins like https://a.example, got {origin!r}"
            )
    return origins


def _lifecycle_fields(env: Mapping[str, str]) -> dict:
    """TTLs, attempts and time limits of a job (the hard limit must exceed the soft one)."""
    soft = _int(env, "M2FP_SOFT_TIME_LIMIT", 300, 1)
    hard = _int(env, "M2FP_HARD_TIME_LIMIT", soft + 60, 1)
    if hard <= soft:
        raise ConfigError(
            f"M2FP_HARD_TIME_LIMIT ({hard}) must exceed M2FP_SOFT_TIME_LIMIT ({soft})"
        )
    return {
        "input_ttl": _int(env, "M2FP_INPUT_TTL", 600, 1),
        "result_ttl": _int(env, "M2FP_RESULT_TTL", 600, 1),
        "max_attempts": _int(env, "M2FP_MAX_ATTEMPTS", 2, 1),
        "soft_time_limit": soft,
        "hard_time_limit": hard,
    }


def _check_variant(env: Mapping[str, str], variant: str) -> None:
    """`cihp` or `lip`; the test-only `tiny` network only when asked for twice, explicitly.

    `tiny` (worker/m2fp/config.py: the CIHP structure with tiny widths, random weights) makes
    chaos and soak runs practical on 2 cores; it needs M2FP_TEST_NETWORK=1 and
    M2FP_WEIGHTS=random, and is flagged as untrained everywhere like `random`.
    """
    if variant in TEST_VARIANTS:
        if not _bool(env, "M2FP_TEST_NETWORK"):
            raise ConfigError(
                f"M2FP_VARIANT={variant} is the test-only network: set M2FP_TEST_NETWORK=1 "
                "to run it (never in production; its results are meaningless)"
            )
        if (env.get("M2FP_WEIGHTS") or "").strip() != RANDOM_WEIGHTS:
            raise ConfigError(f"M2FP_VARIANT={variant} runs only with M2FP_WEIGHTS=random")
        return
    if variant not in VARIANTS:
        raise ConfigError(f"M2FP_VARIANT must be one of {VARIANTS}, got {variant!r}")


def _model_fields(env: Mapping[str, str]) -> dict:
    """Checkpoint, variant, device, pool size and threads, memory and decode budgets, metrics."""
    variant = env.get("M2FP_VARIANT", "cihp").strip().lower()
    _check_variant(env, variant)
    device = env.get("M2FP_DEVICE", "auto").strip().lower()
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"M2FP_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")
    weights_sha = (env.get("M2FP_WEIGHTS_SHA256") or "").strip().lower() or None
    if weights_sha and not re.fullmatch(r"[0-9a-f]{64}", weights_sha):
        raise ConfigError("M2FP_WEIGHTS_SHA256 must be 64 hex digits")
    return {
        "weights": (env.get("M2FP_WEIGHTS") or "").strip() or None,
        "weights_sha256": weights_sha,
        "weights_key_file": env.get("M2FP_WEIGHTS_KEY_FILE") or None,
        "variant": variant,
        "device": device,
        "worker_concurrency": _int(env, "M2FP_WORKER_CONCURRENCY", 1, 1),
        "torch_threads": _int(env, "M2FP_TORCH_THREADS", 0, 0) or None,
        "infer_max_side": _int(env, "M2FP_INFER_MAX_SIDE", 1920, 64),
        "deform_attn": deform_attn_mode(env),
        "precision": precision_mode(env),
        "winograd": winograd_mode(env),
        "max_memory_per_child_kb": _int(env, "M2FP_MAX_MEMORY_PER_CHILD_MB", 0, 0) * 1024 or None,
        "max_decode_mb": _int(env, "M2FP_MAX_DECODE_MB", 128, 1),
        "child_memory_limit_mb": _int(env, "M2FP_CHILD_MEMORY_LIMIT_MB", 4096, 0) or None,
        "worker_metrics_host": env.get("M2FP_WORKER_METRICS_HOST", "127.0.0.1").strip(),
        "worker_metrics_port": _int(env, "M2FP_WORKER_METRICS_PORT", 9100, 0),
    }


def _batching_fields(env: Mapping[str, str]) -> dict:
    """M2FP_BATCHING (auto: on when the worker's device is CUDA), M2FP_GPU_BATCH, M2FP_BATCH_WAIT_MS."""
    return {
        "batching": _choice(env, "M2FP_BATCHING", BATCHING_MODES, "auto"),
        "gpu_batch": _bounded(env, "M2FP_GPU_BATCH", 8, 1, 64),
        "batch_wait_ms": _bounded(env, "M2FP_BATCH_WAIT_MS", 10, 0, 10_000),
    }


def _operations_fields(env: Mapping[str, str]) -> dict:
    """Log level, memory alert threshold and webhook, the metrics scraper's token."""
    alert = env.get("M2FP_MEMORY_ALERT_PERCENT", "90").strip()
    try:
        alert_percent = float(alert)
    except ValueError as exc:
        raise ConfigError(f"M2FP_MEMORY_ALERT_PERCENT must be a number, got {alert!r}") from exc
    if not 1 <= alert_percent <= 100:
        raise ConfigError(f"M2FP_MEMORY_ALERT_PERCENT must be within 1..100, got {alert_percent}")
    log_level = env.get("M2FP_LOG_LEVEL", "INFO").strip().upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f"M2FP_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
        )
    return {
        "log_level": log_level,
        "memory_alert_percent": alert_percent,
        "alert_webhook": env.get("M2FP_ALERT_WEBHOOK") or None,
        "metrics_token": _metrics_token(env),
    }


MIN_METRICS_TOKEN = 16


def _metrics_token(env: Mapping[str, str]) -> str | None:
    """M2FP_METRICS_TOKEN(_FILE): the bearer token a scraper sends for the gateway's /metrics."""
    token = _read_secret(env, "M2FP_METRICS_TOKEN")
    if token is not None and (
        len(token) < MIN_METRICS_TOKEN or not token.isascii() or " " in token
    ):
        raise ConfigError(
            f"M2FP_METRICS_TOKEN must be at least {MIN_METRICS_TOKEN} ASCII characters without "
            "spaces; generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return token


def find_weights(weights: str | None, root: Path | None = None) -> str | None:
    """M2FP_WEIGHTS when set, else the default directory (under `root`, default the working
    directory) when it holds a checkpoint, else None. The one resolver of the checkpoint path:
    the worker (`resolve_weights`) and `make run` (which then asks for random weights) use it."""
    if weights:
        return weights
    if Path(root or ".", DEFAULT_WEIGHTS_DIR, CHECKPOINT_FILE).is_file():
        return DEFAULT_WEIGHTS_DIR
    return None


def resolve_weights(settings: Settings) -> str:
    """The checkpoint the worker loads: M2FP_WEIGHTS, else the documented default directory.

    Raises ConfigError when neither exists: a worker never silently falls back to random
    weights; `random` must be asked for explicitly (make run does so, loudly).
    """
    found = find_weights(settings.weights)
    if found:
        return found
    raise ConfigError(
        f"M2FP_WEIGHTS is not set and no checkpoint is at {DEFAULT_WEIGHTS_DIR}/{CHECKPOINT_FILE}; "
        f"point M2FP_WEIGHTS at the official ModelScope checkpoint, or set "
        f"M2FP_WEIGHTS={RANDOM_WEIGHTS} for an explicitly untrained model"
    )
