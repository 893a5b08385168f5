"""Every Kafka topic Tayori uses, in one place (SPEC §7).

Tests and side-by-side deployments give each run its own topics with a prefix
(``KAFKA_TOPIC_PREFIX``); :func:`topic_name` applies it.
"""

from __future__ import annotations

from enum import StrEnum


class Topic(StrEnum):
    CONTACTS_EVENTS = "contacts.events"
    CONTACTS_CHANGELOG = "contacts.changelog"
    SUPPRESSION_COMMANDS = "suppression.commands"
    SUPPRESSION_CHANGES = "suppression.changes"
    SNAPSHOT_REQUESTS = "snapshot.requests"
    CAMPAIGN_RECIPIENTS = "campaign.recipients"
    SEND_REQUESTS = "send.requests"
    SEND_PROGRESS = "send.progress"
    CAMPAIGN_CONTROL = "campaign.control"
    CAMPAIGN_CONTENT = "campaign.content"
    DELIVERY_RESULTS = "delivery.results"
    FEEDBACK_EVENTS = "feedback.events"
    BOUNCE_EVENTS = "bounce.events"
    EXPORT_REQUESTS = "export.requests"
    EXPORT_COMPLETED = "export.completed"
    MAIL_SYSTEM = "mail.system"
    JOBS_EVENTS = "jobs.events"
    #: per receiving domain, the sending policy in force (deliverability; key: the domain).
    DOMAIN_POLICY = "domain.policy"

    @property
    def dlq(self) -> str:
        return f"{self.value}.dlq"

    @property
    def compacted(self) -> bool:
        return self in (Topic.CONTACTS_CHANGELOG, Topic.CAMPAIGN_CONTENT, Topic.DOMAIN_POLICY)


class StreamTopic(StrEnum):
    """The deliverability service's own faust topics: its per-domain tallies (the
    repartition by recipient domain) and its tables' changelogs. faust declares them itself
    with the source topics' partition count (changelogs compacted); no DLQ: only the
    service writes them, records it made."""

    TALLIES = "deliverability.tallies"
    # faust names a table's changelog "<app id>-<table>-changelog"; the app id is
    # "<prefix>deliverability", so these come out under the prefix like every other topic.
    CONTACT_DOMAINS = "deliverability-contact-domains-changelog"
    DOMAIN_MINUTE = "deliverability-domain-minute-changelog"
    DOMAIN_HOUR = "deliverability-domain-hour-changelog"


#: Partitions per topic when Tayori creates them (the embedded broker, tests).
DEFAULT_PARTITIONS = 4


def topic_name(topic: Topic | StreamTopic | str, prefix: str = "") -> str:
    """The broker-side name of ``topic`` (a Topic or a DLQ name) under ``prefix``."""
    name = topic.value if isinstance(topic, Topic | StreamTopic) else topic
    return f"{prefix}{name}"


def all_topic_names(prefix: str = "") -> list[str]:
    """Every topic and its DLQ, as created by ``tayori dev`` and the test fixtures."""
    names: list[str] = []
    for topic in Topic:
        names.append(topic_name(topic, prefix))
        names.append(topic_name(topic.dlq, prefix))
    return names
