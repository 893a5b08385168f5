"""Following ``domain.policy`` (the deliverability service's per-domain policies, compacted,
keyed by domain) into the relay pool's pacing (:meth:`DomainPacing.set_published
<services.sender.pacing.DomainPacing.set_published>`).

Every sender replica paces every domain, so each one reads EVERY partition of the topic:
a consumer of its own that joins no group (no shared consumer group, which would give
each replica a share of the domains), assigned the topic's partitions and read from the
beginning — compaction keeps the last record per domain — then on as records arrive. A
tombstone (no value) clears the domain's published policy. Nothing is committed: after
a restart the topic is read again from the beginning.

A record it cannot read (not Avro of the schema, no key) is logged and skipped, not
dead-lettered: there is no group to name in a dead letter, and the deliverability service
decides again and publishes anew. Partitions added to the topic while it runs are read
after the next restart.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.kafka import Latency, Pacing, Publisher
from libs.common.kafkasecurity import connection_options
from libs.common.logging import get_logger
from libs.common.topics import Topic
from services.sender.domains import STATES, Published
from services.sender.pacing import DomainPacing
from services.sender.settings import SenderSettings

log = get_logger(__name__)

TOPIC = Topic.DOMAIN_POLICY
#: after the broker failed the reader, it starts again this much later.
RETRY_SECONDS = 2.0


def published(value: dict[str, Any], now: datetime) -> Published:
    """A decoded ``domain.policy`` record as the pacing takes it: no rate or connections
    limit is 0 (unlimited); an unknown state is ``normal`` (the schema's default)."""
    until = value.get("until")
    if isinstance(until, int):  # epoch milliseconds, should a reader give them raw
        until = datetime.fromtimestamp(until / 1000, UTC)
    state = value.get("state")
    return Published(
        rate=float(value.get("messages_per_second") or 0.0),
        connections=int(value.get("connections") or 0),
        state=state if state in STATES else "normal",
        until=until,
        reason=value.get("reason") or None,
    )


def apply(pacing: DomainPacing, record: ConsumerRecord[Any, Any]) -> str | None:
    """One record of the topic into ``pacing``: the domain it set or cleared, or None for
    a record it could not read (logged, skipped)."""
    where = {"partition": record.partition, "offset": record.offset}
    if record.key is None:
        log.warning("domain_policy_skipped", reason="no key", **where)
        return None
    domain = bytes(record.key).decode(errors="replace").strip().lower()
    if record.value is None:
        pacing.set_published(domain, None)
        log.info("domain_policy_cleared", domain=domain)
        return domain
    try:
        value = avro.decode(TOPIC, record.value, record.headers)
    except InvalidMessage as exc:
        log.warning("domain_policy_skipped", domain=domain, reason=str(exc), **where)
        return None
    policy = published(value, datetime.now(UTC))
    pacing.set_published(domain, policy)
    log.info(
        "domain_policy_followed",
        domain=domain,
        state=policy.state,
        rate=policy.rate,
        until=policy.until.isoformat() if policy.until else None,
        reason=policy.reason,
    )
    return domain


class PolicyFeed:
    """The reader of ``domain.policy`` for one sender process."""

    def __init__(
        self, settings: SenderSettings, publisher: Publisher, pacing: DomainPacing
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.pacing = pacing

    async def run_forever(self) -> None:
        """Read the topic for ever; a broker failure restarts the reader (from the
        beginning) after :data:`RETRY_SECONDS`."""
        while True:
            try:
                await self._follow()
            except (KafkaError, OSError) as exc:
                log.warning("domain_policy_reader_failed", error=repr(exc))
            await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self) -> None:
        s = self.settings
        name = self.publisher.name(TOPIC)
        # a quiet topic: a policy changes every few seconds at the most
        fetch_ms = Pacing.of(Latency.QUIET, s).busy
        consumer = AIOKafkaConsumer(
            **connection_options(s),
            client_id=f"tayori-{s.service}-domain-policy",
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=fetch_ms,
        )
        try:
            starting = asyncio.ensure_future(consumer.start())
            try:
                await asyncio.shield(starting)
            except asyncio.CancelledError:
                # A start cut off half-way (the sender stopping as it starts) leaves aiokafka's
                # bootstrap connection reading for ever: let the start end, then stop below.
                await asyncio.gather(starting, return_exceptions=True)
                raise
            parts = [
                TopicPartition(name, p)
                for p in sorted(await self.publisher.producer.partitions_for(name))
            ]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            log.info("domain_policy_reader_started", topic=name, partitions=len(parts))
            while True:
                batches = await consumer.getmany(*parts, timeout_ms=fetch_ms)
                for records in batches.values():
                    for record in records:
                        apply(self.pacing, record)
        finally:
            await consumer.stop()
