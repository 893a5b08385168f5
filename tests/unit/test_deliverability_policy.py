"""The deliverability service's policy decisions (services/deliverability/policy.py), pure."""

from __future__ import annotations

from libs.common.topics import Topic
from services.deliverability import processor
from services.deliverability.policy import (
    NORMAL,
    PAUSED,
    THROTTLED,
    Decision,
    Thresholds,
    decide,
    recent_windows,
    should_publish,
)

LIMITS = Thresholds(
    deferral_ratio=0.3,
    deferral_min_attempts=50,
    rate_limit_deferrals=20,
    complaint_rate=0.003,
    complaint_min_delivered=1000,
    throttle_min_rate=1.0,
    throttle_seconds=300.0,
    pause_seconds=1800.0,
)
NOW = 1_800_000_000.0


def test_a_quiet_or_healthy_domain_is_normal() -> None:
    assert decide([], {}, now=NOW, limits=LIMITS) == Decision(NORMAL)
    healthy = {"attempts": 1000, "delivered": 990, "deferred": 10, "deferred:4.2.2": 10}
    assert decide([healthy], healthy, now=NOW, limits=LIMITS).state == NORMAL


def test_a_high_deferral_ratio_throttles_to_the_accepted_rate() -> None:
    recent = {"attempts": 100, "delivered": 60, "deferred": 40, "deferred:4.2.1": 40}
    decision = decide([recent], recent, now=NOW, limits=LIMITS)
    assert decision.state == THROTTLED
    assert decision.rate == 1.0  # 60 in its busiest minute
    assert decision.until == NOW + 300
    assert decision.reason == "deferral_ratio 0.40 >= 0.30 (40/100 in 1m)"
    # summed over the minutes; the rate is the busiest minute's deliveries per second
    busy = {"attempts": 3000, "delivered": 1800, "deferred": 1200}
    calm = {"attempts": 1000, "delivered": 600, "deferred": 400}
    decision = decide([calm, busy], {}, now=NOW, limits=LIMITS)
    assert decision.rate == 30.0
    assert decision.reason == "deferral_ratio 0.40 >= 0.30 (1600/4000 in 2m)"
    # the same figures later: the same decision (nothing drifts with the clock)
    later = decide([calm, busy], {}, now=NOW + 30, limits=LIMITS)
    assert (later.state, later.rate, later.reason) == (THROTTLED, 30.0, decision.reason)


def test_deferrals_below_the_minimum_volume_do_not_throttle() -> None:
    recent = {"attempts": 49, "deferred": 49, "deferred:4.2.1": 49}
    assert decide([recent], recent, now=NOW, limits=LIMITS).state == NORMAL


def test_rate_limit_deferrals_of_a_domain_taking_most_of_its_mail_do_not_pause_it() -> None:
    """Metering, not blocking: the sender's retried 421s while the domain takes the rest
    (the domains bench: 67 while 5,000 went) leave it to the sender's AIMD."""
    metered = {"attempts": 5067, "delivered": 5000, "deferred": 67, "deferred:4.7.0": 67}
    assert decide([metered], metered, now=NOW, limits=LIMITS).state == NORMAL
    refusing = {"attempts": 45, "delivered": 20, "deferred": 25, "deferred:421": 25}
    assert decide([refusing], refusing, now=NOW, limits=LIMITS).state == PAUSED


def test_the_throttle_rate_has_a_floor() -> None:
    recent = {"attempts": 100, "delivered": 0, "deferred": 100}
    assert decide([recent], recent, now=NOW, limits=LIMITS).rate == 1.0


def test_many_rate_limit_deferrals_pause_the_domain() -> None:
    first = {"attempts": 10, "deferred": 10, "deferred:4.7.0": 10}
    second = {"attempts": 10, "deferred": 10, "deferred:4.7.0": 2, "deferred:421": 8}
    decision = decide([first, second], {}, now=NOW, limits=LIMITS)
    assert decision.state == PAUSED
    assert decision.until == NOW + 1800
    assert decision.reason == "rate_limit_deferrals 20 >= 20 (421/4.7.x in 2m, 0 delivered)"
    fewer = {"attempts": 19, "deferred": 19, "deferred:4.7.0": 19}
    assert decide([fewer], fewer, now=NOW, limits=LIMITS).state == NORMAL
    # other 4xx codes (a mailbox's) are not rate limits
    mailbox = {"attempts": 30, "deferred": 30, "deferred:4.2.2": 30, "deferred:451": 9}
    assert decide([mailbox], mailbox, now=NOW, limits=LIMITS).state == NORMAL


