"""Dead letters: what a consumer leaves in ``<topic>.dlq``, read back for operators.

A consumer that cannot process a record (``libs/common/kafka.Consumer``) publishes it to
its topic's DLQ as it was — key, value bytes, headers (the Avro schema version among
them) — plus headers saying where it came from and why: ``dlq-stage`` (decode, process;
skip for a record an operator skipped), ``dlq-reason``, ``dlq-topic`` (the broker-side
name, prefix included), ``dlq-partition``, ``dlq-offset``, ``dlq-consumer-group`` (the
group as the service declares it, without the prefix) and, when the refusal names one,
``dlq-field``. A record too large to keep whole is
kept as an excerpt with ``dlq-size`` (its length in bytes), ``dlq-sha256`` (hex) and
``dlq-truncated: 1``: it can be inspected, not replayed.

:class:`DeadLetter` is one such record; :func:`read_range` reads records of partitions
between two offsets without a consumer group (nothing is committed);
:func:`dead_letter_headers` builds the headers for a record dead-lettered by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

STAGE = "dlq-stage"
REASON = "dlq-reason"
TOPIC = "dlq-topic"
PARTITION = "dlq-partition"
OFFSET = "dlq-offset"
GROUP = "dlq-consumer-group"
#: the field of the record at fault, when the refusal names one.
FIELD = "dlq-field"
SIZE = "dlq-size"
SHA256 = "dlq-sha256"
TRUNCATED = "dlq-truncated"
#: every header a dead-lettering adds starts so; a replay sends the others.
HEADER_PREFIX = "dlq-"
#: the longest reason a dead letter keeps (as kafka.Consumer does).
REASON_LIMIT = 2000

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True)
class DeadLetter:
    """One record of a DLQ, where it sits there and what its headers say."""

    dlq: str  # broker-side name of the DLQ topic
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_record(cls, record: ConsumerRecord[Any, Any]) -> DeadLetter:
        return cls(
            dlq=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=tuple((name, bytes(value or b"")) for name, value in record.headers or ()),
        )

    def header(self, name: str) -> str | None:
        """The header's value as text; the last one wins (a dead-lettering appends its own
        after the record's)."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return None if found is None else found.decode("utf-8", "replace")

    def _int_header(self, name: str) -> int | None:
        raw = self.header(name)
        try:
            return None if raw is None else int(raw)
        except ValueError:
            return None

    @property
    def stage(self) -> str | None:
        return self.header(STAGE)

    @property
    def reason(self) -> str | None:
        return self.header(REASON)

    @property
    def original_topic(self) -> str | None:
        """Broker-side name of the topic the record was read from (prefix included)."""
        return self.header(TOPIC)

    @property
    def original_partition(self) -> int | None:
        return self._int_header(PARTITION)

    @property
    def original_offset(self) -> int | None:
        return self._int_header(OFFSET)

    @property
    def consumer_group(self) -> str | None:
        return self.header(GROUP)

    @property
    def truncated(self) -> bool:
        """Whether the value is only an excerpt of a record too large to keep whole."""
        return (self.header(TRUNCATED) or "").strip() not in ("", "0")

    @property
    def size(self) -> int | None:
        """The original value's length in bytes (only an excerpt's record says)."""
        return self._int_header(SIZE)

    @property
    def sha256(self) -> str | None:
        return self.header(SHA256)

    def original_headers(self) -> list[tuple[str, bytes]]:
        """The headers the record had before it was dead-lettered, in order."""
        return [(k, v) for k, v in self.headers if not k.startswith(HEADER_PREFIX)]


def dead_letter_headers(
    headers: Iterable[tuple[str, bytes]],
    *,
    stage: str,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    group: str,
    field: str | None = None,
) -> list[tuple[str, bytes]]:
    """A record's headers followed by the ones a consumer adds when it dead-letters it."""
    added = [
        *headers,
        (STAGE, stage.encode()),
        (REASON, reason[:REASON_LIMIT].encode()),
        (TOPIC, topic.encode()),
        (PARTITION, str(partition).encode()),
        (OFFSET, str(offset).encode()),
        (GROUP, group.encode()),
    ]
    if field:
        added.append((FIELD, field.encode()))
    return added


async def read_range(
    consumer: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, tuple[int, int]],
    *,
    timeout: float = 120.0,
) -> list[ConsumerRecord[Any, Any]]:
    """The records of each partition from offset ``start`` up to (not including) ``end``,
    per partition in offset order.

    ``consumer`` has no group (``group_id=None``): it is assigned the partitions and reads
    by position, so nothing is committed and no group notices. ``end`` should be at most
    the partition's end offset as read before; records may be missing in between only
    where the log has none (compaction, transaction markers).
    """
    wanted = {tp: (start, end) for tp, (start, end) in ranges.items() if end > start}
    records: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {tp: [] for tp in wanted}
    if not wanted:
        return []
    consumer.assign(list(wanted))
    for tp, (start, _) in wanted.items():
        consumer.seek(tp, start)
    async with asyncio.timeout(timeout):
        while True:
            behind = [tp for tp, (_, end) in wanted.items() if await consumer.position(tp) < end]
            if not behind:
                break
            batches = await consumer.getmany(*behind, timeout_ms=500)
            for tp, batch in batches.items():
                start, end = wanted[tp]
                records[tp].extend(r for r in batch if start <= r.offset < end)
    return [record for tp in wanted for record in records[tp]]
