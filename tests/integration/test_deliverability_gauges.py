"""The deliverability service's per-domain metrics against the embedded broker: delivery
results and a complaint over more receiving domains than ``DELIVERABILITY_METRICS_TOP``,
published to the real topics, come out on its ``/metrics`` as series of the top domains
(a paused one first, whatever its volume) and one ``other`` summing the rest; the totals
are what was published; a domain pushed out of the top loses its series."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.common.topics import Topic
from services.deliverability.processor import COUNTERS
from tests.conftest import Api, Kafka, Stack, eventually
from tests.integration.test_deliverability import _bounce, _result, deliverability

pytestmark = pytest.mark.integration

#: (domain, sent, deferred (4.2.2: a mailbox's own, no throttle), rejected)
MAIL = [
    ("a.example", 8, 2, 0),
    ("b.example", 7, 0, 1),
    ("c.example", 6, 0, 0),
    ("d.example", 4, 0, 0),
    ("e.example", 2, 1, 0),
    ("held.example", 2, 0, 0),  # and a complaint: paused
]


def _published() -> dict[str, dict[str, int]]:
    """Each domain's last-hour counters as the results below make them."""
    out = {}
    for domain, sent, deferred, rejected in MAIL:
        out[domain] = {
            "attempts": sent + deferred + rejected,
            "delivered": sent,
            "deferred": deferred,
            "rejected": rejected,
            "complaints": 1 if domain == "held.example" else 0,
        }
    return out


async def _send_mail(kafka: Kafka) -> None:
    contact = 1000
    for domain, sent, deferred, rejected in MAIL:
        outcomes: list[tuple[str, dict[str, Any]]] = [("sent", {})] * sent
        outcomes += [("temporary_error", {"smtp_code": 452, "enhanced_code": "4.2.2"})] * deferred
        outcomes += [("permanent_error", {"smtp_code": 550})] * rejected
        for outcome, codes in outcomes:
            contact += 1
            email = f"u{contact}@{domain}"
            await kafka.send(
                Topic.DELIVERY_RESULTS, contact, _result(contact, email, outcome, **codes)
            )
    # the last contact is held.example's: its complaint
    await kafka.send(Topic.BOUNCE_EVENTS, contact, _bounce(contact, email, "spam", False))


async def _scrape(api: Api) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``tayori_deliverability_domain_*`` family → {sorted labels: value} from /metrics."""
    text = await api.ok("GET", "/metrics", token=None)
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
        if family.name.startswith("tayori_deliverability_domain_")
    }


def _hour(scraped: dict[str, Any]) -> dict[str, dict[str, int]]:
    """domain label → counter → value, from the scraped hour family."""
    out: dict[str, dict[str, int]] = {}
    for labels, value in scraped.get("tayori_deliverability_domain_hour", {}).items():
        named = dict(labels)
        out.setdefault(named["domain"], {})[named["counter"]] = int(value)
    return out


def _policy(scraped: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for labels, value in scraped.get("tayori_deliverability_domain_policy", {}).items():
        named = dict(labels)
        out.setdefault(named["domain"], {})[named["state"]] = int(value)
    return out


def _summed(published: dict[str, dict[str, int]], domains: list[str]) -> dict[str, int]:
    return {c: sum(published[d].get(c, 0) for d in domains) for c in COUNTERS}


async def test_domain_series_name_the_top_domains_and_sum_the_rest(
    stack: Stack, kafka: Kafka
) -> None:
    published = _published()
    await _send_mail(kafka)
    settings = {
        "metrics_top": 3,
        "policy_interval_seconds": 0.2,
        "complaint_min_delivered": 2,  # held.example: 1 complaint in 2 delivered → paused
    }
    async with deliverability(stack, kafka.prefix, **settings) as (_, api):
        # held.example has the least mail but is paused: named first; then the two busiest.
        expected = {
            "held.example": _summed(published, ["held.example"]),
            "a.example": _summed(published, ["a.example"]),
            "b.example": _summed(published, ["b.example"]),
            "other": _summed(published, ["c.example", "d.example", "e.example"]),
        }

        async def counted(expected: dict[str, dict[str, int]] = expected) -> dict[str, Any]:
            scraped = await _scrape(api)
            assert _hour(scraped) == expected, _hour(scraped)
            return scraped

        scraped = await eventually(counted, timeout=90)
        hour = _hour(scraped)
        for counter in COUNTERS:  # nothing lost, nothing counted twice
            total = sum(counts[counter] for counts in hour.values())
            assert total == sum(p.get(counter, 0) for p in published.values()), counter
        # held.example is named because its pause is published (by volume it is last)
        policy = _policy(scraped)
        assert policy["held.example"] == {"normal": 0, "throttled": 0, "paused": 1}
        assert policy["a.example"] == {"normal": 1, "throttled": 0, "paused": 0}
        assert policy["other"] == {"normal": 3, "throttled": 0, "paused": 0}
        rates = scraped["tayori_deliverability_domain_complaint_rate"]
        assert rates[(("domain", "held.example"),)] == 0.5
        assert rates[(("domain", "a.example"),)] == 0.0
        deferrals = scraped["tayori_deliverability_domain_deferral_rate"]
        assert deferrals[(("domain", "a.example"),)] == 0.2
        assert deferrals[(("domain", "other"),)] == round(1 / 13, 6)

        # d.example gets 10 more deliveries: 14 attempts, the busiest. b.example (8) leaves
        # the top: its series go and its mail counts in other.
        for contact in range(2000, 2010):
            email = f"u{contact}@d.example"
            await kafka.send(Topic.DELIVERY_RESULTS, contact, _result(contact, email, "sent"))
        published["d.example"]["attempts"] += 10
        published["d.example"]["delivered"] += 10
        moved = {
            "held.example": expected["held.example"],
            "d.example": _summed(published, ["d.example"]),
            "a.example": expected["a.example"],
            "other": _summed(published, ["b.example", "c.example", "e.example"]),
        }
        scraped = await eventually(lambda: counted(moved), timeout=90)
        for family, series in scraped.items():
            domains = {dict(labels)["domain"] for labels in series}
            assert domains == set(moved), (family, domains)
