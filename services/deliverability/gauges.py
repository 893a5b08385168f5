"""Per-domain Prometheus gauges of the deliverability service, with bounded cardinality.

Every policy round (:mod:`services.deliverability.announce`) hands over what it has just
read and decided: each domain's last hour and the policies in force as it published them.
The gauges (``tayori_deliverability_domain_*``, :mod:`libs.common.metrics`) then name the
``DELIVERABILITY_METRICS_TOP`` domains with the most attempts in the hour and sum all the
others under ``domain="other"``: a label per receiving domain would grow with the lists
mailed (thousands of small domains), each series costing Prometheus memory for as long as
it is retained, while the few domains that carry the mail are the ones people watch.

Domains under a published throttle or pause are named first, whatever their volume: the
``TayoriDomainPaused`` alert and the dashboard must say *which* domain is held, and a held
domain's volume falls (the sender stops sending to it). There are few of them; more than
the top N would still fit in N names and ``other``.

:func:`series` is the selection, pure (``tests/unit/test_deliverability_gauges.py``);
:func:`show` sets the families and removes the series of names that left the top, so the
label sets never grow past N + 1 domains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from libs.common import metrics
from services.deliverability import processor
from services.deliverability.policy import NORMAL, PAUSED, THROTTLED, Decision

OTHER = "other"
STATES = (NORMAL, THROTTLED, PAUSED)

#: the ``domain`` labels the families show now. The families are the process's, so is this:
#: a runtime started again in the same process (the tests) replaces the last one's names.
_shown: set[str] = set()


@dataclass(frozen=True, slots=True)
class Series:
    """What one ``domain`` label shows: the last hour's counters (every one of
    :data:`processor.COUNTERS`, summed over its domains for ``other``) and how many of its
    domains are in each policy state."""

    hour: dict[str, int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)

    def rates(self) -> tuple[float, float]:
        """(complaints / delivered, deferred / attempts), 0 without a denominator, as
        ``GET /v1/domains`` computes them."""
        figures = processor.figures(self.hour)
        return figures["complaint_rate"], figures["deferral_rate"]


def named(
    hours: Mapping[str, Mapping[str, int]], restricted: Collection[str], top: int
) -> list[str]:
    """The domains that get their own label: those in ``restricted`` first, then by
    attempts in the hour, most first, at most ``top`` (ties by name, so the same figures
    always name the same domains)."""
    candidates = set(hours) | set(restricted)
    ranked = sorted(
        candidates,
        key=lambda d: (d not in restricted, -hours.get(d, {}).get("attempts", 0), d),
    )
    return ranked[: max(0, top)]


def series(
    hours: Mapping[str, Mapping[str, int]], states: Mapping[str, str], top: int
) -> dict[str, Series]:
    """``domain`` label → what it shows, from each domain's last-hour counters
    (``hours``; a domain with none is left out unless it has a policy) and the state of
    each domain's policy in force (``states``; absent: normal). At most ``top`` domains
    are named; ``other`` sums the rest and is absent when there is no rest."""
    restricted = {d for d, state in states.items() if state != NORMAL}
    domains = {d for d, counts in hours.items() if counts} | restricted
    names = set(named({d: hours.get(d, {}) for d in domains}, restricted, top))
    out: dict[str, Series] = {}
    for domain in sorted(domains):
        label = domain if domain in names else OTHER
        shown = out.setdefault(
            label,
            Series({c: 0 for c in processor.COUNTERS}, {s: 0 for s in STATES}),
        )
        counts = hours.get(domain, {})
        for counter in processor.COUNTERS:
            shown.hour[counter] += int(counts.get(counter, 0))
        shown.states[states.get(domain, NORMAL)] += 1
    return out


def show(
    hours: Mapping[str, Mapping[str, int]],
    published: Mapping[str, tuple[Decision, float]],
    top: int,
) -> None:
    """Set the per-domain families from a policy round: ``hours`` (each domain's last-hour
    counters), ``published`` (:attr:`Announcer.published
    <services.deliverability.announce.Announcer.published>`: the throttles and pauses in
    force; a domain not in it is normal). Names that left the top lose their series. No
    await in here: a scrape sees one round's figures, never half of two."""
    shown = series(hours, {d: decision.state for d, (decision, _) in published.items()}, top)
    for label, figures in shown.items():
        for counter, value in figures.hour.items():
            metrics.DELIVERABILITY_DOMAIN_HOUR.labels(label, counter).set(value)
        complaint_rate, deferral_rate = figures.rates()
        metrics.DELIVERABILITY_DOMAIN_COMPLAINT_RATE.labels(label).set(complaint_rate)
        metrics.DELIVERABILITY_DOMAIN_DEFERRAL_RATE.labels(label).set(deferral_rate)
        for state, count in figures.states.items():
            metrics.DELIVERABILITY_DOMAIN_POLICY.labels(label, state).set(count)
    for gone in _shown - shown.keys():
        _remove(gone)
    _shown.clear()
    _shown.update(shown)


def _remove(label: str) -> None:
    """Every series of one ``domain`` label (one already gone is left so)."""
    gone = [
        *((metrics.DELIVERABILITY_DOMAIN_HOUR, (label, c)) for c in processor.COUNTERS),
        (metrics.DELIVERABILITY_DOMAIN_COMPLAINT_RATE, (label,)),
        (metrics.DELIVERABILITY_DOMAIN_DEFERRAL_RATE, (label,)),
        *((metrics.DELIVERABILITY_DOMAIN_POLICY, (label, s)) for s in STATES),
    ]
    for family, labels in gone:
        with contextlib.suppress(KeyError):
            family.remove(*labels)
