"""The documented variables are exactly the ones shared/config.py reads, so the lists cannot drift.

What the code reads is observed, not listed by hand: every loader of shared/config.py runs on an
environment that records each name looked up (the `*_FILE` names it composes included), and the
names it spells out are added (a variable read on one branch only, e.g. M2FP_TEST_NETWORK). README's configuration table must name exactly
those; `.env.example` too, plus only names that docker-compose.yml interpolates (compose reads
`.env` to fill in its images and published ports); docs/OPERATIONS.md may mention only names of
either kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from shared import config
from shared.crypto import generate_key
from tests.conftest import REPO

NAME = re.compile(r"\b(?:M2FP_[A-Z0-9_]+|PROMETHEUS_MULTIPROC_DIR)\b")


class RecordingEnv(Mapping[str, str]):
    """A mapping that remembers every key asked for (get, [], in)."""

    def __init__(self, values: dict[str, str]):
        self.values, self.asked = values, set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("configuration must look names up, not iterate the environment")

    def __len__(self) -> int:
        return len(self.values)


def variables_read() -> set[str]:
    """Every variable the loaders of shared/config.py look up."""
    env = RecordingEnv(
        {"M2FP_REDIS_URL": "redis://:pw@127.0.0.1:6399/0", "M2FP_DATA_KEYS": f"k1:{generate_key()}"}
    )
    config.load_settings(env)
    config.load_stack_settings(env)
    config.prometheus_multiproc_dir(env)
    config.deform_attn_mode(env)
    config.winograd_mode(env)
    spelled = NAME.findall((REPO / "shared" / "config.py").read_text())
    return env.asked | set(spelled)


def readme_table() -> set[str]:
    """Names in the first column of README's configuration table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in NAME.findall(row)}


def env_example() -> set[str]:
    """Names assigned in .env.example, commented-out examples included."""
    text = (REPO / ".env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.MULTILINE))


def compose_variables() -> set[str]:
    """Names docker-compose.yml interpolates (`${NAME...}`): read by compose, not the service."""
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / "docker-compose.yml").read_text()))


def test_the_loaders_read_the_variables_we_expect_to_see():
    read = variables_read()
    assert {"M2FP_REDIS_URL_FILE", "M2FP_WORKERS", "M2FP_FLOWER_PASSWORD"} <= read
    assert "PROMETHEUS_MULTIPROC_DIR" in read


def test_readme_table_lists_exactly_what_the_code_reads():
    read, documented = variables_read(), readme_table()
    assert documented - read == set(), "documented in README but read by nothing"
    assert read - documented == set(), "read by shared/config.py but missing from README"


def test_env_example_lists_exactly_what_the_code_reads():
    read, listed = variables_read(), env_example()
    assert listed - read - compose_variables() == set(), "in .env.example but read by nothing"
    assert read - listed == set(), "read by shared/config.py but missing from .env.example"


def test_operations_mentions_only_variables_the_code_reads():
    mentioned = set(NAME.findall((REPO / "docs" / "OPERATIONS.md").read_text()))
    assert mentioned - variables_read() - compose_variables() == set()
