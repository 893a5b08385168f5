"""Kafka plumbing: a publisher, a batch consumer loop with DLQ, and topic creation.

The consumer loop is the at-least-once contract every service follows::

    fetch batch → decode each message → handler(batch) writes to PostgreSQL → commit offsets

A message that cannot be decoded, or that the handler rejects with
:class:`InvalidMessage`, goes to ``<topic>.dlq`` with headers naming the stage, reason,
partition and offset, and the loop moves on. :class:`TransientError` and connection
errors are retried (forever, with backoff) without committing, so nothing is skipped.
A :class:`DlqLimit` stops the consumer when most of what it reads is dead-lettered:
that is a bad deploy or a bad producer, and discarding it quietly would lose data.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import IllegalStateError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner

from libs.common import avro, deadletters, registry, trace
from libs.common.errors import DlqLimitExceeded, Fault, InvalidMessage, classify
from libs.common.kafkafence import commit_fenced, membership
from libs.common.kafkasecurity import connection_options
from libs.common.logging import get_logger
from libs.common.metrics import (
    BATCH_SECONDS,
    CONSUMER_LAG,
    CONSUMER_LAST_PROGRESS,
    CONSUMER_SECONDS_SINCE_COMMIT,
    MESSAGES_CONSUMED,
    MESSAGES_DEAD_LETTERED,
    MESSAGES_PUBLISHED,
    PRODUCER_PENDING,
)
from libs.common.retry import FOREVER, retry, supervise
from libs.common.settings import CommonSettings
from libs.common.topics import DEFAULT_PARTITIONS, Topic, all_topic_names, topic_name

log = get_logger(__name__)
T = TypeVar("T")

#: a dead letter's value is published whole up to this size (Apache Kafka's default
#: message.max.bytes is 1 MiB, headers and batch overhead included) ...
DLQ_WHOLE_BYTES = 900 * 1024
#: ... and beyond it as an excerpt of this many bytes, with the whole value's size and
#: SHA-256 in headers (``dlq-truncated``, ``dlq-size``, ``dlq-sha256``).
DLQ_EXCERPT_BYTES = 64 * 1024


def make_producer(settings: CommonSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer for at-least-once delivery: acks from all replicas, no idempotence.

    The embedded broker refuses idempotent producers, and every consumer is idempotent
    anyway, so nothing depends on it.
    """
    options: dict[str, Any] = {
        **connection_options(settings),
        "client_id": f"tayori-{settings.service}",
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "compression_type": None,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


class Publisher:
    """Sends Avro-encoded records to Tayori topics under the configured prefix.

    Counts the records it handed to the producer and the broker has not acknowledged yet
    (``tayori_producer_pending_records``): the producer's queue, from our side of its
    public API."""

    def __init__(self, settings: CommonSettings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer
        self._partitioner = DefaultPartitioner()
        self._pending = PRODUCER_PENDING.labels(settings.service)

    def _queued(self, future: asyncio.Future[Any], records: int) -> None:
        """``records`` wait in the producer until ``future`` (their acknowledgement) is
        done, acknowledged or failed."""
        self._pending.inc(records)
        future.add_done_callback(lambda _: self._pending.dec(records))

    def name(self, topic: Topic | str) -> str:
        return topic_name(topic, self.settings.topic_prefix)

    async def send(
        self, topic: Topic, key: str | int | None, value: dict[str, Any]
    ) -> asyncio.Future[Any]:
        """Queue one record, in the current trace; await the returned future for its
        acknowledgement."""
        data, headers = avro.encode(topic, value)
        return await self.send_raw(topic, key, data, headers + trace.headers())

    async def send_raw(
        self,
        topic: Topic | str,
        key: str | int | None,
        data: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        raw_key = None if key is None else str(key).encode()
        future = await self.producer.send(self.name(topic), data, key=raw_key, headers=headers)
        self._queued(future, 1)
        MESSAGES_PUBLISHED.labels(self.settings.service, topic_label(topic)).inc()
        return future

    async def send_keyed(
        self, topic: Topic, records: Iterable[tuple[str | int, dict[str, Any]]]
    ) -> list[asyncio.Future[Any]]:
        """Queue many (key, value) records through the batch API, in the current trace;
        await the futures.

        Each key goes to the partition the default partitioner would choose, and the
        records of one key stay in order; building batches directly skips aiokafka's
        per-record work, which is most of the cost of streaming a large list.
        """
        encoded = []
        traced = trace.headers()
        for key, value in records:
            data, headers = avro.encode(topic, value)
            encoded.append((key, data, headers + traced if traced else headers))
        return await self.send_encoded(topic, encoded)

    async def send_encoded(
        self,
        topic: Topic | str,
        records: Iterable[tuple[str | int | None, bytes, list[tuple[str, bytes]]]],
    ) -> list[asyncio.Future[Any]]:
        """:meth:`send_keyed` for records encoded already: (key, data, headers), sent with
        the headers given (a trace among them is the caller's to add).

        Each batch is closed when handed over, so it goes out without waiting
        ``linger_ms`` for records that will not come (the caller awaits its futures).
        """
        name = self.name(topic)
        partitions = sorted(await self.producer.partitions_for(name))
        chosen: dict[bytes, int] = {}
        by_partition: dict[int, list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]] = {}
        for key, data, headers in records:
            raw_key = None if key is None else str(key).encode()
            partition = chosen.get(raw_key) if raw_key is not None else None
            if partition is None:
                partition = self._partitioner(raw_key, partitions, partitions)
                if raw_key is not None:
                    chosen[raw_key] = partition
            by_partition.setdefault(partition, []).append((raw_key, data, headers))
        futures: list[asyncio.Future[Any]] = []
        count = 0
        for partition, items in by_partition.items():
            batch = self.producer.create_batch()
            for raw_key, data, headers in items:
                if batch.append(key=raw_key, value=data, timestamp=None, headers=headers) is None:
                    futures.append(await self._send_batch(batch, name, partition))
                    batch = self.producer.create_batch()
                    batch.append(key=raw_key, value=data, timestamp=None, headers=headers)
            if batch.record_count():
                futures.append(await self._send_batch(batch, name, partition))
            count += len(items)
        MESSAGES_PUBLISHED.labels(self.settings.service, topic_label(topic)).inc(count)
        return futures

    async def _send_batch(self, batch: Any, name: str, partition: int) -> asyncio.Future[Any]:
        records = batch.record_count()
        batch.close()
        future = await self.producer.send_batch(batch, name, partition=partition)
        self._queued(future, records)
        return future

    async def send_same_key(
        self, topic: Topic, key: str | int, values: Iterable[dict[str, Any]]
    ) -> list[asyncio.Future[Any]]:
        """:meth:`send_keyed` for records of one key (one partition, in order)."""
        return await self.send_keyed(topic, ((key, value) for value in values))

    async def send_and_wait(
        self, topic: Topic, key: str | int | None, value: dict[str, Any]
    ) -> Any:
        return await (await self.send(topic, key, value))


def topic_label(topic: Topic | str) -> str:
    return topic.value if isinstance(topic, Topic) else topic


async def ensure_topics(
    where: str | CommonSettings, prefix: str = "", partitions: int = DEFAULT_PARTITIONS
) -> None:
    """Create every Tayori topic and DLQ that does not exist yet, on ``where``: a bootstrap
    address (the embedded broker) or the cluster the settings name, with their security."""
    options = (
        connection_options(where)
        if isinstance(where, CommonSettings)
        else {"bootstrap_servers": where}
    )
    admin = AIOKafkaAdminClient(**options, client_id="tayori-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = []
        for name in all_topic_names(prefix):
            if name in existing:
                continue
            configs = (
                {"cleanup.policy": "compact"}
                if name.endswith(Topic.CONTACTS_CHANGELOG.value)
                else {}
            )
            wanted.append(NewTopic(name, partitions, 1, topic_configs=configs))
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


class Latency(enum.Enum):
    """Who waits on a consumer's records (:class:`Pacing` turns it into fetch waits)."""

    #: a person waits to see the change (an unsubscribe showing in search).
    CRITICAL = "critical"
    NORMAL = "normal"
    #: nobody waits on it to the millisecond (counters, history, copies read later).
    QUIET = "quiet"


class Concurrency(enum.Enum):
    """How a consumer hands a poll's records to its handler."""

    #: one partition's records after another: the default (CPU-bound handlers were measured
    #: slower handled concurrently).
    SEQUENTIAL = "one partition at a time"
    #: every partition's records at once, each still in offset order: for a handler that
    #: mostly waits (the sender on SMTP replies), whose keys never span partitions.
    AT_ONCE = "partitions at once"
    #: one handler call with every partition's records of a poll (each partition's in
    #: offset order): for a handler whose transaction costs more than its few records.
    TOGETHER = "partitions together"


#: the quiet fetch wait on a broker that waits out every fetch (ms).
QUIET_FETCH_MAX_WAIT_MS = 250
#: a consumer's lag gauges are refreshed this often (seconds), from what its own fetches
#: and commits already know: no request to the broker of their own.
LAG_REFRESH_SECONDS = 1.0
#: the stages a dead letter is counted under (``tayori_messages_dead_lettered_total``).
DEAD_LETTER_STAGES = ("decode", "process")


@dataclass(frozen=True)
class Pacing:
    """How long a consumer's fetches may wait: ``busy`` while records come, ``idle`` after
    a second without any (None: always ``busy``).

    On Apache Kafka (``KAFKA_PROFILE=kafka``, the default) a fetch is answered as soon as
    records arrive: its wait is only a ceiling, an idle consumer costs the broker next to
    nothing, and every latency class fetches with ``KAFKA_FETCH_MAX_WAIT_MS``. The embedded
    broker of the dev profile (``KAFKA_PROFILE=embedded``) waits out every fetch and spends
    CPU on each, idle or not: there the wait is the latency floor, so paths a person waits
    on poll fast while records come, and a lull is polled slowly."""

    busy: int
    idle: int | None = None

    @classmethod
    def of(cls, latency: Latency, settings: CommonSettings) -> Pacing:
        if settings.kafka_profile != "embedded":
            return cls(settings.kafka_fetch_max_wait_ms)
        if latency is Latency.CRITICAL:
            return cls(settings.kafka_fast_fetch_max_wait_ms, settings.kafka_fetch_max_wait_ms)
        if latency is Latency.QUIET:
            return cls(QUIET_FETCH_MAX_WAIT_MS)
        return cls(settings.kafka_fetch_max_wait_ms, QUIET_FETCH_MAX_WAIT_MS)


@dataclass
class Message:
    """One consumed record: its decoded value and where it came from."""

    topic: Topic
    key: str | None
    value: dict[str, Any]
    partition: int
    offset: int
    timestamp_ms: int
    #: the traceparent its headers carry (libs/common/trace), if any.
    trace: str | None = None


@dataclass
class DlqLimit:
    """Stop when more than ``ratio`` of the last ``window`` messages were dead-lettered
    and at least ``minimum`` were: a poison pill moves on, a bad deploy stops."""

    ratio: float = 0.5
    minimum: int = 100
    window: int = 1000
    _recent: deque[bool] = field(default_factory=deque)
    _bad: int = 0  # dead-lettered among _recent, kept as we go (this runs per message)

    def record(self, dead_lettered: bool) -> None:
        self._recent.append(dead_lettered)
        self._bad += dead_lettered
        if len(self._recent) > self.window:
            self._bad -= self._recent.popleft()
        bad = self._bad
        if dead_lettered and bad >= self.minimum and bad > self.ratio * len(self._recent):
            raise DlqLimitExceeded(
                f"{bad} of the last {len(self._recent)} messages were dead-lettered"
            )


Handler = Callable[[list[Message]], Awaitable[None]]


#: the consumer whose handler runs in this context (see :func:`still_working`).
_HANDLING: contextvars.ContextVar[Consumer | None] = contextvars.ContextVar(
    "handling", default=None
)


class _Assignments(ConsumerRebalanceListener):
    """Counts the assignments the group gives ``consumer`` (aiokafka calls it on each)."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.consumer.assignments += 1


def still_working() -> None:
    """Called by a handler that waits by design — the sender's batch while every SMTP relay
    is down, uncommitted so nothing is lost: its consumer counts as making progress, so
    /healthz does not get a waiting service restarted."""
    consumer = _HANDLING.get()
    if consumer is not None:
        consumer.last_progress = time.monotonic()


class Consumer:
    """A consumer group member running ``handler`` on batches of decoded messages.

    ``handler`` receives the batch of one partition in offset order (per-key order holds)
    and must be idempotent: after a crash, everything since the last commit comes again.
    It may raise :class:`InvalidMessage` with ``.message`` set to reject one message; the
    loop dead-letters it and calls the handler again with the rest of the batch.
    """

    def __init__(
        self,
        settings: CommonSettings,
        publisher: Publisher,
        *,
        group: str,
        topics: Sequence[Topic],
        handler: Handler,
        max_records: int = 2000,
        dlq_limit: DlqLimit | None = None,
        latency: Latency = Latency.NORMAL,
        concurrency: Concurrency = Concurrency.SEQUENTIAL,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.group = group
        self.topics = list(topics)
        self.handler = handler
        self.max_records = max_records
        self.pacing = Pacing.of(latency, settings)
        self.concurrency = concurrency
        self.dlq_limit = dlq_limit or DlqLimit(settings.dlq_limit_ratio, settings.dlq_limit_min)
        self._by_name = {topic_name(t, settings.topic_prefix): t for t in self.topics}
        self._consumer: AIOKafkaConsumer | None = None
        self.last_progress = time.monotonic()
        #: writer schemas of Confluent-framed records on upstream topics (None: not read)
        self.registry = registry.registry_for(settings, self.topics)
        #: when this member last committed (its start, before the first commit).
        self.last_commit = time.monotonic()
        #: the group's committed offset of each partition this member holds, as far as this
        #: member knows it: what it committed, or where it started reading the partition.
        self._committed: dict[TopicPartition, int] = {}
        self._lag_series: set[tuple[str, str, str]] = set()
        #: how many assignments the group gave this member: a round whose records came
        #: under an earlier one does not commit them (see _round).
        self.assignments = 0

    @property
    def assigned(self) -> bool:
        """Whether the group gave this member partitions (it may still be joining)."""
        return self._consumer is not None and bool(self._consumer.assignment())

    async def start(self) -> None:
        s = self.settings
        self._consumer = AIOKafkaConsumer(
            **connection_options(s),
            group_id=f"{s.topic_prefix}{self.group}",
            client_id=f"tayori-{s.service}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(100, s.kafka_session_timeout_ms // 5),
            fetch_max_wait_ms=self.pacing.busy,
            max_poll_records=self.max_records,
        )
        self._consumer.subscribe(list(self._by_name), listener=_Assignments(self))
        await self._consumer.start()
        self._observe()

    def _observe(self) -> None:
        """Series that must exist from the start, at zero, so that an alert sees the first
        dead letter after a restart (``rate()`` of a series born at 1 is 0), and the seconds
        since the last commit, read at scrape."""
        self.last_commit = time.monotonic()
        for topic in self.topics:
            for stage in DEAD_LETTER_STAGES:
                MESSAGES_DEAD_LETTERED.labels(self.settings.service, topic.value, stage)
            for outcome in ("ok", "dead_lettered"):
                MESSAGES_CONSUMED.labels(self.settings.service, topic.value, outcome)
        CONSUMER_SECONDS_SINCE_COMMIT.labels(self.group).set_function(
            lambda: time.monotonic() - self.last_commit
        )

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self.registry is not None:
            await self.registry.close()
        for series in self._lag_series:
            CONSUMER_LAG.remove(*series)
        self._lag_series.clear()
        CONSUMER_SECONDS_SINCE_COMMIT.remove(self.group)

    async def run(self) -> None:
        """Consume until cancelled. Offsets are committed only after the handler succeeded.

        A transient failure anywhere in a round (a broker restarting, a commit refused after
        a rebalance, a dead letter that could not be published) is weather: the rounds are
        started again with backoff (:func:`~libs.common.retry.supervise`), from the committed
        offsets, so what was not committed is handled again (handlers are idempotent). Only
        a bug leaves the loop."""
        assert self._consumer is not None, "start() first"
        consumer = self._consumer
        started = False

        async def rounds() -> None:
            nonlocal started
            if started:  # again, after a failed round: its records were fetched, not committed
                await self._rewind(consumer)
            started = True
            while True:
                await self._round(consumer)

        # Lag is published by a loop of its own: a member stuck in a batch must still show
        # the records it is not committing.
        watch = asyncio.ensure_future(self._watch_lag(consumer))
        watch.add_done_callback(self._lag_watch_ended)
        try:
            await supervise(rounds, name=f"consumer:{self.group}", service=self.settings.service)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _round(self, consumer: AIOKafkaConsumer) -> None:
        """One poll: fetch, handle every partition's records, commit."""
        batches = await consumer.getmany(timeout_ms=1000, max_records=self.max_records)
        # The records are of this assignment, fetched under this membership (kafkafence.py).
        assignment, fetched = self.assignments, membership(consumer)
        self.alive()
        CONSUMER_LAST_PROGRESS.labels(self.settings.service, self.group).set(time.time())
        self._pace(consumer, busy=bool(batches))
        if not batches:
            await self._restart_lost_partitions(consumer)
            await self._note_starts(consumer)
            return
        for tp, records in batches.items():
            # Every round commits all it was given, and a failed one rewinds to the
            # committed offsets: a batch starts at the committed offset.
            self._committed.setdefault(tp, records[0].offset)
        # Offsets are committed once every partition's handler is done, whatever the mode.
        if self.concurrency is Concurrency.TOGETHER:
            by_topic: dict[str, list[ConsumerRecord]] = {}
            for tp, records in batches.items():
                by_topic.setdefault(tp.topic, []).extend(records)
            for name, records in by_topic.items():
                await self._records(name, records)
        elif self.concurrency is Concurrency.AT_ONCE and len(batches) > 1:
            async with asyncio.TaskGroup() as handling:
                for tp, records in batches.items():
                    handling.create_task(self._records(tp.topic, records))
        else:
            for tp, records in batches.items():
                await self._records(tp.topic, records)
        committed = {tp: records[-1].offset + 1 for tp, records in batches.items()}
        reason = await commit_fenced(
            consumer,
            fetched,
            committed,
            assignment=assignment,
            assignments=lambda: self.assignments,
        )
        if reason is not None:
            # Not committed: their partitions start again from the group's offsets, here or
            # at another member, once the member has joined again (kafkafence.py: offsets
            # of a log a broker that restarted empty no longer has must not reach it).
            log.info("consumer_round_not_committed", group=self.group, reason=reason)
            return
        self._committed.update(committed)
        self.last_commit = time.monotonic()
        await self._note_starts(consumer)  # the partitions that had nothing this round

    async def _note_starts(self, consumer: AIOKafkaConsumer) -> None:
        """Where this member starts on each partition it holds and has not read from yet
        (its position: the group's committed offset, or the beginning): known without a
        request once a fetch answered for the partition (it has a high watermark). Called
        between rounds only, when every position is a committed offset."""
        for tp in consumer.assignment() - self._committed.keys():
            # Held still (an earlier position may have waited through a rebalance)?
            if tp not in consumer.assignment() or consumer.highwater(tp) is None:
                continue
            try:
                async with asyncio.timeout(LAG_REFRESH_SECONDS):
                    self._committed[tp] = int(await consumer.position(tp))
            except (IllegalStateError, TimeoutError):  # revoked, or reset, while we looked
                continue

    async def _restart_lost_partitions(self, consumer: AIOKafkaConsumer) -> None:
        """Partitions whose position is past their end: the broker lost their log (an
        in-memory broker restarted empty, an unclean leader election) yet fetches there
        answer "nothing yet" instead of OFFSET_OUT_OF_RANGE, as Tansu's do. Without this the
        member would wait there for ever while new records pile up below it. Kafka's answer
        to an out-of-range offset is done here: the partition starts again from its beginning
        (``auto_offset_reset="earliest"``) and that start is committed, so the group's offset
        is inside the log again. What comes again is handled again (handlers are idempotent).

        A healthy log never trips this: a position only moves through fetched records, all
        below the high watermark of the fetch that brought them. Called between rounds only."""
        lost: dict[TopicPartition, tuple[int, int]] = {}
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is None:
                continue
            try:
                async with asyncio.timeout(LAG_REFRESH_SECONDS):
                    position = int(await consumer.position(tp))
            except (IllegalStateError, TimeoutError):  # revoked, or reset, while we looked
                continue
            if position > end:
                lost[tp] = (position, end)
        if not lost:
            return
        for tp, (position, end) in lost.items():
            log.warning(
                "consumer_position_past_log_end",
                group=self.group,
                topic=self._by_name[tp.topic].value,
                partition=tp.partition,
                position=position,
                end=end,
                action="reading the partition again from its beginning",
            )
            await consumer.seek_to_beginning(tp)
        try:
            async with asyncio.timeout(LAG_REFRESH_SECONDS):
                starts = {tp: int(await consumer.position(tp)) for tp in lost}
        except (IllegalStateError, TimeoutError):
            return  # the fetcher resets them by itself; the next commit records where
        await consumer.commit(starts)
        self._committed.update(starts)
        self.last_commit = time.monotonic()

    async def _watch_lag(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            self._publish_lag(consumer)
            await asyncio.sleep(LAG_REFRESH_SECONDS)

    def _lag_watch_ended(self, watch: asyncio.Future[None]) -> None:
        # A bug here must not stop the consumer, nor go unseen: the lag series then stand still.
        if not watch.cancelled() and watch.exception() is not None:
            log.error("consumer_lag_watch_failed", group=self.group, error=repr(watch.exception()))

    def _publish_lag(self, consumer: AIOKafkaConsumer) -> None:
        """``tayori_consumer_lag_records`` of every partition this member holds: the high
        watermark of its last fetch minus the committed offset. A partition not fetched yet
        has no series yet; one that left this member loses its series (and what this
        member knew of its committed offset: another member may commit it meanwhile)."""
        held = consumer.assignment()
        for tp in self._committed.keys() - held:
            del self._committed[tp]
        seen: set[tuple[str, str, str]] = set()
        for tp in sorted(held):
            topic = self._by_name.get(tp.topic)
            end = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if topic is None or end is None or committed is None:
                continue
            series = (self.group, topic.value, str(tp.partition))
            CONSUMER_LAG.labels(*series).set(max(0, end - committed))
            seen.add(series)
        for gone in self._lag_series - seen:
            CONSUMER_LAG.remove(*gone)
        self._lag_series = seen

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        """Back to the committed offset of every partition this member holds (the start
        of the partition where nothing was committed), after a round that failed half-way:
        the consumer's position is past records that were fetched but not committed."""
        for tp in consumer.assignment():
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)

    def alive(self) -> None:
        """This member is making progress, or waiting on purpose (see :func:`still_working`):
        /healthz stays green."""
        self.last_progress = time.monotonic()

    def _pace(self, consumer: AIOKafkaConsumer, *, busy: bool) -> None:
        """The wait of the next fetches (:class:`Pacing`): the busy one while records come,
        the idle one after a poll found nothing. aiokafka has no public setter: it reads
        ``Fetcher._fetch_max_wait_ms`` for every fetch request it builds, which
        tests/unit/test_faults.py pins to the installed aiokafka version."""
        if self.pacing.idle is not None:
            wait = self.pacing.busy if busy else self.pacing.idle
            consumer._fetcher._fetch_max_wait_ms = wait

    async def _records(self, name: str, records: list[ConsumerRecord]) -> None:
        """One batch of one topic's records (a partition's, or a poll's: see run)."""
        started = time.perf_counter()
        topic = self._by_name[name]
        token = _HANDLING.set(self)
        try:
            await self._process(topic, records)
        finally:
            _HANDLING.reset(token)
        BATCH_SECONDS.labels(self.settings.service, topic.value).observe(
            time.perf_counter() - started
        )

    async def _process(self, topic: Topic, records: list[ConsumerRecord]) -> None:
        schemas = self.registry if topic.upstream else None
        if schemas is not None:  # Confluent-framed records: their schema ids, looked up once
            pairs = ((r.value, r.headers) for r in records)
            await schemas.prefetch(pairs, unframed=avro.unversioned, waiting=self.alive)
        messages: list[Message] = []
        # The records of a batch mostly share one trace (a campaign's): parse it once.
        seen: tuple[bytes | None, str | None] = (None, None)
        for record in records:
            try:
                value = avro.decode(topic, record.value, record.headers, schemas)
            except InvalidMessage as exc:
                await self._dead_letter(topic, record, "decode", exc.reason)
                continue
            except Exception as exc:  # decoding is pure: whatever fails, the bytes are at fault
                await self._dead_letter(topic, record, "decode", f"unreadable record: {exc!r}")
                continue
            key = record.key.decode(errors="replace") if record.key is not None else None
            raw = _trace_header(record.headers)
            if raw is not seen[0] and raw != seen[0]:
                seen = (raw, trace.parse(raw))
            messages.append(
                Message(
                    topic, key, value, record.partition, record.offset, record.timestamp, seen[1]
                )
            )
        by_position = {(r.partition, r.offset): r for r in records}
        await self._handle(topic, messages, by_position)

    async def _handle(
        self,
        topic: Topic,
        messages: list[Message],
        by_position: dict[tuple[int, int], ConsumerRecord],
    ) -> None:
        """Run the handler on ``messages``, retrying transient failures for as long as it
        takes. A message the handler rejects (:func:`reject`) is dead-lettered and the
        messages before and after it are handled on their own, in order. A failure on the
        data that names no message (PostgreSQL refusing a value: class 22, 54) splits the
        batch in halves until the record at fault is alone, and dead-letters it.

        The handler runs in the trace of the batch's first traced record: its log lines
        carry that ``trace_id`` and what it publishes carries that trace (a batch of one
        request's records, the common case, keeps its own). A debug line per batch names
        every trace of the batch."""
        if not messages:
            return
        first = next((m.trace for m in messages if m.trace is not None), None)
        with trace.bound(first):
            await self._handle_traced(topic, messages, by_position)

    async def _handle_traced(
        self,
        topic: Topic,
        messages: list[Message],
        by_position: dict[tuple[int, int], ConsumerRecord],
    ) -> None:
        if log.is_enabled_for(logging.DEBUG):
            log.debug(
                "records_handling",
                group=self.group,
                topic=topic.value,
                records=_positions(messages),
                trace_ids=sorted({trace.trace_id(m.trace) for m in messages if m.trace})[:50],
            )
        try:
            await retry(
                lambda: self.handler(messages),
                name=f"handle:{topic.value}",
                service=self.settings.service,
                strategy=FOREVER,
                waiting=self.alive,
            )
        except Exception as exc:
            fault = classify(exc)
            if fault is Fault.BUG:
                # The consumer stops here; where, for `tayori offsets skip` if the record
                # turns out to be the cause (the batch is uncommitted from its first offset).
                log.error(
                    "consumer_handler_failed",
                    group=self.group,
                    topic=topic.value,
                    records=_positions(messages),
                    error=repr(exc),
                )
            if fault is not Fault.DATA:
                raise
            bad = getattr(exc, "message", None)
            if isinstance(bad, Message) and bad in messages:
                at = messages.index(bad)
                before, after = messages[:at], messages[at + 1 :]
            elif len(messages) == 1:
                bad, before, after = messages[0], [], []
            else:
                half = len(messages) // 2
                await self._handle(topic, messages[:half], by_position)
                await self._handle(topic, messages[half:], by_position)
                return
            await self._handle(topic, before, by_position)
            record = by_position[bad.partition, bad.offset]
            field = exc.field if isinstance(exc, InvalidMessage) else None
            await self._dead_letter(topic, record, "process", _reason(exc), field)
            await self._handle(topic, after, by_position)
            return
        for _ in messages:
            self.dlq_limit.record(False)
        MESSAGES_CONSUMED.labels(self.settings.service, topic.value, "ok").inc(len(messages))

    async def _dead_letter(
        self,
        topic: Topic,
        record: ConsumerRecord,
        stage: str,
        reason: str,
        field: str | None = None,
    ) -> None:
        """Publish ``record`` to ``<topic>.dlq`` with why and where it came from. A value
        too large to publish whole (over DLQ_WHOLE_BYTES, or refused by the producer or the
        broker) goes as its first DLQ_EXCERPT_BYTES with its size and SHA-256."""
        headers = deadletters.dead_letter_headers(
            record.headers or (),
            stage=stage,
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            group=self.group,
            field=field,
        )
        key = record.key.decode(errors="replace") if record.key is not None else None
        value = record.value
        truncated = value is not None and len(value) > DLQ_WHOLE_BYTES
        try:
            if truncated:
                await self._publish_excerpt(topic, key, value or b"", headers)
            else:
                await (await self.publisher.send_raw(topic.dlq, key, value, headers))
        except Exception as exc:
            if truncated or classify(exc) is not Fault.DATA:
                raise
            truncated = True
            await self._publish_excerpt(topic, key, value or b"", headers)
        MESSAGES_DEAD_LETTERED.labels(self.settings.service, topic.value, stage).inc()
        MESSAGES_CONSUMED.labels(self.settings.service, topic.value, "dead_lettered").inc()
        traceparent = trace.of_headers(record.headers)
        log.warning(
            "message_dead_lettered",
            **{trace.LOG_FIELD: trace.trace_id(traceparent)} if traceparent else {},
            topic=topic.value,
            partition=record.partition,
            offset=record.offset,
            stage=stage,
            reason=reason[:500],
            truncated=truncated,
        )
        self.dlq_limit.record(True)

    async def _publish_excerpt(
        self, topic: Topic, key: str | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        # The original headers may be what is too large: keep only ours.
        ours = [(k, v) for k, v in headers if k.startswith(deadletters.HEADER_PREFIX)]
        ours += [
            (deadletters.TRUNCATED, b"1"),
            (deadletters.SIZE, str(len(value)).encode()),
            (deadletters.SHA256, hashlib.sha256(value).hexdigest().encode()),
        ]
        excerpt = value[:DLQ_EXCERPT_BYTES]
        await (await self.publisher.send_raw(topic.dlq, (key or "")[:256], excerpt, ours))


def _trace_header(headers: Sequence[tuple[str, bytes]] | None) -> bytes | None:
    for name, value in headers or ():
        if name == trace.HEADER:
            return value
    return None


def _positions(messages: Sequence[Message]) -> dict[int, str]:
    """partition → "first-last" offsets of ``messages``."""
    spans: dict[int, list[int]] = {}
    for message in messages:
        span = spans.setdefault(message.partition, [message.offset, message.offset])
        span[1] = message.offset
    return {p: f"{first}-{last}" for p, (first, last) in spans.items()}


def _reason(exc: BaseException) -> str:
    """What an operator reads in ``dlq-reason``: ours as written (its field goes in
    ``dlq-field``), anything else typed."""
    if isinstance(exc, InvalidMessage):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


def reject(message: Message, reason: str, field: str | None = None) -> InvalidMessage:
    """An InvalidMessage naming the one message of a batch that a handler refuses."""
    exc = InvalidMessage(reason, field=field)
    exc.message = message  # type: ignore[attr-defined]
    return exc


def checked(batch: Sequence[Message], check: Callable[[Any], T]) -> list[T]:
    """What ``check`` makes of each value of the batch; the first value it refuses with
    :class:`InvalidMessage` is dead-lettered (:func:`reject`) and the loop hands the
    handler the batch again without it."""
    values = []
    for message in batch:
        try:
            values.append(check(message.value))
        except InvalidMessage as exc:
            raise reject(message, exc.reason, exc.field) from None
    return values
