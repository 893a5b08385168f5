"""Publishing each domain's policy on ``domain.policy`` (compacted, keyed by domain): every
``DELIVERABILITY_POLICY_INTERVAL_SECONDS`` the windows of every domain are decided
(:func:`policy.decide <services.deliverability.policy.decide>`) and a decision is
published when :func:`policy.should_publish` says so — on a change, a throttle or pause
renewed now and then, a return to normal as a tombstone (the sender then applies its own
defaults). Through the service's :class:`~libs.common.kafka.Publisher`.

What was published lives in this process only: after a restart a throttle or pause still
in force is published again at the first round, and one that ended while the service was
down ends at the sender by its ``until``.

In the same round each campaign's complaint guard is decided from the ``campaign-domains``
table (:func:`guard.decide <services.deliverability.guard.decide>`) and published on the
compacted ``campaign.guard`` topic (keyed by campaign) when the domains it holds grow
(:func:`guard.should_publish`), naming every domain held so far. Unlike a domain's policy
a hold has no end (an operator resumes it at the scheduler), so what was published is
kept in the table — recovered with it — and a restart does not publish it again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from libs.common import metrics
from libs.common.kafka import Publisher
from libs.common.logging import get_logger
from libs.common.topics import Topic
from services.deliverability import gauges, guard, policy
from services.deliverability.api import Tables
from services.deliverability.guard import GuardDecision, GuardLimits
from services.deliverability.policy import NORMAL, Decision, Thresholds
from services.deliverability.settings import DeliverabilitySettings

log = get_logger(__name__)


def record(domain: str, decision: Decision, now: float) -> dict[str, Any]:
    """The ``domain.policy`` value of a decision (times in epoch milliseconds)."""
    return {
        "domain": domain,
        "state": decision.state,
        "messages_per_second": decision.rate,
        "connections": None,
        "reason": decision.reason or "",
        "until": None if decision.until is None else int(decision.until * 1000),
        "decided_at": int(now * 1000),
    }


def _hour_now(windows: list[tuple[float, float, dict[str, int]]], now: float) -> dict[str, int]:
    """The hopping hour window covering most of the last hour (the earliest-starting one
    holding ``now``), as ``GET /v1/domains`` shows it."""
    holding = [w for w in windows if w[0] <= now <= w[1]]
    return min(holding, key=lambda w: w[0])[2] if holding else {}


@dataclass
class Announcer:
    """Decides and publishes the policies of the domains in this process's tables."""

    settings: DeliverabilitySettings
    publisher: Publisher
    tables: Tables
    limits: Thresholds = field(init=False)
    #: when a campaign's complaint guard trips (guard.py).
    guard_limits: GuardLimits = field(init=False)
    #: domain → (last decision published, when): what the topic says now, as far as we know.
    published: dict[str, tuple[Decision, float]] = field(default_factory=dict, init=False)
    #: one round at a time (a round called while the loop's runs would publish twice).
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    def __post_init__(self) -> None:
        self.limits = self.settings.thresholds()
        self.guard_limits = self.settings.guard_limits()
        for kind in ("tripped", "grown"):  # alerts find the series at zero
            metrics.DELIVERABILITY_CAMPAIGN_GUARDS.labels(kind)

    async def round(self, now: float | None = None) -> int:
        """Decide every domain seen in the last hour (and every one last published as
        restricted) and publish what changed, then every campaign's complaint guard
        (:meth:`_guard_round`); the number of records published."""
        async with self._lock:
            at = time.time() if now is None else now
            return await self._round(at) + await self._guard_round(at)

    async def _round(self, now: float) -> int:
        minutes = self.tables.windows(self.tables.minute)
        hours = self.tables.windows(self.tables.hour)
        sent = 0
        for domain in sorted(set(minutes) | set(hours) | set(self.published)):
            recent = policy.recent_windows(
                minutes.get(domain, []), now, self.settings.policy_recent_minutes
            )
            hour = _hour_now(hours.get(domain, []), now)
            decision = policy.decide(recent, hour, now=now, limits=self.limits)
            last = self.published.get(domain)
            if not policy.should_publish(
                decision,
                last[0] if last else None,
                last[1] if last else None,
                now=now,
                republish_seconds=self.settings.policy_republish_seconds,
            ):
                continue
            await self._publish(domain, decision, now)
            sent += 1
        gauges.show(
            {d: _hour_now(w, now) for d, w in hours.items()},
            self.published,
            self.settings.metrics_top,
        )
        return sent

    async def _publish(self, domain: str, decision: Decision, now: float) -> None:
        if decision.state == NORMAL:
            await (await self.publisher.send_raw(Topic.DOMAIN_POLICY, domain, None))
            self.published.pop(domain, None)
        else:
            await (
                await self.publisher.send(
                    Topic.DOMAIN_POLICY, domain, record(domain, decision, now)
                )
            )
            self.published[domain] = (decision, now)
        log.info(
            "domain_policy_published",
            domain=domain,
            state=decision.state,
            rate=decision.rate,
            reason=decision.reason,
        )

    async def _guard_round(self, now: float) -> int:
        """Decide the complaint guard of every campaign in the ``campaign-domains`` table
        and publish those whose held domains grow; drop the campaigns untouched for
        DELIVERABILITY_CAMPAIGN_KEEP_HOURS (a tombstone in the table's changelog)."""
        table = self.tables.campaigns
        keep = self.settings.campaign_keep_hours * 3600
        sent = 0
        for campaign, figures in sorted(table.data.items(), key=lambda item: item[0]):
            if now - figures.updated_at > keep:
                del table[campaign]
                log.info("campaign_figures_dropped", campaign_id=campaign)
                continue
            decision = guard.decide(figures.domains, self.guard_limits)
            if decision is None or not guard.should_publish(decision, figures.held):
                continue
            await self._publish_guard(campaign, decision, figures.held, now)
            sent += 1
        return sent

    async def _publish_guard(
        self, campaign: str, decision: GuardDecision, held: list[str], now: float
    ) -> None:
        """Publish the campaign's guard naming every domain held so far, then keep what was
        published in its table entry (:class:`CampaignDomains
        <services.deliverability.models.CampaignDomains>`)."""
        domains = guard.held_domains(decision, held)
        value = {
            "guard_id": str(uuid.uuid4()),
            "campaign_id": campaign,
            "domains": domains,
            "reason": decision.reason,
            "delivered": decision.delivered,
            "complaints": decision.complaints,
            "decided_at": int(now * 1000),
        }
        await (await self.publisher.send(Topic.CAMPAIGN_GUARD, campaign, value))
        table = self.tables.campaigns
        current = table.get(campaign)  # a tally may have landed while it was sent
        if current is not None:
            table[campaign] = current.derive(held=domains, reason=decision.reason)
        kind = "grown" if held else "tripped"
        metrics.DELIVERABILITY_CAMPAIGN_GUARDS.labels(kind).inc()
        log.warning(
            "campaign_guard_tripped",
            campaign_id=campaign,
            kind=kind,
            domains=len(domains),
            reason=decision.reason,
            guard_id=value["guard_id"],
        )

    async def run_forever(self) -> None:
        """A round every interval, once the tables are recovered (before, the figures
        would be short). A round the broker
        refuses is logged and tried again at the next one (the decisions are kept as they
        were, so nothing is skipped)."""
        while True:
            try:
                if self.tables.recovered():
                    await self.round()
            except Exception as exc:  # boundary: a broker hiccup must not end the loop
                log.error("domain_policy_round_failed", error=repr(exc), exc_info=exc)
            await asyncio.sleep(self.settings.policy_interval_seconds)
