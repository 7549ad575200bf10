"""M2FP_VARIANT: the test-only `tiny` network is refused unless asked for explicitly, twice."""

from __future__ import annotations

import pytest

from shared.config import load_settings
from shared.errors import ConfigError


def test_tiny_network_is_refused_without_the_test_switch(settings_env):
    env = {**settings_env, "M2FP_VARIANT": "tiny", "M2FP_WEIGHTS": "random"}
    with pytest.raises(ConfigError, match="M2FP_TEST_NETWORK=1"):
        load_settings(env)


def test_tiny_network_is_refused_with_a_checkpoint(settings_env, tmp_path):
    env = {**settings_env, "M2FP_VARIANT": "tiny", "M2FP_TEST_NETWORK": "1"}
    with pytest.raises(ConfigError, match="M2FP_WEIGHTS=random"):
        load_settings({**env, "M2FP_WEIGHTS": str(tmp_path)})


def test_tiny_network_runs_when_asked_for_with_random_weights(settings_env):
    env = {**settings_env, "M2FP_VARIANT": "tiny", "M2FP_TEST_NETWORK": "1"}
    settings = load_settings({**env, "M2FP_WEIGHTS": "random"})
    assert settings.variant == "tiny" and settings.weights == "random"


def test_unknown_variant_is_refused(settings_env):
    with pytest.raises(ConfigError, match="M2FP_VARIANT must be one of"):
        load_settings({**settings_env, "M2FP_VARIANT": "huge"})