def test_a_complaint_rate_over_the_threshold_pauses_after_the_minimum_volume() -> None:
    hour = {"attempts": 1000, "delivered": 1000, "complaints": 4}
    decision = decide([], hour, now=NOW, limits=LIMITS)
    assert decision.state == PAUSED
    assert decision.reason == "complaint_rate 0.0040 > 0.0030 (4/1000 delivered in 1h)"
    at_threshold = {"delivered": 1000, "complaints": 3}
    assert decide([], at_threshold, now=NOW, limits=LIMITS).state == NORMAL
    too_few = {"delivered": 999, "complaints": 999}
    assert decide([], too_few, now=NOW, limits=LIMITS).state == NORMAL


def test_complaints_win_over_deferrals() -> None:
    recent = {"attempts": 100, "delivered": 60, "deferred": 40}
    hour = {"delivered": 2000, "complaints": 100}
    assert decide([recent], hour, now=NOW, limits=LIMITS).state == PAUSED


def test_publishing_on_change_and_renewal_only() -> None:
    normal = Decision(NORMAL)
    throttled = Decision(THROTTLED, 10.0, "deferral_ratio 0.40", NOW + 300)
    kw = {"now": NOW, "republish_seconds": 120.0}
    # never restricted: nothing to say
    assert not should_publish(normal, None, None, **kw)
    assert should_publish(throttled, None, None, **kw)
    # the same throttle (figures moved a little) soon after: nothing; later: renewed
    again = Decision(THROTTLED, 11.0, "deferral_ratio 0.41", NOW + 310)
    assert not should_publish(again, throttled, NOW - 10, **kw)
    assert should_publish(again, throttled, NOW - 120, **kw)
    # the rate moved a lot, or the state changed: at once
    assert should_publish(Decision(THROTTLED, 5.0), throttled, NOW - 1, **kw)
    assert should_publish(Decision(PAUSED, None, "x", NOW), throttled, NOW - 1, **kw)
    # back to normal: once (the tombstone)
    assert should_publish(normal, throttled, NOW - 1, **kw)


def test_recent_windows_are_the_last_minutes_oldest_first() -> None:
    windows = [
        (NOW - 60, NOW - 0.1, {"attempts": 2}),
        (NOW - 600, NOW - 540.1, {"attempts": 100}),  # too old
        (NOW - 120, NOW - 60.1, {"attempts": 3}),
        (NOW + 60, NOW + 119.9, {"attempts": 7}),  # not begun
    ]
    assert recent_windows(windows, NOW, 5) == [{"attempts": 3}, {"attempts": 2}]
    assert recent_windows([], NOW, 5) == []


def test_the_senders_retried_deferrals_throttle_or_pause_before_any_result() -> None:
    """The sender's deferrals alone (its mail still waiting, no result yet) move the
    rules: attempts and deferred both count them, so the ratio is theirs."""
    retried = {"domain": "docomo.ne.jp", "smtp_code": 421, "enhanced_code": "4.7.0"}
    minute = processor.tally([processor.classify(Topic.DELIVERY_DEFERRALS, retried)] * 25)[
        "docomo.ne.jp"
    ]
    paused = decide([minute], minute, now=NOW, limits=LIMITS)
    assert paused.state == PAUSED
    assert paused.reason == "rate_limit_deferrals 25 >= 20 (421/4.7.x in 1m, 0 delivered)"
    low = Thresholds(deferral_min_attempts=10, rate_limit_deferrals=0)
    throttled = decide([minute], minute, now=NOW, limits=low)
    assert throttled.state == THROTTLED
    assert throttled.reason == "deferral_ratio 1.00 >= 0.30 (25/25 in 1m)"
