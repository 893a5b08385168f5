"""Wiring only: decode → classify → sum per domain → send on (stage 1); add to the
windows (stage 2). The decisions are :mod:`services.deliverability.processor`'s.

A record it cannot read goes to ``<topic>.dlq`` (group ``deliverability``) like any
consumer's, through the service's :class:`~libs.common.kafka.Publisher`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libs.common import avro, deadletters
from libs.common.errors import InvalidMessage
from libs.common.kafka import Publisher
from libs.common.logging import get_logger
from libs.common.metrics import DELIVERABILITY_TALLIES, MESSAGES_CONSUMED, MESSAGES_DEAD_LETTERED
from libs.common.topics import Topic
from services.deliverability import processor
from services.deliverability.models import Counts

log = get_logger(__name__)
SERVICE = "deliverability"
#: its consumer group (faust's app id, under KAFKA_TOPIC_PREFIX), named in dead letters.
GROUP = "deliverability"


@dataclass(frozen=True)
class Unreadable:
    """An input record that could not be decoded, and why."""

    topic: Topic
    message: Any
    reason: str


def classify_events(
    events: Sequence[Any], topics: Mapping[str, Topic], contact_domains: Any
) -> tuple[dict[str, dict[str, int]], list[Unreadable]]:
    """One batch of input events, summed per receiving domain, and the records that could
    not be read (left out of the sums; the caller dead-letters them). A delivery result or
    bounce teaches ``contact_domains`` (keyed by contact id, the inputs' key, so its
    changelog partition is the input's) the contact's domain; feedback is counted under
    it."""
    items: list[tuple[str | None, dict[str, int]]] = []
    unreadable: list[Unreadable] = []
    for event in events:
        message = event.message
        topic = topics[message.topic]
        try:
            record = avro.decode(topic, event.value, message.headers)
        except InvalidMessage as exc:
            unreadable.append(Unreadable(topic, message, str(exc)))
            continue
        contact = record.get("contact_id")
        known = contact_domains.get(contact) if contact is not None else None
        domain, counts = processor.classify(topic, record, known)
        if (
            contact is not None
            and domain
            and topic is not Topic.FEEDBACK_EVENTS
            and known != domain
        ):
            contact_domains[contact] = domain
        MESSAGES_CONSUMED.labels(SERVICE, topic.value, "counted" if domain else "skipped").inc()
        items.append((domain, counts))
    return processor.tally(items), unreadable


async def dead_letter(publisher: Publisher, record: Unreadable) -> None:
    """Publish an unreadable input record to ``<topic>.dlq`` as it was, with why and where
    it came from (the ``dlq-*`` headers), and wait for the broker's acknowledgement: the
    batch's offsets are committed after this returns."""
    message = record.message
    headers = deadletters.dead_letter_headers(
        [(k, bytes(v)) for k, v in (message.headers or ())],
        stage="decode",
        reason=record.reason,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        group=GROUP,
    )
    key = message.key.decode(errors="replace") if message.key is not None else None
    await (await publisher.send_raw(record.topic.dlq, key, message.value, headers))
    MESSAGES_DEAD_LETTERED.labels(SERVICE, record.topic.value, "decode").inc()
    MESSAGES_CONSUMED.labels(SERVICE, record.topic.value, "dead_lettered").inc()
    log.warning(
        "message_dead_lettered",
        topic=record.topic.value,
        partition=message.partition,
        offset=message.offset,
        stage="decode",
        reason=record.reason,
    )


def add_tally(tally: Mapping[str, Any], minute: Any, hour: Any) -> None:
    """Add one domain's summed counters to its minute and hour windows (every hopping
    window the record falls in)."""
    counts = Counts(n={str(k): int(v) for k, v in tally["counts"].items()})
    domain = str(tally["domain"])
    minute[domain] += counts
    hour[domain] += counts
    DELIVERABILITY_TALLIES.inc()
