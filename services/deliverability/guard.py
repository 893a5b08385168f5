"""The complaint guard, pure: whether a campaign's complaints over its delivered mail
passed the threshold, which receiving domains to hold, and whether a decision is worth
publishing on the compacted ``campaign.guard`` topic. No broker, no faust:
``tests/unit/test_deliverability_guard.py`` runs them.

The rule (:class:`GuardLimits`, README's settings table): the campaign's complaints /
delivered over all its domains above ``complaint_rate`` (default 0.3%, the large
providers' bulk-sender limit) once at least ``min_delivered`` were delivered trips the
guard. The campaign as a whole decides *whether*, so a few complaints at a small domain
do not hold anything on their own; each domain's own figures decide *where*: the domains
whose own rate is above the threshold (complaints at a domain with nothing delivered
count as above it). When the whole is above the rate, at least one domain is (a sum of
fractions lies between the smallest and the largest), so a tripped campaign always
names a domain.

What is held only grows: the scheduler holds the campaign's sends to the named domains
until an operator resumes them, and a domain whose rate falls back under the threshold as
more mail is delivered stays held (the record names the whole set so far). A decision is
published when it names a domain not published before; one that names no new domain is
not (the scheduler already holds those, and an operator may have resumed them since).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """When a campaign's guard trips (settings: ``DELIVERABILITY_CAMPAIGN_COMPLAINT_*``)."""

    complaint_rate: float = 0.003
    min_delivered: int = 1000


@dataclass(frozen=True, slots=True)
class GuardDecision:
    """A tripped guard: the domains past the rate (sorted), why, and the campaign's
    figures it was decided from."""

    domains: tuple[str, ...]
    reason: str
    delivered: int
    complaints: int


def totals(per_domain: Mapping[str, Mapping[str, int]]) -> tuple[int, int]:
    """(delivered, complaints) of a campaign over all its domains."""
    delivered = sum(int(c.get("delivered", 0)) for c in per_domain.values())
    complaints = sum(int(c.get("complaints", 0)) for c in per_domain.values())
    return delivered, complaints


def complaint_rate(complaints: int, delivered: int) -> float:
    """complaints / delivered (0 when nothing was delivered), as the routes show it."""
    return round(complaints / delivered, 6) if delivered else 0.0


def past_rate(complaints: int, delivered: int, rate: float) -> bool:
    """Whether ``complaints`` over ``delivered`` is above ``rate``; complaints about
    nothing delivered (counted before their deliveries, or the deliveries lost) are."""
    if delivered <= 0:
        return complaints > 0
    return complaints / delivered > rate


def decide(
    per_domain: Mapping[str, Mapping[str, int]], limits: GuardLimits
) -> GuardDecision | None:
    """The guard's decision for one campaign from its counters per receiving domain
    (``{"delivered": n, "complaints": m}``), or None while it holds nothing. The same
    figures give the same decision."""
    delivered, complaints = totals(per_domain)
    if delivered < limits.min_delivered or delivered <= 0:
        return None
    if not past_rate(complaints, delivered, limits.complaint_rate):
        return None
    domains = tuple(
        sorted(
            domain
            for domain, counts in per_domain.items()
            if past_rate(
                int(counts.get("complaints", 0)),
                int(counts.get("delivered", 0)),
                limits.complaint_rate,
            )
        )
    )
    if not domains:  # cannot happen (see the module's docstring); nothing to hold
        return None
    reason = (
        f"complaint_rate {complaints / delivered:.4f} > {limits.complaint_rate:.4f}"
        f" ({complaints}/{delivered} delivered)"
    )
    return GuardDecision(domains, reason, delivered, complaints)


def should_publish(decision: GuardDecision | None, last_published_domains: Collection[str]) -> bool:
    """Whether to publish ``decision`` after the domains last published for its campaign
    (empty: none): when it names a domain not held yet."""
    return decision is not None and not set(decision.domains) <= set(last_published_domains)


def held_domains(decision: GuardDecision, last_published_domains: Collection[str]) -> list[str]:
    """What a published record names: every domain held so far and the decision's, sorted."""
    return sorted(set(last_published_domains) | set(decision.domains))
