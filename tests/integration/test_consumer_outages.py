"""libs/common/kafka.Consumer through a broker that fails: a dead letter the broker fails while
the partitions of a poll are handled at once (the sender's send.requests) is weather, the
round redone; a group offset past the end of a log the broker lost is read again from the
beginning instead of waited at for ever; a round fetched before a broker restarted empty
commits nothing on the new broker under the membership the member has joined it with."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kafka_errors

from libs.common import avro
from libs.common.kafka import Concurrency, Consumer, Message, Publisher, ensure_topics, reject
from libs.common.kafkafence import commit_fenced, membership
from libs.common.settings import CommonSettings
from libs.common.topics import Topic, topic_name
from tests.conftest import Kafka, Stack, eventually
from tests.integration.outage import OwnBroker
from tests.integration.test_consumer_loop import _result, running

pytestmark = pytest.mark.integration


class FlakyDeadLetters(Publisher):
    """A publisher whose first dead letter the broker fails (it restarts)."""

    def __init__(self, publisher: Publisher) -> None:
        super().__init__(publisher.settings, publisher.producer)
        self.failed = False

    async def send_raw(self, topic: Topic | str, *args: Any, **kwargs: Any) -> Any:
        if not self.failed and str(topic).endswith(".dlq"):
            self.failed = True
            raise kafka_errors.KafkaTimeoutError("the broker is restarting")
        return await super().send_raw(topic, *args, **kwargs)


async def test_a_dead_letter_the_broker_fails_with_partitions_at_once_is_weather(
    stack: Stack, kafka: Kafka, prefix: str
) -> None:
    """The TaskGroup that handles the partitions at once raises the broker's error inside an
    ExceptionGroup: still transient, so the round is redone, not the consumer stopped."""
    sent: dict[str, int] = {}
    refused: set[str] = set()
    for contact_id in range(1, 13):
        for bad in (False, True):
            result_id = str(uuid.uuid4())
            await kafka.send(Topic.DELIVERY_RESULTS, contact_id, _result(result_id))
            sent[result_id] = contact_id
            if bad:
                refused.add(result_id)
    handled: set[str] = set()

    async def handler(batch: list[Message]) -> None:
        for message in batch:
            if message.value["result_id"] in refused:
                raise reject(message, "refused")
        handled.update(m.value["result_id"] for m in batch)

    flaky = FlakyDeadLetters(kafka.publisher)
    publisher, kafka.publisher = kafka.publisher, flaky
    try:
        async with running(stack, kafka, prefix, handler, concurrency=Concurrency.AT_ONCE):

            async def all_handled() -> bool:
                return handled >= set(sent) - refused

            await eventually(all_handled)
            await kafka.read(
                Topic.DELIVERY_RESULTS.dlq, until=lambda rs: dead_lettered(rs) == refused
            )
    finally:
        kafka.publisher = publisher
    assert flaky.failed


def dead_lettered(records: list[Any]) -> set[str]:
    """The result ids of dead letters (at least once each: a redone round may repeat one)."""
    return {avro.decode(Topic.DELIVERY_RESULTS, r.value, r.headers)["result_id"] for r in records}


async def test_a_group_offset_past_the_end_of_a_lost_log_is_read_again_from_the_start(
    stack: Stack, kafka: Kafka, prefix: str
) -> None:
    """An in-memory broker that restarted empty keeps (or is given, by a member that held a
    batch through the restart) the group's old offsets, past the end of its new logs, and
    answers fetches there with "nothing yet" rather than OFFSET_OUT_OF_RANGE. The member
    reads those partitions again from their beginning, as Kafka's auto_offset_reset would,
    and commits that start: the records written since are handled, none waited for ever."""
    name = topic_name(Topic.DELIVERY_RESULTS, prefix)
    group = f"lost-{uuid.uuid4().hex[:6]}"
    first = str(uuid.uuid4())
    await kafka.send(Topic.DELIVERY_RESULTS, 7, _result(first))
    # The group's offsets as the lost log left them: five past each partition's end.
    past = AIOKafkaConsumer(
        bootstrap_servers=stack.broker.bootstrap,
        group_id=f"{prefix}{group}",
        enable_auto_commit=False,
    )
    await past.start()
    try:
        tps = [TopicPartition(name, p) for p in sorted(past.partitions_for_topic(name) or ())]
        assert tps
        past.assign(tps)
        ends = await past.end_offsets(tps)
        await past.commit({tp: ends[tp] + 5 for tp in tps})
    finally:
        await past.stop()

    handled: list[str] = []

    async def handler(batch: list[Message]) -> None:
        handled.extend(m.value["result_id"] for m in batch)

    settings = CommonSettings(
        kafka_bootstrap=stack.broker.bootstrap,
        topic_prefix=prefix,
        service="test",
        kafka_session_timeout_ms=1000,
        kafka_profile="embedded",
    )
    consumer = Consumer(
        settings, kafka.publisher, group=group, topics=[Topic.DELIVERY_RESULTS], handler=handler
    )
    await consumer.start()
    task = asyncio.ensure_future(consumer.run())
    try:
        later = [str(uuid.uuid4()) for _ in range(3)]
        for result_id in later:
            await kafka.send(Topic.DELIVERY_RESULTS, 7, _result(result_id))

        async def all_read() -> bool:
            return set(handled) >= {first, *later}

        await eventually(all_read)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
    # The group's offsets are inside the logs again.
    check = AIOKafkaConsumer(bootstrap_servers=stack.broker.bootstrap, group_id=f"{prefix}{group}")
    await check.start()
    try:
        ends = await check.end_offsets(tps)
        for tp in tps:
            committed = await check.committed(tp)
            assert committed is not None and committed <= ends[tp], (tp, committed, ends[tp])
    finally:
        await check.stop()


async def test_a_round_fetched_before_a_broker_restart_commits_nothing_on_the_empty_broker(
    stack: Stack, prefix: str, tmp_path: Path
) -> None:
    """A member fetches three records, the broker restarts empty, three new records take
    offsets 0-2 of the new log, and the member, forgotten, joins the new broker's group.
    The round's commit of offset 3 is not sent under the new membership
    (libs/common/kafkafence.py): the new records stay to be read. aiokafka's own commit, in
    the same place, is taken, and would skip them."""
    own = OwnBroker(stack, tmp_path / "broker.log")
    name = topic_name(Topic.DELIVERY_RESULTS, prefix)
    tp = TopicPartition(name, 0)
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=own.bootstrap,
        group_id=f"{prefix}fence",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=10000,
        heartbeat_interval_ms=200,
    )
    try:
        await ensure_topics(own.bootstrap, prefix, partitions=2)
        await _produce(own.bootstrap, name, 3)
        await consumer.start()
        fetched_records: list[Any] = []

        async def fetched_all() -> bool:
            batches = await consumer.getmany(tp, timeout_ms=200)
            fetched_records.extend(batches.get(tp, []))
            return len(fetched_records) == 3

        await eventually(fetched_all)
        fetched = membership(consumer)
        assert fetched.joined

        own.stop()
        await own.start_again(prefix)
        await _produce(own.bootstrap, name, 3)  # offsets 0-2 of the new log

        async def joined_again() -> bool:
            now = membership(consumer)
            return now.joined and now != fetched and bool(consumer.assignment())

        await eventually(joined_again)
        reason = await commit_fenced(
            consumer, fetched, {tp: 3}, assignment=0, assignments=lambda: 0
        )
        assert reason == "the membership changed while the records were handled"
        assert await consumer.committed(tp) is None

        # The defect the fence prevents: the same commit through aiokafka goes out under
        # the new membership and the empty broker takes it, past its new records.
        await consumer.commit({tp: 3})
        assert await consumer.committed(tp) == 3
    finally:
        await consumer.stop()
        own.stop()


async def _produce(bootstrap: str, name: str, count: int) -> None:
    """``count`` records to partition 0 of ``name``; a first produce after a restart may be
    refused (Tansu's UnknownError): it is sent again."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        sent = 0
        while sent < count:
            try:
                await producer.send_and_wait(name, b"record", partition=0)
            except kafka_errors.KafkaError:
                await asyncio.sleep(0.1)
                continue
            sent += 1
    finally:
        await producer.stop()
