"""Upstream producers with Confluent serializers (issue 19): records in the Confluent wire
format on ``contacts.events`` and ``suppression.commands``, their writer schemas in a Schema
Registry served by the test, read by the real services through the real broker into
PostgreSQL; what no consumer can read is dead-lettered with a reason naming the framings
expected; a registry away holds the records until it is back."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from libs.common.metrics import TRANSIENT_RETRIES
from libs.common.topics import Topic
from tests.conftest import Kafka, Service, Stack, eventually, running
from tests.integration.test_contacts_ingest import upserted
from tests.integration.test_suppression import command
from tests.schema_registry import TestRegistry, confluent, schema_of


async def send(kafka: Kafka, topic: Topic, key: str, data: bytes) -> None:
    """A record as a Confluent producer sends it: no Tayori header, the key as a string."""
    await (await kafka.publisher.send_raw(topic, key, data, []))


@pytest.fixture
async def registry() -> AsyncIterator[TestRegistry]:
    served = TestRegistry(username="upstream", password="registry-secret")
    await served.start()
    yield served
    await served.stop()


def registry_settings(registry: TestRegistry) -> dict[str, str]:
    return {
        "schema_registry_url": registry.url,
        "schema_registry_username": "upstream",
        "schema_registry_password": "registry-secret",
    }


@pytest.fixture
async def contacts_with_registry(
    stack: Stack, database: str, prefix: str, registry: TestRegistry
) -> AsyncIterator[Service]:
    async with running(
        "contacts", stack, database, prefix, **registry_settings(registry)
    ) as service:
        yield service


@pytest.fixture
async def suppression_with_registry(
    stack: Stack, database: str, prefix: str, registry: TestRegistry
) -> AsyncIterator[Service]:
    async with running(
        "suppression", stack, database, prefix, **registry_settings(registry)
    ) as service:
        yield service


async def contact(service: Service, email: str) -> Any:
    return await service.runtime.pool.fetchrow("SELECT * FROM contact WHERE email = $1", email)


def without_source(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != "source"}


async def test_confluent_framed_contact_events_are_applied(
    contacts_with_registry: Service, registry: TestRegistry, kafka: Kafka
) -> None:
    current = registry.add(schema_of("contacts.events"), "contacts.events-value")
    older = registry.add(schema_of("contacts.events", 1), "contacts.events-value")
    larger_schema = schema_of("contacts.events")
    larger_schema["fields"].append({"name": "tenant", "type": "string", "default": "main"})
    larger = registry.add(larger_schema)

    events = {
        "same@example.jp": (current, schema_of("contacts.events")),
        "older@example.jp": (older, schema_of("contacts.events", 1)),
        "larger@example.jp": (larger, larger_schema),
    }
    for email, (schema_id, schema) in events.items():
        value = upserted(email, external_id=f"CRM-{email[0]}", name="山田 花子")
        if "source" not in {f["name"] for f in schema["fields"]}:
            value = without_source(value)
        if schema is larger_schema:
            value["tenant"] = "acme"
        await send(kafka, Topic.CONTACTS_EVENTS, email, confluent(schema_id, schema, value))
    # and one in Tayori's framing beside them
    await kafka.send(Topic.CONTACTS_EVENTS, "tayori@example.jp", upserted("tayori@example.jp"))

    for email in [*events, "tayori@example.jp"]:
        row = await eventually(functools.partial(contact, contacts_with_registry, email))
        assert row["email"] == email
    assert (await contact(contacts_with_registry, "older@example.jp"))["name"] == "山田 花子"
    assert await kafka.read_to_end(Topic.CONTACTS_EVENTS.dlq) == []
    # each id was asked for once, with the credentials (the registry answers 401 without)
    asked = [path for method, path in registry.requests if path.startswith("/schemas/ids/")]
    assert sorted(asked) == sorted({f"/schemas/ids/{i}" for i, _ in events.values()})


async def test_confluent_framed_suppression_commands_are_applied(
    suppression_with_registry: Service, registry: TestRegistry, kafka: Kafka
) -> None:
    schema = schema_of("suppression.commands")
    schema_id = registry.add(schema, "suppression.commands-value")
    join = command("Join", 41, 3, state="deliverable", method="upstream", actor="upstream")
    leave = command("SetState", 41, 3, state="unsubscribed", method="upstream", actor="upstream")
    await send(kafka, Topic.SUPPRESSION_COMMANDS, "41", confluent(schema_id, schema, join))
    await send(kafka, Topic.SUPPRESSION_COMMANDS, "41", confluent(schema_id, schema, leave))

    async def unsubscribed() -> Any:
        return await suppression_with_registry.runtime.pool.fetchrow(
            "SELECT state, method FROM membership"
            " WHERE contact_id = 41 AND group_id = 3 AND state = 'unsubscribed'"
        )

    row = await eventually(unsubscribed)
    assert row["method"] == "upstream"
    assert await kafka.read_to_end(Topic.SUPPRESSION_COMMANDS.dlq) == []


async def test_unreadable_framings_are_dead_lettered_with_the_framing_expected(
    contacts_with_registry: Service, registry: TestRegistry, kafka: Kafka
) -> None:
    other = {"type": "record", "name": "Order", "fields": [{"name": "n", "type": "long"}]}
    other_id = registry.add(other, "orders-value")
    key = "one-partition"
    poison = {
        "json": json.dumps({"event_id": "e1", "type": "ContactUpserted"}).encode(),
        "magic": b"\x01\x00\x00\x00\x01" + b"\x02" * 12,
        "unknown-id": b"\x00\x00\x00\x03\xe7" + b"\x00" * 12,
        "other-schema": confluent(other_id, other, {"n": 5}),
    }
    for data in poison.values():
        await send(kafka, Topic.CONTACTS_EVENTS, key, data)
    await kafka.send(Topic.CONTACTS_EVENTS, key, upserted("after@example.jp"))

    await eventually(lambda: contact(contacts_with_registry, "after@example.jp"))
    dead = await kafka.read(Topic.CONTACTS_EVENTS.dlq, until=lambda r: len(r) >= 4)
    assert [r.value for r in dead] == list(poison.values())
    headers = [dict(r.headers) for r in dead]
    assert {h["dlq-stage"] for h in headers} == {b"decode"}
    reasons = dict(zip(poison, (h["dlq-reason"].decode() for h in headers), strict=True))
    for name in ("json", "magic"):
        assert reasons[name].startswith(
            "unknown framing: expected Tayori's framing (schemaless Avro with a"
            " tayori-schema-version header) or the Confluent wire format"
        ), reasons[name]
    assert "(JSON?)" in reasons["json"]
    assert reasons["unknown-id"] == f"schema id 999 is not in the Schema Registry at {registry.url}"
    assert "(Order) cannot be read as contacts.events v2" in reasons["other-schema"]


async def test_confluent_framing_without_a_registry_is_dead_lettered(
    contacts: Service, kafka: Kafka
) -> None:
    data = confluent(12, schema_of("contacts.events"), upserted("x@example.jp"))
    await send(kafka, Topic.CONTACTS_EVENTS, "k", data)
    await kafka.send(Topic.CONTACTS_EVENTS, "k", upserted("after@example.jp"))
    await eventually(lambda: contact(contacts, "after@example.jp"))
    [dead] = await kafka.read(Topic.CONTACTS_EVENTS.dlq, until=lambda r: len(r) >= 1)
    reason = dict(dead.headers)["dlq-reason"].decode()
    assert reason == (
        "the Confluent wire format (magic byte 0, a 4-byte schema id, Avro) (schema id 12),"
        " but no Schema Registry is configured (SCHEMA_REGISTRY_URL): expected Tayori's"
        " framing (schemaless Avro with a tayori-schema-version header)"
    )
    assert await contact(contacts, "x@example.jp") is None


async def test_a_registry_away_holds_the_records_until_it_is_back(
    contacts_with_registry: Service, registry: TestRegistry, kafka: Kafka
) -> None:
    schema = schema_of("contacts.events")
    schema_id = registry.add(schema, "contacts.events-value")
    retries = TRANSIENT_RETRIES.labels("contacts", "schema_registry")
    before = retries._value.get()
    await registry.stop()

    await send(
        kafka, Topic.CONTACTS_EVENTS, "w", confluent(schema_id, schema, upserted("w@example.jp"))
    )

    async def retried() -> bool:
        return retries._value.get() >= before + 2

    await eventually(retried)
    assert await contact(contacts_with_registry, "w@example.jp") is None
    ok, detail = await contacts_with_registry.runtime.health()
    assert ok, detail  # waiting on purpose: a restart would not help

    await registry.start()
    row = await eventually(lambda: contact(contacts_with_registry, "w@example.jp"))
    assert row["email"] == "w@example.jp"
    assert await kafka.read_to_end(Topic.CONTACTS_EVENTS.dlq) == []
