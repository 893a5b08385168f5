"""No record stops a consumer (issue 15): each poison record an upstream system can send on
``contacts.events`` and ``suppression.commands`` — a NUL in each kind of identifier, a record
of 1.5 MB — lands in the topic's DLQ with a reason, the record after it is applied, and the
service stays up."""

from __future__ import annotations

from typing import Any

from libs.common import avro
from libs.common.kafka import DLQ_EXCERPT_BYTES, make_producer
from libs.common.settings import CommonSettings
from libs.common.topics import Topic, topic_name
from tests.conftest import Kafka, Service, Stack, eventually
from tests.integration.test_contacts_ingest import upserted
from tests.integration.test_suppression import command, join, wait_member

HUGE = 1_500_000


async def send_large(stack: Stack, prefix: str, topic: Topic, key: str, value: dict) -> int:
    """Publish a record larger than the 1 MB a default producer takes; its size."""
    data, headers = avro.encode(topic, value)
    producer = make_producer(
        CommonSettings(kafka_bootstrap=stack.broker.bootstrap), max_request_size=4 << 20
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            topic_name(topic, prefix), data, key=key.encode(), headers=headers
        )
    finally:
        await producer.stop()
    return len(data)


async def healthy(service: Service) -> None:
    ok, detail = await service.runtime.health()
    assert ok, detail
    assert service.runtime._failure is None


async def _contact(contacts: Service, email: str) -> Any:
    return await contacts.runtime.pool.fetchrow("SELECT * FROM contact WHERE email = $1", email)


async def test_poison_contact_events_are_dead_lettered_and_the_next_is_applied(
    stack: Stack, prefix: str, contacts: Service, kafka: Kafka
) -> None:
    key = "one-partition"  # every record behind the one before it
    poison = [
        upserted("nul\x00@example.jp"),
        upserted(external_id="crm\x00-1"),
        upserted("tagged@example.jp", tags=["vip", "a\x00b"]),
        upserted("event@example.jp", event_id="ev\x00nt"),
        upserted("named@example.jp", name="a\x00b"),
    ]
    for value in poison:
        await kafka.send(Topic.CONTACTS_EVENTS, key, value)
    size = await send_large(
        stack, prefix, Topic.CONTACTS_EVENTS, key, upserted("big@example.jp", name="x" * HUGE)
    )
    await kafka.send(Topic.CONTACTS_EVENTS, key, upserted("after@example.jp", name="次"))

    row = await eventually(lambda: _contact(contacts, "after@example.jp"))
    assert row["name"] == "次"
    dead = await kafka.read(Topic.CONTACTS_EVENTS.dlq, until=lambda r: len(r) >= 6)
    assert len(dead) == 6
    reasons = [dict(r.headers)["dlq-reason"] for r in dead]
    fields = [dict(r.headers).get("dlq-field") for r in dead]
    assert b"not an email address" in reasons[0] or b"not a valid email" in reasons[0]
    control = b"contains the control character U+0000"
    assert [r.startswith(control) for r in reasons[1:4]] == [True, True, True]
    assert fields[1:4] == [b"external_id", b"contact.tags", b"event_id"]
    assert b"NUL" in reasons[4]
    big = dict(dead[5].headers)
    assert big["dlq-truncated"] == b"1" and big["dlq-size"] == str(size).encode()
    assert len(dead[5].value) == DLQ_EXCERPT_BYTES
    for email in ("tagged@example.jp", "event@example.jp", "named@example.jp", "big@example.jp"):
        assert await _contact(contacts, email) is None
    await healthy(contacts)


async def test_poison_suppression_commands_are_dead_lettered_and_the_next_is_applied(
    stack: Stack, prefix: str, suppression: Service, kafka: Kafka
) -> None:
    key = "7"
    await kafka.send(Topic.SUPPRESSION_COMMANDS, key, join(7, 1, command_id="c\x00md"))
    await kafka.send(Topic.SUPPRESSION_COMMANDS, key, join(7, 2, email="p\x00@example.jp"))
    await kafka.send(Topic.SUPPRESSION_COMMANDS, key, command("SetState", 7, 1, state="banned\x00"))
    size = await send_large(
        stack, prefix, Topic.SUPPRESSION_COMMANDS, key, join(7, 3, email="x" * HUGE)
    )
    await kafka.send(Topic.SUPPRESSION_COMMANDS, key, join(7, 4))

    await wait_member(suppression.api, 7, 4)
    dead = await kafka.read(Topic.SUPPRESSION_COMMANDS.dlq, until=lambda r: len(r) >= 4)
    assert len(dead) == 4
    reasons = [dict(r.headers)["dlq-reason"] for r in dead]
    fields = [dict(r.headers).get("dlq-field") for r in dead]
    assert reasons[0].startswith(b"contains the control character U+0000")
    assert reasons[1].startswith(b"contains the control character U+0000")
    assert reasons[2].startswith(b"state must be one of")
    assert fields[:3] == [b"command_id", b"email", b"state"]
    big = dict(dead[3].headers)
    assert big["dlq-truncated"] == b"1" and big["dlq-size"] == str(size).encode()
    for group_id in (1, 2, 3):
        status, _ = await suppression.api.call("GET", f"/v1/memberships/7/{group_id}")
        assert status == 404
    await healthy(suppression)
