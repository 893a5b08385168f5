"""libs/common/kafka.Consumer through the real broker: its fetch wait follows its topic (the
normal wait while records come, the idle wait after a second without any), a consumer
that opts in handles the partitions of a poll at once, or together in one batch, and no
record stops it: a value PostgreSQL refuses and a record too large to dead-letter whole
both end in the DLQ while the rest is applied."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from libs.common import avro
from libs.common.kafka import (
    DLQ_EXCERPT_BYTES,
    QUIET_FETCH_MAX_WAIT_MS,
    Concurrency,
    Consumer,
    Handler,
    Message,
    make_producer,
    reject,
)
from libs.common.settings import CommonSettings
from libs.common.topics import Topic, topic_name
from tests.conftest import Kafka, Stack, eventually

BUSY_MS = 20
IDLE_MS = QUIET_FETCH_MAX_WAIT_MS  # a normal consumer's idle wait on the embedded broker


@contextlib.asynccontextmanager
async def running(
    stack: Stack, kafka: Kafka, prefix: str, handler: Handler, **options: Any
) -> AsyncIterator[Consumer]:
    """A Consumer of delivery.results with ``options``, running until the block ends."""
    settings = CommonSettings(
        kafka_bootstrap=stack.broker.bootstrap,
        topic_prefix=prefix,
        service="test",
        kafka_session_timeout_ms=1000,
        kafka_profile="embedded",
        kafka_fetch_max_wait_ms=BUSY_MS,
    )
    consumer = Consumer(
        settings,
        kafka.publisher,
        group=f"loop-{uuid.uuid4().hex[:6]}",
        topics=[Topic.DELIVERY_RESULTS],
        handler=handler,
        **options,
    )
    await consumer.start()
    task = asyncio.ensure_future(consumer.run())
    try:
        yield consumer
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()


@contextlib.asynccontextmanager
async def consuming(
    stack: Stack, kafka: Kafka, prefix: str, seen: list[tuple[str, int]]
) -> AsyncIterator[Consumer]:
    consumer: Consumer

    async def handler(batch: list[Message]) -> None:
        # The wait the consumer fetches with while it handles what came.
        wait = consumer._consumer._fetcher._fetch_max_wait_ms  # type: ignore[union-attr]
        seen.extend((m.value["result_id"], wait) for m in batch)

    async with running(stack, kafka, prefix, handler) as c:
        consumer = c
        yield consumer


def _result(result_id: str) -> dict[str, object]:
    return {
        "result_id": result_id,
        "campaign_id": str(uuid.uuid4()),
        "contact_id": 1,
        "email": "a@example.jp",
        "outcome": "sent",
        "smtp_code": 250,
        "enhanced_code": None,
        "diagnostic": None,
        "relay": "r",
        "message_id": None,
        "step_id": None,
        "suppressed_reason": None,
        "occurred_at": 0,
    }


async def test_idle_consumer_polls_with_the_idle_wait_and_busy_with_the_normal_one(
    stack: Stack, kafka: Kafka, prefix: str
) -> None:
    seen: list[tuple[str, int]] = []
    async with consuming(stack, kafka, prefix, seen) as consumer:

        async def idle_wait() -> bool:
            fetcher = consumer._consumer._fetcher  # type: ignore[union-attr]
            return bool(fetcher._fetch_max_wait_ms == IDLE_MS)

        await eventually(idle_wait)  # nothing came for a second
        first = str(uuid.uuid4())
        await kafka.send(Topic.DELIVERY_RESULTS, 1, _result(first))

        async def handled() -> bool:
            return any(r == first for r, _ in seen)

        await eventually(handled)  # the first record after the lull still arrives
        # The batch is handled with the normal wait: what follows comes without the lull's.
        assert [w for r, w in seen if r == first] == [BUSY_MS]
        await eventually(idle_wait)  # and a second later it is idle again
        second = str(uuid.uuid4())
        await kafka.send(Topic.DELIVERY_RESULTS, 1, _result(second))

        async def handled_second() -> bool:
            return any(r == second for r, _ in seen)

        await eventually(handled_second)
        assert [w for r, w in seen if r == second] == [BUSY_MS]


async def test_partitions_of_a_poll_are_handled_at_once_when_asked(
    stack: Stack, kafka: Kafka, prefix: str
) -> None:
    # Both partitions have records before the consumer starts: its first poll holds both.
    sent = {}
    for contact_id in range(1, 40):
        result_id = str(uuid.uuid4())
        await kafka.send(Topic.DELIVERY_RESULTS, contact_id, _result(result_id))
        sent[result_id] = contact_id
    started: dict[int, asyncio.Event] = {}
    overlapped: list[int] = []
    handled: list[str] = []

    async def handler(batch: list[Message]) -> None:
        mine = batch[0].partition
        started.setdefault(mine, asyncio.Event()).set()
        others = [e for p, e in started.items() if p != mine]
        # Sequential handling would never see another partition's handler under way.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while not others:
                    await asyncio.sleep(0.01)
                    others = [e for p, e in started.items() if p != mine]
                overlapped.append(mine)
        handled.extend(m.value["result_id"] for m in batch)

    async def all_handled() -> bool:
        return set(handled) >= set(sent)

    async with running(stack, kafka, prefix, handler, concurrency=Concurrency.AT_ONCE):
        await eventually(all_handled)
    assert len(started) == 2  # the test's topics have two partitions
    assert len(set(overlapped)) == 2, "the two partitions' handlers did not run at once"


async def test_partitions_of_a_poll_are_handled_together_when_asked(
    stack: Stack, kafka: Kafka, prefix: str
) -> None:
    """One handler call for every partition's records of a poll, each partition's in offset
    order; a refused record is dead-lettered by its own partition and offset, the rest of
    the batch handled once."""
    sent = {}
    for contact_id in range(1, 40):
        result_id = str(uuid.uuid4())
        await kafka.send(Topic.DELIVERY_RESULTS, contact_id, _result(result_id))
        sent[result_id] = contact_id
    refused = next(r for r, c in sent.items() if c == 7)
    calls: list[list[Message]] = []
    handled: list[str] = []

    async def handler(batch: list[Message]) -> None:
        calls.append(batch)
        for message in batch:
            if message.value["result_id"] == refused:
                raise reject(message, "contact 7 is refused")
        handled.extend(m.value["result_id"] for m in batch)

    async def all_handled() -> bool:
        return set(handled) >= set(sent) - {refused}

    async with running(stack, kafka, prefix, handler, concurrency=Concurrency.TOGETHER):
        await eventually(all_handled)
        dead = await kafka.read(Topic.DELIVERY_RESULTS.dlq, until=lambda rs: len(rs) >= 1)
    assert sorted(handled) == sorted(set(sent) - {refused})  # each once
    assert any(len({m.partition for m in batch}) == 2 for batch in calls)
    for batch in calls:
        for partition in {m.partition for m in batch}:
            offsets = [m.offset for m in batch if m.partition == partition]
            assert offsets == sorted(offsets)
    bad = next(m for batch in calls for m in batch if m.value["result_id"] == refused)
    headers = dict(dead[0].headers)
    assert (headers["dlq-partition"], headers["dlq-offset"]) == (
        str(bad.partition).encode(),
        str(bad.offset).encode(),
    )
    assert avro.decode(Topic.DELIVERY_RESULTS, dead[0].value, dead[0].headers) == bad.value


async def test_a_value_the_database_refuses_is_dead_lettered_and_the_rest_applied(
    stack: Stack, kafka: Kafka, prefix: str, database: str
) -> None:
    """A NUL in one record's text makes PostgreSQL refuse the whole batch's statement
    (class 22, naming no record): the loop splits the batch until that record is alone,
    dead-letters it with the database's reason, and every other record is written once."""
    conn = await asyncpg.connect(database)
    await conn.execute("CREATE TABLE seen (result_id text PRIMARY KEY, relay text)")
    sent = []
    for contact_id in range(1, 30):
        result = _result(str(uuid.uuid4()))
        if contact_id == 11:
            result["relay"] = "bad\x00relay"
        sent.append(result)
        await kafka.send(Topic.DELIVERY_RESULTS, 1, result)  # one partition, one batch
    poisoned = sent[10]["result_id"]

    async def handler(batch: list[Message]) -> None:
        await conn.execute(
            "INSERT INTO seen SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
            [m.value["result_id"] for m in batch],
            [m.value["relay"] for m in batch],
        )

    try:
        async with running(stack, kafka, prefix, handler):
            dead = await kafka.read(Topic.DELIVERY_RESULTS.dlq, until=lambda rs: len(rs) >= 1)

            # The handler keeps using ``conn``: count on a connection of our own.
            reader = await asyncpg.connect(database)

            async def all_written() -> bool:
                return await reader.fetchval("SELECT count(*) FROM seen") == len(sent) - 1

            try:
                await eventually(all_written)
            finally:
                await reader.close()
        stored = {r["result_id"] for r in await conn.fetch("SELECT result_id FROM seen")}
    finally:
        await conn.close()
    assert stored == {r["result_id"] for r in sent} - {poisoned}
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["dlq-stage"] == b"process"
    assert b"0x00" in headers["dlq-reason"]  # the database says what it refused
    assert avro.decode(Topic.DELIVERY_RESULTS, dead[0].value, dead[0].headers)["result_id"] == (
        poisoned
    )


