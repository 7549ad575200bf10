"""shared.config: one place for the environment, failing fast, no insecure defaults."""

import pytest

from shared.config import ConfigError, load_settings, resolve_weights
from shared.crypto import generate_key


def test_defaults(settings):
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.submit_limit == "5/minute"
    assert settings.ban_after == 3 and settings.ban_seconds == 3600
    assert settings.trusted_proxies == 0 and settings.cors_origins == ()
    assert settings.hard_time_limit > settings.soft_time_limit
    assert settings.visibility_timeout > settings.hard_time_limit
    assert settings.job_ttl > settings.input_ttl + settings.result_ttl


@pytest.mark.parametrize("missing", ["M2FP_REDIS_URL", "M2FP_DATA_KEYS"])
def test_missing_secret_is_named(settings_env, missing):
    del settings_env[missing]
    with pytest.raises(ConfigError, match=missing):
        load_settings(settings_env)


def test_redis_without_password_needs_dev_mode(settings_env):
    settings_env["M2FP_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    with pytest.raises(ConfigError, match="password"):
        load_settings(settings_env)
    settings_env["M2FP_DEV_MODE"] = "1"
    assert load_settings(settings_env).dev_mode


def test_secret_files(settings_env, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"k7:{generate_key()}\n")
    del settings_env["M2FP_DATA_KEYS"]
    settings_env["M2FP_DATA_KEYS_FILE"] = str(keys)
    assert load_settings(settings_env).keyring.active_id == "k7"
    settings_env["M2FP_DATA_KEYS"] = f"k1:{generate_key()}"
    with pytest.raises(ConfigError, match="not both"):
        load_settings(settings_env)
    del settings_env["M2FP_DATA_KEYS"]
    settings_env["M2FP_DATA_KEYS_FILE"] = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="M2FP_DATA_KEYS_FILE"):
        load_settings(settings_env)


@pytest.mark.parametrize(
    "name,value",
    [
        ("M2FP_PORT", "eighty"),
        ("M2FP_SUBMIT_LIMIT", "lots"),
        ("M2FP_BAN_AFTER", "-1"),
        ("M2FP_VARIANT", "coco"),
        ("M2FP_DEVICE", "tpu"),
        ("M2FP_WEIGHTS_SHA256", "abc"),
        ("M2FP_CORS_ORIGINS", "*"),
        ("M2FP_MEMORY_ALERT_PERCENT", "150"),
        ("M2FP_LOG_LEVEL", "LOUD"),
        ("M2FP_DEV_MODE", "maybe"),
    ],
)
def test_invalid_values_are_named(settings_env, name, value):
    settings_env[name] = value
    with pytest.raises(ConfigError, match=name):
        load_settings(settings_env)


def test_hard_limit_must_exceed_soft(settings_env):
    settings_env.update(M2FP_SOFT_TIME_LIMIT="100", M2FP_HARD_TIME_LIMIT="50")
    with pytest.raises(ConfigError, match="M2FP_HARD_TIME_LIMIT"):
        load_settings(settings_env)


def test_rate_limit_forms(settings_env):
    for value in ("5/minute", "100 per hour", "10/second"):
        settings_env["M2FP_SUBMIT_LIMIT"] = value
        assert load_settings(settings_env).submit_limit == value


def test_weights_never_default_to_random(settings_env, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="M2FP_WEIGHTS"):
        resolve_weights(load_settings(settings_env))
    settings_env["M2FP_WEIGHTS"] = "random"
    assert resolve_weights(load_settings(settings_env)) == "random"
    (tmp_path / "weights/cihp").mkdir(parents=True)
    (tmp_path / "weights/cihp/pytorch_model.pt").write_bytes(b"x")
    del settings_env["M2FP_WEIGHTS"]
    assert resolve_weights(load_settings(settings_env)) == "weights/cihp"


def test_settings_repr_hides_keys(settings):
    assert "keyring" not in repr(settings)
    assert "secret-password" not in repr(settings)


def test_invalid_deform_attn_mode_is_refused_by_settings(settings_env) -> None:
    with pytest.raises(ConfigError, match="M2FP_DEFORM_ATTN"):
        load_settings({**settings_env, "M2FP_DEFORM_ATTN": "gpu"})
    assert load_settings(settings_env).deform_attn == "auto"
    assert (
        load_settings({**settings_env, "M2FP_DEFORM_ATTN": " Reference "}).deform_attn
        == "reference"
    )


def test_winograd_mode_is_auto_or_off(settings_env) -> None:
    assert load_settings(settings_env).winograd == "auto"
    assert load_settings({**settings_env, "M2FP_WINOGRAD": " OFF "}).winograd == "off"
    with pytest.raises(ConfigError, match="M2FP_WINOGRAD"):
        load_settings({**settings_env, "M2FP_WINOGRAD": "on"})


def test_metrics_token_from_env_or_file_and_never_in_repr(settings_env, tmp_path):
    assert load_settings(settings_env).metrics_token is None  # unset: /metrics is off
    token = "scraper-token-0123456789"
    settings = load_settings({**settings_env, "M2FP_METRICS_TOKEN": token})
    assert settings.metrics_token == token and token not in repr(settings)
    token_file = tmp_path / "metrics_token"
    token_file.write_text(token + "\n")
    from_file = load_settings({**settings_env, "M2FP_METRICS_TOKEN_FILE": str(token_file)})
    assert from_file.metrics_token == token


@pytest.mark.parametrize(
    "token", ["short", "x" * 15, "has a space in it here", "naïve-token-0123456789"]
)
def test_weak_metrics_tokens_are_refused(settings_env, token):
    with pytest.raises(ConfigError, match="M2FP_METRICS_TOKEN"):
        load_settings({**settings_env, "M2FP_METRICS_TOKEN": token})


def test_make_run_uses_a_redis_url_given_as_a_file_and_starts_none(tmp_path):
    from shared.config import load_stack_settings

    url = "redis://gateway:pw@redis.internal:6379/0"
    url_file = tmp_path / "redis_url"
    url_file.write_text(url + "\n")
    assert load_stack_settings({"M2FP_REDIS_URL_FILE": str(url_file)}).redis_url == url
    assert load_stack_settings({"M2FP_REDIS_URL": url}).redis_url == url
    assert load_stack_settings({}).redis_url is None  # make run starts its own
    with pytest.raises(ConfigError, match="either"):
        load_stack_settings({"M2FP_REDIS_URL": url, "M2FP_REDIS_URL_FILE": str(url_file)})
