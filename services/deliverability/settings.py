"""Settings of the deliverability service (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env
from libs.common.topics import DEFAULT_PARTITIONS


@dataclass(frozen=True, repr=False)
class DeliverabilitySettings(CommonSettings):
    service: str = "deliverability"
    http_port: int = env("HTTP_PORT", 8087)
    #: partitions of the topics faust declares (tallies, changelogs): the same as the
    #: input topics', whose records are keyed by contact_id and joined with the
    #: contact-domains table partition by partition.
    partitions: int = env("DELIVERABILITY_PARTITIONS", DEFAULT_PARTITIONS)
    #: replication of the topics faust declares (3 on a production cluster).
    replication: int = env("DELIVERABILITY_REPLICATION", 1)
    #: the hourly figures hop by this many seconds: every count is written to
    #: 3600 / step windows, so a smaller step costs changelog writes.
    hour_step_seconds: int = env("DELIVERABILITY_HOUR_STEP_SECONDS", 300)
    #: most records one classifying round takes (they are summed per domain before they
    #: are sent on, so the tables see one record per domain and round).
    batch_records: int = env("DELIVERABILITY_BATCH_RECORDS", 2000)
    #: how long a round waits for its batch to fill.
    batch_seconds: float = env("DELIVERABILITY_BATCH_SECONDS", 0.2)
