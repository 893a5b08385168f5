"""libs/common/kafka.Consumer through the real broker: its fetch wait follows its topic (the
normal wait while records come, the idle wait after a second without any), and a consumer
that opts in handles the partitions of a poll at once, or together in one batch."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from libs.common import avro
from libs.common.kafka import Consumer, Handler, Message, reject
from libs.common.settings import CommonSettings
from libs.common.topics import Topic
from tests.conftest import Kafka, Stack, eventually

BUSY_MS = 20
IDLE_MS = 250


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

    async with running(stack, kafka, prefix, handler, idle_fetch_max_wait_ms=IDLE_MS) as c:
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

    async with running(stack, kafka, prefix, handler, partitions_at_once=True):
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

    async with running(stack, kafka, prefix, handler, partitions_together=True):
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
