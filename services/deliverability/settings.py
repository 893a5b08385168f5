"""Settings of the deliverability service (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env
from libs.common.topics import DEFAULT_PARTITIONS
from services.deliverability.guard import GuardLimits
from services.deliverability.policy import Thresholds


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
    #: per-domain metrics name this many domains (by attempts in the last hour); the rest
    #: are summed as "other" (gauges.py).
    metrics_top: int = env("DELIVERABILITY_METRICS_TOP", 20)
    #: how often each domain's policy is decided from its windows (domain.policy).
    policy_interval_seconds: float = env("DELIVERABILITY_POLICY_INTERVAL_SECONDS", 5.0)
    #: an unchanged throttle or pause is published again this often (its end moves on).
    policy_republish_seconds: float = env("DELIVERABILITY_POLICY_REPUBLISH_SECONDS", 120.0)
    #: the deferral and rate-limit rules look at this many recent minute windows.
    policy_recent_minutes: int = env("DELIVERABILITY_POLICY_RECENT_MINUTES", 5)
    #: deferred / attempts at or above this throttles the domain ...
    deferral_ratio: float = env("DELIVERABILITY_DEFERRAL_RATIO", 0.3)
    #: ... once this many sends were attempted in the recent minutes.
    deferral_min_attempts: int = env("DELIVERABILITY_DEFERRAL_MIN_ATTEMPTS", 50)
    #: this many 421 / 4.7.x deferrals in the recent minutes pause the domain (0: never).
    rate_limit_deferrals: int = env("DELIVERABILITY_RATE_LIMIT_DEFERRALS", 20)
    #: complaints / delivered over the last hour above this pauses the domain ...
    complaint_rate: float = env("DELIVERABILITY_COMPLAINT_RATE", 0.003)
    #: ... once this many were delivered in the hour.
    complaint_min_delivered: int = env("DELIVERABILITY_COMPLAINT_MIN_DELIVERED", 1000)
    #: a throttled domain is never set below this rate (msgs/s).
    throttle_min_rate: float = env("DELIVERABILITY_THROTTLE_MIN_RATE", 1.0)
    #: a throttle not renewed ends after this long.
    throttle_seconds: float = env("DELIVERABILITY_THROTTLE_SECONDS", 300.0)
    #: a pause not renewed ends after this long.
    pause_seconds: float = env("DELIVERABILITY_PAUSE_SECONDS", 1800.0)
    #: a campaign's complaints / delivered (all domains) above this trips its complaint
    #: guard: its sends to the domains past the rate are held (campaign.guard) ...
    campaign_complaint_rate: float = env("DELIVERABILITY_CAMPAIGN_COMPLAINT_RATE", 0.003)
    #: ... once this many of its mails were delivered.
    campaign_complaint_min_delivered: int = env(
        "DELIVERABILITY_CAMPAIGN_COMPLAINT_MIN_DELIVERED", 1000
    )
    #: a campaign with no delivery or complaint counted for this long leaves the
    #: campaign-domains table (and its changelog).
    campaign_keep_hours: float = env("DELIVERABILITY_CAMPAIGN_KEEP_HOURS", 168.0)

    def thresholds(self) -> Thresholds:
        return Thresholds(
            deferral_ratio=self.deferral_ratio,
            deferral_min_attempts=self.deferral_min_attempts,
            rate_limit_deferrals=self.rate_limit_deferrals,
            complaint_rate=self.complaint_rate,
            complaint_min_delivered=self.complaint_min_delivered,
            throttle_min_rate=self.throttle_min_rate,
            throttle_seconds=self.throttle_seconds,
            pause_seconds=self.pause_seconds,
        )

    def guard_limits(self) -> GuardLimits:
        return GuardLimits(
            complaint_rate=self.campaign_complaint_rate,
            min_delivered=self.campaign_complaint_min_delivered,
        )
