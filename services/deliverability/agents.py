"""Wiring only: decode → classify → sum per domain → send on (stage 1); add to the
windows (stage 2). The decisions are :mod:`services.deliverability.processor`'s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.logging import get_logger
from libs.common.metrics import MESSAGES_CONSUMED
from libs.common.topics import Topic
from services.deliverability import processor

log = get_logger(__name__)
SERVICE = "deliverability"


def classify_events(
    events: Sequence[Any], topics: Mapping[str, Topic], contact_domains: Any
) -> dict[str, dict[str, int]]:
    """One batch of input events, summed per receiving domain. A delivery result or bounce
    teaches ``contact_domains`` (keyed by contact id, the inputs' key, so its changelog
    partition is the input's) the contact's domain; feedback is counted under it.
    An unreadable record is counted and left out: the services that own these topics
    dead-letter it already."""
    items: list[tuple[str | None, dict[str, int]]] = []
    for event in events:
        message = event.message
        topic = topics[message.topic]
        try:
            record = avro.decode(topic, event.value, message.headers)
        except InvalidMessage as exc:
            MESSAGES_CONSUMED.labels(SERVICE, topic.value, "invalid").inc()
            log.warning(
                "record_unreadable",
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                reason=str(exc),
            )
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
    return processor.tally(items)


def add_tally(tally: Mapping[str, Any], minute: Any, hour: Any) -> None:
    """Add one domain's summed counters to its minute and hour windows (every hopping
    window the record falls in)."""
    from services.deliverability.models import Counts

    counts = Counts(n={str(k): int(v) for k, v in tally["counts"].items()})
    domain = str(tally["domain"])
    minute[domain] += counts
    hour[domain] += counts
