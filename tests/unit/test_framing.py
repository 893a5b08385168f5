"""Which framing a record is in, and what a consumer makes of each (libs/common/avro.py,
libs/common/registry.py): Tayori's (schemaless Avro + version header), the Confluent wire
format (magic byte 0 + schema id, writer schema from a registry served by the test), and
what neither reads — with a reason naming the framings expected."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from libs.common import avro
from libs.common.errors import InvalidMessage, TransientError
from libs.common.registry import SchemaRegistry, confluent_schema_id, shown_url
from libs.common.topics import Topic
from tests.schema_registry import TestRegistry, confluent, schema_of

EVENT = {
    "event_id": "5f1b7c1e-0000-4000-8000-000000000001",
    "type": "ContactUpserted",
    "occurred_at": 1764900000000,
    "source": "crm",
    "external_id": "CRM-1",
    "email": "taro@example.jp",
    "contact": {"name": "山田 太郎"},
    "membership": None,
}


@pytest.fixture
async def registry() -> AsyncIterator[TestRegistry]:
    served = TestRegistry()
    await served.start()
    yield served
    await served.stop()


@pytest.fixture
async def client(registry: TestRegistry) -> AsyncIterator[SchemaRegistry]:
    async with SchemaRegistry(registry.url) as schemas:
        yield schemas


async def looked_up(schemas: SchemaRegistry, *values: bytes) -> SchemaRegistry:
    await schemas.prefetch(((v, ()) for v in values), unframed=avro.unversioned)
    return schemas


def test_confluent_schema_id_is_the_four_bytes_after_magic_zero() -> None:
    assert confluent_schema_id(b"\x00\x00\x00\x01\x02rest") == 258
    assert confluent_schema_id(b"\x00\x00\x00\x01") is None  # too short for an id
    assert confluent_schema_id(b"\x01\x00\x00\x00\x01body") is None  # another magic byte
    assert confluent_schema_id(None) is None


def test_tayori_framing_is_read_by_its_header_whatever_the_first_byte() -> None:
    value = {**EVENT, "event_id": ""}  # an empty first string: the value starts with 0
    data, headers = avro.encode(Topic.CONTACTS_EVENTS, value)
    assert data[0] == 0
    assert avro.decode(Topic.CONTACTS_EVENTS, data, headers)["external_id"] == "CRM-1"


def test_a_record_without_header_is_read_as_the_current_version() -> None:
    data, _ = avro.encode(Topic.CONTACTS_EVENTS, EVENT)
    assert avro.decode(Topic.CONTACTS_EVENTS, data, ())["email"] == "taro@example.jp"


def test_confluent_framing_without_a_registry_names_both_framings() -> None:
    data = confluent(7, schema_of("contacts.events"), EVENT)
    with pytest.raises(InvalidMessage) as caught:
        avro.decode(Topic.SUPPRESSION_COMMANDS, data, ())
    reason = caught.value.reason
    assert "Confluent wire format" in reason and "schema id 7" in reason
    assert "SCHEMA_REGISTRY_URL" in reason and "tayori-schema-version" in reason


@pytest.mark.parametrize(
    ("data", "shows"),
    [
        (json.dumps(EVENT).encode(), "(JSON?)"),
        (b"\x01\x00\x00\x00\x07" + b"\x02" * 20, "01 00 00 00 07"),  # an unknown magic byte
        (b"\x00\x00\x01", "00 00 01"),  # magic 0 but no room for a schema id
    ],
    ids=["json", "unknown-magic-byte", "short"],
)
def test_a_record_in_no_known_framing_says_which_were_expected(data: bytes, shows: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        avro.decode(Topic.CONTACTS_EVENTS, data, ())
    reason = caught.value.reason
    assert reason.startswith("unknown framing: expected Tayori's framing")
    assert "or the Confluent wire format" in reason
    assert shows in reason
    assert "IndexError" not in reason.split(" it is ")[0]


def test_internal_topics_do_not_read_the_confluent_framing() -> None:
    data = b"\x00\x00\x00\x00\x07" + b"\x02" * 30
    with pytest.raises(InvalidMessage) as caught:
        avro.decode(Topic.SEND_PROGRESS, data, ())
    assert "Confluent" not in caught.value.reason
    assert "expected Tayori's framing" in caught.value.reason


async def test_our_own_schema_from_the_registry_decodes(
    registry: TestRegistry, client: SchemaRegistry
) -> None:
    schema_id = registry.add(schema_of("contacts.events"), "contacts.events-value")
    data = confluent(schema_id, schema_of("contacts.events"), EVENT)
    value = avro.decode(Topic.CONTACTS_EVENTS, data, (), await looked_up(client, data))
    expected, _ = avro.encode(Topic.CONTACTS_EVENTS, EVENT)
    assert value == avro.decode(Topic.CONTACTS_EVENTS, expected, ())
    assert client.writer(schema_id).canonical  # cached: the compiled reader's case


async def test_an_older_and_a_larger_writer_schema_are_resolved(
    registry: TestRegistry, client: SchemaRegistry
) -> None:
    older = schema_of("contacts.events", 1)  # before `source`
    larger = schema_of("contacts.events")
    larger["fields"].append({"name": "tenant", "type": "string", "default": "x"})
    old_id, large_id = registry.add(older), registry.add(larger)
    without_source = {k: v for k, v in EVENT.items() if k != "source"}
    old = confluent(old_id, older, without_source)
    large = confluent(large_id, larger, {**EVENT, "tenant": "acme"})
    await looked_up(client, old, large)
    assert avro.decode(Topic.CONTACTS_EVENTS, old, (), client)["source"] is None
    read = avro.decode(Topic.CONTACTS_EVENTS, large, (), client)
    assert read["source"] == "crm" and "tenant" not in read


async def test_ids_are_fetched_once(registry: TestRegistry, client: SchemaRegistry) -> None:
    schema_id = registry.add(schema_of("suppression.commands"))
    await client.fetch(schema_id)
    await client.fetch(schema_id)
    data = b"\x00" + schema_id.to_bytes(4, "big") + b"\x00"
    await looked_up(client, data, data)
    assert registry.requests.count(("GET", f"/schemas/ids/{schema_id}")) == 1


async def test_what_the_registry_cannot_give_is_invalid(
    registry: TestRegistry, client: SchemaRegistry
) -> None:
    proto = registry.add('syntax = "proto3"; message X {}', schema_type="PROTOBUF")
    other = registry.add({"type": "record", "name": "Other", "fields": []})
    records = {
        "unknown": b"\x00\x00\x00\x03\xe7" + b"\x00" * 10,  # id 999
        "protobuf": b"\x00" + proto.to_bytes(4, "big") + b"\x00",
        "other": confluent(other, {"type": "record", "name": "Other", "fields": []}, {}),
    }
    await looked_up(client, *records.values())
    reasons = {}
    for name, data in records.items():
        with pytest.raises(InvalidMessage) as caught:
            avro.decode(Topic.CONTACTS_EVENTS, data, (), client)
        reasons[name] = caught.value.reason
    assert reasons["unknown"] == f"schema id 999 is not in the Schema Registry at {registry.url}"
    assert "is a PROTOBUF schema" in reasons["protobuf"]
    assert "(Other) cannot be read as contacts.events v2 (tayori.ContactEvent)" in reasons["other"]


async def test_an_undecodable_body_is_invalid(
    registry: TestRegistry, client: SchemaRegistry
) -> None:
    schema_id = registry.add(schema_of("contacts.events"))
    data = confluent(schema_id, schema_of("contacts.events"), EVENT)
    await looked_up(client, data)
    for bad in (data[:-3], data + b"\x00"):
        with pytest.raises(InvalidMessage, match=f"schema id {schema_id}"):
            avro.decode(Topic.CONTACTS_EVENTS, bad, (), client)


async def test_a_registry_away_is_transient(registry: TestRegistry) -> None:
    schema_id = registry.add(schema_of("contacts.events"))
    await registry.stop()
    async with SchemaRegistry(registry.url) as schemas:
        with pytest.raises(TransientError, match="does not answer"):
            await schemas.fetch(schema_id)
        await registry.start()
        assert (await schemas.fetch(schema_id)).schema_id == schema_id


async def test_basic_auth_and_refused_credentials() -> None:
    served = TestRegistry(username="tayori", password="s3cret")
    await served.start()
    try:
        schema_id = served.add(schema_of("contacts.events"))
        async with SchemaRegistry(served.url, "tayori", "wrong") as refused:
            with pytest.raises(TransientError, match="answered 401"):
                await refused.fetch(schema_id)
        async with SchemaRegistry(served.url, "tayori", "s3cret") as allowed:
            assert (await allowed.fetch(schema_id)).name == "tayori.ContactEvent"
    finally:
        await served.stop()


def test_a_registry_url_that_is_not_http_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="SCHEMA_REGISTRY_URL: expected an http"):
        SchemaRegistry("registry:8081")


def test_credentials_in_the_url_are_not_shown() -> None:
    assert shown_url("https://user:pw@registry.example:8081/") == "https://registry.example:8081"
    assert shown_url("http://registry:8081") == "http://registry:8081"
