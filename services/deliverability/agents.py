"""Wiring only: decode → classify → sum per domain, and per campaign and domain → send on
(stage 1); add to the windows, and to the campaigns' figures (stage 2). The decisions
are :mod:`services.deliverability.processor`'s.

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
from services.deliverability.models import Counts, no_campaign

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


@dataclass(frozen=True)
class Classified:
    """One batch of input events: its counters per receiving domain, its ``delivered`` and
    ``complaints`` per campaign and domain (the complaint guard's), and the records that
    could not be read (left out of both; the caller dead-letters them)."""

    per_domain: dict[str, dict[str, int]]
    per_campaign: dict[str, dict[str, dict[str, int]]]
    unreadable: list[Unreadable]


def classify_events(
    events: Sequence[Any], topics: Mapping[str, Topic], contact_domains: Any
) -> Classified:
    """One batch of input events, summed per receiving domain and per campaign and domain.
    A delivery result or bounce teaches ``contact_domains`` (keyed by contact id, the
    inputs' key, so its changelog partition is the input's) the contact's domain; feedback
    is counted under it. A record naming its campaign counts for the campaign too (the
    per-campaign sums keep only delivered and complaints, :func:`processor.tally_campaigns
    <services.deliverability.processor.tally_campaigns>`)."""
    items: list[tuple[str | None, dict[str, int]]] = []
    campaign_items: list[tuple[str, str, dict[str, int]]] = []
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
        if contact is not None and domain and topic in processor.TEACHES_DOMAIN and known != domain:
            contact_domains[contact] = domain
        MESSAGES_CONSUMED.labels(SERVICE, topic.value, "counted" if domain else "skipped").inc()
        items.append((domain, counts))
        campaign = record.get("campaign_id")
        if campaign and domain and counts:
            campaign_items.append((campaign, domain, counts))
    return Classified(processor.tally(items), processor.tally_campaigns(campaign_items), unreadable)


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


def add_campaign_tally(tally: Mapping[str, Any], campaigns: Any, now: float) -> None:
    """Add one campaign's summed counters per domain to its ``campaign-domains`` entry
    (what its guard published is kept), touched at ``now``."""
    campaign = str(tally["campaign_id"])
    more = {
        str(domain): {str(k): int(v) for k, v in counts.items()}
        for domain, counts in tally["domains"].items()
    }
    known = campaigns.get(campaign) or no_campaign(now)
    campaigns[campaign] = known.derive(
        domains=processor.add_domains(known.domains, more),
        updated_at=max(known.updated_at, now),
    )
