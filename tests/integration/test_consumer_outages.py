"""libs/common/kafka.Consumer handling the partitions of a poll at once (the sender's
send.requests) through a broker that fails a dead letter: the round is weather, redone."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka import errors as kafka_errors

from libs.common import avro
from libs.common.kafka import Concurrency, Message, Publisher, reject
from libs.common.topics import Topic
from tests.conftest import Kafka, Stack, eventually
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
