"""``tayori schemas register`` as an operator runs it, against a Schema Registry served by
the test: every topic's subject under the prefix, its versions oldest first, its
compatibility rule; run again it changes nothing; a registry away or refusing the
credentials is one line on stderr and exit status 2."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from libs.common.topics import Topic
from tests.schema_registry import TestRegistry, schema_of

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "t1."


@pytest.fixture
async def registry() -> AsyncIterator[TestRegistry]:
    served = TestRegistry(username="ops", password="registry-secret")
    await served.start()
    yield served
    await served.stop()


async def register(registry: TestRegistry, tmp_path: Path, password: str = "registry-secret"):
    """Run the command (password from a file, as a Kubernetes Secret mounts it):
    (exit status, stdout lines, stderr)."""
    secret = tmp_path / "password"
    secret.write_text(password + "\n")
    env = {
        **os.environ,
        "SCHEMA_REGISTRY_URL": registry.url,
        "SCHEMA_REGISTRY_USERNAME": "ops",
        "SCHEMA_REGISTRY_PASSWORD_FILE": str(secret),
        "KAFKA_TOPIC_PREFIX": PREFIX,
    }
    env.pop("SCHEMA_REGISTRY_PASSWORD", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tayori",
        "schemas",
        "register",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode, out.decode().splitlines(), err.decode()


def stored(registry: TestRegistry, subject: str) -> list[dict]:
    return [json.loads(registry.schemas[i - 1]) for i in registry.versions[subject]]


async def test_every_topic_is_registered_with_its_rule_and_again_nothing_changes(
    registry: TestRegistry, tmp_path: Path
) -> None:
    status, lines, err = await register(registry, tmp_path)
    assert status == 0, err

    subjects = {f"{PREFIX}{topic.value}-value" for topic in Topic}
    assert set(registry.versions) == subjects
    assert registry.config == {
        f"{PREFIX}{topic.value}-value": (
            "BACKWARD_TRANSITIVE"
            if topic
            in (
                Topic.CONTACTS_CHANGELOG,
                Topic.CAMPAIGN_CONTENT,
                Topic.DOMAIN_POLICY,
                Topic.CAMPAIGN_GUARD,
            )
            else "BACKWARD"
        )
        for topic in Topic
    }
    assert stored(registry, f"{PREFIX}contacts.events-value") == [
        schema_of("contacts.events", 1),
        schema_of("contacts.events"),
    ]
    assert [s["tayori_version"] for s in stored(registry, f"{PREFIX}send.requests-value")] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert f"{PREFIX}contacts.events-value: v2 registered (id 2)" in lines
    assert (
        f"{PREFIX}contacts.changelog-value: compatibility BACKWARD_TRANSITIVE (was not set)"
        in lines
    )

    kept = list(registry.schemas)
    asked = len(registry.requests)
    status, lines, err = await register(registry, tmp_path)
    assert status == 0, err
    assert registry.schemas == kept
    again = registry.requests[asked:]
    assert not [r for r in again if r[0] in ("PUT",) or r[1].endswith("/versions")]
    assert f"{PREFIX}contacts.events-value: v2 registered already (id 2, version 2)" in lines
    assert f"{PREFIX}bounce.events-value: compatibility BACKWARD (unchanged)" in lines


async def test_a_subject_an_upstream_team_started_keeps_its_order(
    registry: TestRegistry, tmp_path: Path
) -> None:
    subject = f"{PREFIX}contacts.events-value"
    registry.add(schema_of("contacts.events"), subject)  # v2, by their serializer
    registry.config[subject] = "FORWARD"

    status, lines, err = await register(registry, tmp_path)
    assert status == 0, err
    assert stored(registry, subject) == [schema_of("contacts.events")]  # no v1 after v2
    assert registry.config[subject] == "BACKWARD"
    assert f"{subject}: compatibility BACKWARD (was FORWARD)" in lines
    assert f"{subject}: v2 registered already (id 1, version 1)" in lines


async def test_a_registry_away_or_refusing_is_one_line_and_status_2(
    registry: TestRegistry, tmp_path: Path
) -> None:
    status, lines, err = await register(registry, tmp_path, password="wrong")
    assert status == 2
    assert err.strip().startswith("tayori: Schema Registry at http://127.0.0.1:")
    assert "answered 401" in err and len(err.strip().splitlines()) == 1
    assert "wrong" not in err and "registry-secret" not in err

    await registry.stop()
    status, lines, err = await register(registry, tmp_path)
    assert status == 2 and lines == []
    assert "does not answer" in err and len(err.strip().splitlines()) == 1
    assert registry.versions == {}
