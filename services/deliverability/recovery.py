"""Where faust's table recovery stops reading a changelog: at its high watermark as a fetch
reports it, not as ListOffsets does.

faust recovers a table by reading each changelog partition it holds from the start up to
the end offset it asked for (``Recovery._build_highwaters``: ListOffsets, latest) and then
takes the table as recovered. The embedded broker (Tansu) answers ListOffsets with the
last record batch's first offset + 1 (see ``services/scheduler/fence.py``): a windowed
table writes one change per window of an event (the hopping hour: 3600 / step records)
and faust's producer sends them in one batch, so the end offset it is told falls short
of that batch and the table is recovered without the rest of it — the last count before
a stop is missing from some hour windows for good. A fetch's high watermark is the
partition's real end. On Apache Kafka both answers are the same, so reading up to the
fetched one changes nothing there.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP
from faust.types.transports import ConsumerT

from libs.common.kafkasecurity import connection_options
from libs.common.logging import get_logger
from libs.common.settings import CommonSettings

log = get_logger(__name__)

#: the fetch that reads the high watermarks waits at most this long for records.
FETCH_MS = 20
#: reading the high watermarks takes at most this long (faust's own wait around it is
#: its broker_request_timeout).
ENDS_TIMEOUT_SECONDS = 30.0


async def fetched_ends(
    settings: CommonSettings, partitions: Iterable[TP], client_id: str
) -> dict[TP, int]:
    """Each partition's end offset (the next one to be written) as a fetch's high
    watermark reports it, read by a consumer of its own that joins no group: positioned at
    the listed end, one fetch reads at most the batch ListOffsets left out."""
    tps = sorted(set(partitions))
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(
        **connection_options(settings),
        client_id=client_id,
        enable_auto_commit=False,
        fetch_max_wait_ms=FETCH_MS,
    )
    try:
        async with asyncio.timeout(ENDS_TIMEOUT_SECONDS):
            await consumer.start()
            parts = [TopicPartition(tp.topic, tp.partition) for tp in tps]
            listed = await consumer.end_offsets(parts)
            consumer.assign(parts)
            for part in parts:
                consumer.seek(part, listed[part])
            while any(consumer.highwater(part) is None for part in parts):
                await consumer.getmany(*parts, timeout_ms=FETCH_MS)
            return {tp: consumer.highwater(part) or 0 for tp, part in zip(tps, parts, strict=True)}
    finally:
        await consumer.stop()


class FetchedEndRecovery(Recovery):
    """faust's recovery, reading every changelog partition up to its fetched high
    watermark (:func:`fetched_ends`) when the listed end offset falls short of it."""

    def __init__(self, *args: Any, settings: CommonSettings, **kwargs: Any) -> None:
        self.settings = settings
        super().__init__(*args, **kwargs)

    async def _build_highwaters(
        self, consumer: ConsumerT, tps: set[TP], destination: Counter[TP], title: str
    ) -> None:
        await super()._build_highwaters(consumer, tps, destination, title)
        # faust keeps the last offset (end - 1) and reads until it has seen it.
        client_id = f"{self.app.conf.broker_client_id}-recovery-ends"
        for tp, end in (await fetched_ends(self.settings, tps, client_id)).items():
            listed = destination.get(tp)
            if listed is None or end - 1 > listed:
                log.info(
                    "changelog_end_from_fetch",
                    topic=tp.topic,
                    partition=tp.partition,
                    listed_end=None if listed is None else listed + 1,
                    fetched_end=end,
                )
                destination[tp] = end - 1


def table_manager(settings: CommonSettings) -> type[TableManager]:
    """faust's TableManager (``App(TableManager=...)``) with :class:`FetchedEndRecovery`,
    whose consumer connects as every client does (:func:`connection_options
    <libs.common.kafkasecurity.connection_options>` of ``settings``)."""

    class Tables(TableManager):
        @property
        def recovery(self) -> Recovery:
            if self._recovery is None:
                self._recovery = FetchedEndRecovery(
                    self.app, self, settings=settings, beacon=self.beacon, loop=self.loop
                )
            return self._recovery

    return Tables
