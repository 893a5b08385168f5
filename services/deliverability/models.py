"""The records the deliverability tables hold."""

from __future__ import annotations

from typing import Any

import faust

from services.deliverability import processor


class Counts(faust.Record, serializer="json", namespace="tayori.deliverability.Counts"):
    """One domain's counters in one window (names: :data:`processor.COUNTERS`, plus
    ``deferred:<code>``). ``+`` adds counter by counter, which is what a windowed table's
    ``table[domain] += counts`` applies to every window the record falls in."""

    n: dict[str, int]

    def __add__(self, other: Any) -> Counts:
        return Counts(n=processor.add(self.n, other.n))


def no_counts() -> Counts:
    return Counts(n={})


class CampaignDomains(
    faust.Record, serializer="json", namespace="tayori.deliverability.CampaignDomains"
):
    """One campaign's value in the ``campaign-domains`` table: its ``delivered`` and
    ``complaints`` per receiving domain since it was first counted, when a tally last
    added to them (epoch seconds: the table drops a campaign untouched for
    DELIVERABILITY_CAMPAIGN_KEEP_HOURS), and what its complaint guard last published on
    ``campaign.guard`` (the domains held, sorted, and why; none yet: empty). Keeping what
    was published in the table, not in memory, is what keeps a restart from publishing a
    campaign's guard again — the scheduler would hold domains an operator has resumed."""

    domains: dict[str, dict[str, int]]
    updated_at: float
    held: list[str]
    reason: str | None = None


def no_campaign(now: float) -> CampaignDomains:
    return CampaignDomains(domains={}, updated_at=now, held=[])
