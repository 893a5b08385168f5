"""The deliverability service's per-domain gauges (services/deliverability/gauges.py): which
domains are named and what ``other`` sums, pure; and that the families follow the top,
a domain that leaves it losing its series."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from libs.common import metrics
from services.deliverability import gauges
from services.deliverability.gauges import OTHER, Series, named, series, show
from services.deliverability.policy import NORMAL, PAUSED, THROTTLED, Decision
from services.deliverability.processor import COUNTERS

HOURS = {
    "gmail.com": {"attempts": 500, "delivered": 490, "deferred": 10, "complaints": 2},
    "docomo.ne.jp": {"attempts": 300, "delivered": 200, "deferred": 100, "deferred:4.7.0": 100},
    "au.com": {"attempts": 100, "delivered": 100, "opens": 7},
    "small.example": {"attempts": 3, "delivered": 2, "rejected": 1, "clicks": 1},
    "tiny.example": {"attempts": 1, "delivered": 1, "complaints": 1},
}


def _zeros(**counts: int) -> dict[str, int]:
    return {counter: counts.get(counter, 0) for counter in COUNTERS}


def test_the_top_domains_by_attempts_are_named_and_the_rest_summed_as_other() -> None:
    shown = series(HOURS, {}, top=2)
    assert set(shown) == {"gmail.com", "docomo.ne.jp", OTHER}
    assert shown["gmail.com"].hour == _zeros(attempts=500, delivered=490, deferred=10, complaints=2)
    # the deferral codes are GET /v1/domains' detail, not series
    assert shown["docomo.ne.jp"].hour == _zeros(attempts=300, delivered=200, deferred=100)
    assert shown[OTHER].hour == _zeros(
        attempts=104, delivered=103, rejected=1, complaints=1, opens=7, clicks=1
    )
    assert shown[OTHER].states == {NORMAL: 3, THROTTLED: 0, PAUSED: 0}
    # nothing lost or counted twice
    for counter in COUNTERS:
        total = sum(s.hour[counter] for s in shown.values())
        assert total == sum(h.get(counter, 0) for h in HOURS.values()), counter


def test_rates_are_of_the_summed_counters() -> None:
    shown = series(HOURS, {}, top=2)
    assert shown["gmail.com"].rates() == (round(2 / 490, 6), round(10 / 500, 6))
    assert shown[OTHER].rates() == (round(1 / 103, 6), 0.0)
    assert Series(_zeros(), {}).rates() == (0.0, 0.0)  # nothing delivered: 0, not an error


def test_no_other_when_every_domain_fits_and_none_named_with_top_zero() -> None:
    assert OTHER not in series(HOURS, {}, top=5)
    assert set(series(HOURS, {}, top=50)) == set(HOURS)
    assert set(series(HOURS, {}, top=0)) == {OTHER}
    assert set(series(HOURS, {}, top=-1)) == {OTHER}
    assert series({}, {}, top=20) == {}


def test_held_domains_are_named_first_with_their_state() -> None:
    states = {"tiny.example": PAUSED, "small.example": THROTTLED}
    shown = series(HOURS, states, top=3)
    assert set(shown) == {"tiny.example", "small.example", "gmail.com", OTHER}
    assert shown["tiny.example"].states == {NORMAL: 0, THROTTLED: 0, PAUSED: 1}
    assert shown["small.example"].states == {NORMAL: 0, THROTTLED: 1, PAUSED: 0}
    assert shown["gmail.com"].states == {NORMAL: 1, THROTTLED: 0, PAUSED: 0}
    assert shown[OTHER].states == {NORMAL: 2, THROTTLED: 0, PAUSED: 0}
    # more held domains than names: the busiest held ones, the rest counted in other
    shown = series(HOURS, {"tiny.example": PAUSED, "au.com": PAUSED}, top=1)
    assert set(shown) == {"au.com", OTHER}
    assert shown[OTHER].states == {NORMAL: 3, THROTTLED: 0, PAUSED: 1}


def test_a_held_domain_without_mail_in_the_hour_still_shows_its_state() -> None:
    shown = series(
        {"gmail.com": HOURS["gmail.com"], "quiet.example": {}}, {"held.example": PAUSED}, 5
    )
    assert set(shown) == {"gmail.com", "held.example"}  # a domain with no figures: none
    assert shown["held.example"].hour == _zeros()
    assert shown["held.example"].states[PAUSED] == 1


def test_the_same_figures_name_the_same_domains() -> None:
    ties = {f"d{i}.example": {"attempts": 10} for i in range(5)}
    assert named(ties, (), 3) == ["d0.example", "d1.example", "d2.example"]
    assert named(dict(reversed(ties.items())), (), 3) == ["d0.example", "d1.example", "d2.example"]


# show(): the families ---------------------------------------------------------------------


@pytest.fixture
def cleared() -> Iterator[None]:
    show({}, {}, 0)
    yield
    show({}, {}, 0)


def _labels(family: object) -> set[tuple[str, ...]]:
    return {
        tuple(sample.labels.values())
        for metric in family.collect()  # type: ignore[attr-defined]
        for sample in metric.samples
    }


def _value(name: str, **labels: str) -> float | None:
    return metrics.sample_value(name, labels)


def _paused(until: float = 2e9) -> tuple[Decision, float]:
    return Decision(PAUSED, None, "complaint_rate 0.0100 > 0.0030", until), 0.0


@pytest.mark.usefixtures("cleared")
def test_show_sets_every_family_and_drops_domains_that_leave_the_top() -> None:
    show(HOURS, {"au.com": _paused()}, 2)
    hour = "tayori_deliverability_domain_hour"
    assert _value(hour, domain="gmail.com", counter="delivered") == 490
    assert _value(hour, domain="au.com", counter="opens") == 7
    assert _value(hour, domain=OTHER, counter="attempts") == 304
    assert _value(hour, domain=OTHER, counter="clicks") == 1
    assert _value("tayori_deliverability_domain_complaint_rate", domain="gmail.com") == round(
        2 / 490, 6
    )
    assert _value("tayori_deliverability_domain_deferral_rate", domain=OTHER) == round(100 / 304, 6)
    policy = "tayori_deliverability_domain_policy"
    assert _value(policy, domain="au.com", state=PAUSED) == 1
    assert _value(policy, domain="au.com", state=NORMAL) == 0
    assert _value(policy, domain="gmail.com", state=NORMAL) == 1
    assert _value(policy, domain=OTHER, state=NORMAL) == 3
    assert {labels[0] for labels in _labels(metrics.DELIVERABILITY_DOMAIN_HOUR)} == {
        "au.com",
        "gmail.com",
        OTHER,
    }

    # au.com is normal again and docomo.ne.jp busier than it: au.com leaves the top and
    # every one of its series goes; the label sets stay at N + 1 domains.
    show(HOURS, {}, 2)
    for family in (
        metrics.DELIVERABILITY_DOMAIN_HOUR,
        metrics.DELIVERABILITY_DOMAIN_COMPLAINT_RATE,
        metrics.DELIVERABILITY_DOMAIN_DEFERRAL_RATE,
        metrics.DELIVERABILITY_DOMAIN_POLICY,
    ):
        domains = {labels[0] for labels in _labels(family)}
        assert domains == {"gmail.com", "docomo.ne.jp", OTHER}, family
    assert len(_labels(metrics.DELIVERABILITY_DOMAIN_HOUR)) == 3 * len(COUNTERS)
    assert len(_labels(metrics.DELIVERABILITY_DOMAIN_POLICY)) == 3 * 3
    assert _value(hour, domain="au.com", counter="attempts") is None
    assert _value(hour, domain=OTHER, counter="attempts") == 104

    # every domain fits: other goes too; nothing at all: no series
    show(HOURS, {}, 20)
    assert {labels[0] for labels in _labels(metrics.DELIVERABILITY_DOMAIN_HOUR)} == set(HOURS)
    show({}, {}, 20)
    assert _labels(metrics.DELIVERABILITY_DOMAIN_HOUR) == set()
    assert _labels(metrics.DELIVERABILITY_DOMAIN_POLICY) == set()
    assert gauges._shown == set()