async def test_a_record_too_large_to_dead_letter_whole_goes_as_an_excerpt(
    stack: Stack, kafka: Kafka, prefix: str
) -> None:
    """A 1.5 MB record that the handler refuses is larger than a dead letter may be: its
    first DLQ_EXCERPT_BYTES go, with its size and SHA-256, and the next record is handled."""
    huge = _result(str(uuid.uuid4()))
    huge["diagnostic"] = "x" * 1_500_000
    after = _result(str(uuid.uuid4()))
    data, _ = avro.encode(Topic.DELIVERY_RESULTS, huge)
    producer = make_producer(
        CommonSettings(kafka_bootstrap=stack.broker.bootstrap), max_request_size=4 << 20
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            topic_name(Topic.DELIVERY_RESULTS, prefix),
            data,
            key=b"1",
            headers=[(avro.VERSION_HEADER, b"1")],
        )
    finally:
        await producer.stop()
    await kafka.send(Topic.DELIVERY_RESULTS, 1, after)
    handled: list[str] = []

    async def handler(batch: list[Message]) -> None:
        for message in batch:
            if message.value["diagnostic"] and len(message.value["diagnostic"]) > 10_000:
                raise reject(message, "diagnostic too long")
        handled.extend(m.value["result_id"] for m in batch)

    async with running(stack, kafka, prefix, handler):

        async def next_handled() -> bool:
            return after["result_id"] in handled

        await eventually(next_handled)
        dead = await kafka.read(Topic.DELIVERY_RESULTS.dlq, until=lambda rs: len(rs) >= 1)
    headers = dict(dead[0].headers)
    assert headers["dlq-truncated"] == b"1"
    assert headers["dlq-size"] == str(len(data)).encode()
    assert headers["dlq-sha256"] == hashlib.sha256(data).hexdigest().encode()
    assert headers["dlq-reason"] == b"diagnostic too long"
    assert dead[0].value == data[:DLQ_EXCERPT_BYTES]
