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
    #: each 4xx the sender retries inside itself, when it happens (sender → deliverability;
    #: key: the contact). Not an outcome: never on delivery.results.
    DELIVERY_DEFERRALS = "delivery.deferrals"
    FEEDBACK_EVENTS = "feedback.events"
    BOUNCE_EVENTS = "bounce.events"
    EXPORT_REQUESTS = "export.requests"
    EXPORT_COMPLETED = "export.completed"
    MAIL_SYSTEM = "mail.system"
    JOBS_EVENTS = "jobs.events"
    #: per receiving domain, the sending policy in force (deliverability; key: the domain).
    DOMAIN_POLICY = "domain.policy"
    #: per campaign, the complaint guard's held receiving domains (deliverability →
    #: scheduler; key: the campaign).
    CAMPAIGN_GUARD = "campaign.guard"

    @property
    def dlq(self) -> str:
        return f"{self.value}.dlq"

    @property
    def compacted(self) -> bool:
        return self in (
            Topic.CONTACTS_CHANGELOG,
            Topic.CAMPAIGN_CONTENT,
            Topic.DOMAIN_POLICY,
            Topic.CAMPAIGN_GUARD,
        )

    @property
    def upstream(self) -> bool:
        """Written by systems outside Tayori too: its consumer reads Tayori's framing and
        the Confluent wire format (README, "Producing to Tayori's upstream topics")."""
        return self in UPSTREAM

    @property
    def key(self) -> str:
        """What its records are keyed by (the key is that value as UTF-8 text)."""
        return KEYS[self]

    @property
    def compatibility(self) -> str:
        """The Schema Registry compatibility rule of its value subject: a compacted topic
        keeps a key's last record for ever, so a new schema must read every older one."""
        return "BACKWARD_TRANSITIVE" if self.compacted else "BACKWARD"


#: topics other systems produce to (Tayori consumes them) ...
UPSTREAM = (Topic.CONTACTS_EVENTS, Topic.SUPPRESSION_COMMANDS)
#: ... and topics Tayori produces for other systems (besides its own consumers).
DOWNSTREAM = (Topic.CONTACTS_CHANGELOG,)

#: each topic's record key: integer ids in decimal, UUIDs and names as they are.
KEYS = {
    Topic.CONTACTS_EVENTS: "external_id, else email (the same key for every event of one contact)",
    Topic.CONTACTS_CHANGELOG: "contact_id",
    Topic.SUPPRESSION_COMMANDS: "contact_id (upstream: email when it knows no contact_id)",
    Topic.SUPPRESSION_CHANGES: "contact_id",
    Topic.SNAPSHOT_REQUESTS: "campaign_id",
    Topic.CAMPAIGN_RECIPIENTS: "campaign_id",
    Topic.SEND_REQUESTS: "contact_id (a release checkpoint: campaign_id)",
    Topic.SEND_PROGRESS: "campaign_id",
    Topic.CAMPAIGN_CONTROL: "campaign_id",
    Topic.CAMPAIGN_CONTENT: "content_id",
    Topic.DELIVERY_RESULTS: "contact_id",
    Topic.DELIVERY_DEFERRALS: "contact_id",
    Topic.FEEDBACK_EVENTS: "contact_id",
    Topic.BOUNCE_EVENTS: "contact_id",
    Topic.EXPORT_REQUESTS: "job_id",
    Topic.EXPORT_COMPLETED: "job_id",
    Topic.MAIL_SYSTEM: "job_id",
    Topic.JOBS_EVENTS: "job_id",
    Topic.DOMAIN_POLICY: "domain (lower case, IDNs as A-labels)",
    Topic.CAMPAIGN_GUARD: "campaign_id",
}


class StreamTopic(StrEnum):
    """The deliverability service's own faust topics: its per-domain tallies (the
    repartition by recipient domain), its per-campaign tallies (the repartition by
    campaign) and its tables' changelogs. faust declares them itself with the source
    topics' partition count (changelogs compacted); no DLQ: only the service writes them,
    records it made."""

    TALLIES = "deliverability.tallies"
    CAMPAIGN_TALLIES = "deliverability.campaign-tallies"
    # faust names a table's changelog "<app id>-<table>-changelog"; the app id is
    # "<prefix>deliverability", so these come out under the prefix like every other topic.
    CONTACT_DOMAINS = "deliverability-contact-domains-changelog"
    DOMAIN_MINUTE = "deliverability-domain-minute-changelog"
    DOMAIN_HOUR = "deliverability-domain-hour-changelog"
    CAMPAIGN_DOMAINS = "deliverability-campaign-domains-changelog"


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
