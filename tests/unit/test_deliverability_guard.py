"""The complaint guard's decisions (services/deliverability/guard.py), pure."""

from __future__ import annotations

from services.deliverability.guard import (
    GuardDecision,
    GuardLimits,
    complaint_rate,
    decide,
    held_domains,
    should_publish,
)

LIMITS = GuardLimits(complaint_rate=0.003, min_delivered=1000)


def test_a_campaign_under_the_rate_or_the_volume_holds_nothing() -> None:
    assert decide({}, LIMITS) is None
    # 0.28%: under the rate
    assert decide({"gmail.com": {"delivered": 2500, "complaints": 7}}, LIMITS) is None
    # exactly the rate is not above it
    assert decide({"gmail.com": {"delivered": 1000, "complaints": 3}}, LIMITS) is None
    # 5% but 999 delivered: not enough volume to judge
    assert decide({"gmail.com": {"delivered": 999, "complaints": 50}}, LIMITS) is None
    # complaints with nothing delivered anywhere: no campaign rate
    assert decide({"gmail.com": {"complaints": 5}}, LIMITS) is None


def test_a_campaign_past_the_rate_holds_only_the_domains_past_it() -> None:
    figures = {
        "docomo.ne.jp": {"delivered": 1000, "complaints": 12},  # 1.2%
        "gmail.com": {"delivered": 1500, "complaints": 1},  # 0.07%
    }
    decision = decide(figures, LIMITS)
    assert decision == GuardDecision(
        domains=("docomo.ne.jp",),
        reason="complaint_rate 0.0052 > 0.0030 (13/2500 delivered)",
        delivered=2500,
        complaints=13,
    )


def test_complaints_at_a_domain_with_nothing_delivered_count_as_past_the_rate() -> None:
    figures = {
        "docomo.ne.jp": {"delivered": 2000, "complaints": 9},
        "ezweb.ne.jp": {"complaints": 1},  # its deliveries not counted (yet)
        "gmail.com": {"delivered": 1000},
    }
    decision = decide(figures, LIMITS)
    assert decision is not None
    assert decision.domains == ("docomo.ne.jp", "ezweb.ne.jp")
    assert (decision.delivered, decision.complaints) == (3000, 10)


def test_the_limits_come_from_the_settings() -> None:
    figures = {"gmail.com": {"delivered": 100, "complaints": 1}}
    assert decide(figures, LIMITS) is None
    loose = GuardLimits(complaint_rate=0.005, min_delivered=10)
    decision = decide(figures, loose)
    assert decision is not None
    assert decision.reason == "complaint_rate 0.0100 > 0.0050 (1/100 delivered)"
    assert decide(figures, GuardLimits(complaint_rate=0.01, min_delivered=10)) is None


def test_a_decision_is_published_when_the_held_set_grows() -> None:
    one = GuardDecision(("docomo.ne.jp",), "r", 2500, 13)
    both = GuardDecision(("docomo.ne.jp", "gmail.com"), "r", 4000, 30)
    assert not should_publish(None, [])
    assert not should_publish(None, ["docomo.ne.jp"])
    assert should_publish(one, [])  # tripped
    assert not should_publish(one, ["docomo.ne.jp"])  # the same set: not again
    assert should_publish(both, ["docomo.ne.jp"])  # grown
    # a domain that fell back under the rate stays held: a decision naming fewer
    # domains than published is not news
    assert not should_publish(one, ["docomo.ne.jp", "gmail.com"])
    gmail_only = GuardDecision(("gmail.com",), "r", 5000, 40)
    assert should_publish(gmail_only, ["docomo.ne.jp"])
    assert held_domains(gmail_only, ["docomo.ne.jp"]) == ["docomo.ne.jp", "gmail.com"]
    assert held_domains(one, []) == ["docomo.ne.jp"]


def test_the_rate_shown_is_complaints_over_delivered() -> None:
    assert complaint_rate(13, 2500) == 0.0052
    assert complaint_rate(1, 0) == 0.0
