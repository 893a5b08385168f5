"""How far ``delivery.results`` goes and how far the scheduler has counted it: a release
checkpoint's fence (checkpoints.py).

The end offsets (high watermarks), taken after every partition answered a checkpoint, lie
above every result the senders published before answering. Once the results consumer's
group has committed offsets up to them — it commits only after the transaction that
counted a batch — a row still without a result has lost it. The group's committed offsets
count what it skipped too (a topic recreated, offsets moved past records), which the rows
it counted would not. Read with clients of their own: a consumer that joins no group (high
watermarks) and an admin client (committed offsets), made on first use and closed with the
service.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from libs.common.kafka import Publisher
from libs.common.kafkasecurity import connection_options
from libs.common.settings import CommonSettings
from libs.common.topics import Topic

#: the consumer group that counts delivery.results (app.py).
RESULTS_GROUP = "scheduler.results"
#: a broker that does not answer this fast fails the tick (retried at the next one).
TIMEOUT_SECONDS = 10.0
#: the fence's fetch waits at most this long for records (it wants only the high watermark).
FETCH_MS = 20
#: committed offsets are asked for at most this often (every sending campaign's tick may ask).
COUNTED_SECONDS = 0.5


class ResultsProgress:
    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._counted: tuple[float, dict[int, int]] | None = None

    async def ends(self, publisher: Publisher) -> tuple[int, ...]:
        """The end offset of every partition of delivery.results (index: partition)."""
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                **connection_options(self.settings),
                client_id=f"tayori-{self.settings.service}-fence",
                enable_auto_commit=False,
                fetch_max_wait_ms=FETCH_MS,
            )
            await self._start(self._consumer)
        consumer = self._consumer
        async with asyncio.timeout(TIMEOUT_SECONDS):
            partitions = await self._partitions(publisher)
            # A fetch's high watermark, not ListOffsets: the embedded broker (Tansu) answers
            # ListOffsets with the last record batch's first offset + 1, short of a batch of
            # several results. Fetching from there reads at most that batch.
            listed = await consumer.end_offsets(partitions)
            consumer.assign(partitions)
            try:
                for tp in partitions:
                    consumer.seek(tp, listed[tp])
                while any(consumer.highwater(tp) is None for tp in partitions):
                    await consumer.getmany(*partitions, timeout_ms=FETCH_MS)
                ends = [consumer.highwater(tp) or 0 for tp in partitions]
            finally:
                consumer.unsubscribe()  # no fetching in the background until the next fence
        # Partitions are numbered 0..n-1: the tuple's index is the partition.
        return tuple(ends)

    async def counted(self, publisher: Publisher) -> dict[int, int]:
        """The results group's committed offset by partition (absent: none committed)."""
        if self._counted is not None and time.monotonic() - self._counted[0] < COUNTED_SECONDS:
            return self._counted[1]
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(
                **connection_options(self.settings),
                client_id=f"tayori-{self.settings.service}-fence",
            )
            await self._start(self._admin)
        group = f"{self.settings.topic_prefix}{RESULTS_GROUP}"
        async with asyncio.timeout(TIMEOUT_SECONDS):
            partitions = await self._partitions(publisher)
            # Named partitions: the broker then answers the request's oldest version.
            offsets = await self._admin.list_consumer_group_offsets(group, partitions=partitions)
        counted = {tp.partition: o.offset for tp, o in offsets.items() if o.offset >= 0}
        self._counted = (time.monotonic(), counted)
        return counted

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        admin, self._admin = self._admin, None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()

    async def _partitions(self, publisher: Publisher) -> list[TopicPartition]:
        name = publisher.name(Topic.DELIVERY_RESULTS)
        return [
            TopicPartition(name, p) for p in sorted(await publisher.producer.partitions_for(name))
        ]

    async def _start(self, client: AIOKafkaConsumer | AIOKafkaAdminClient) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                await client.start()
        except BaseException:
            await self.close()
            raise
