"""Per-domain pacing: the token bucket, AIMD, the policy in force, and admission."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.sender import domains
from services.sender.domains import (
    NORMAL,
    PAUSED,
    THROTTLED,
    Aimd,
    Learned,
    Limits,
    Override,
    Published,
    WarmUp,
    policy_in_force,
)
from services.sender.ledger import Delivery
from services.sender.models import LedgerKey
from services.sender.pacing import DomainPacing, TokenBucket
from services.sender.settings import SenderSettings

NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
AIMD = Aimd(decrease=0.5, increase=1.0, floor=0.5, pause_after=3, window=60, pause_seconds=300)


# Token bucket ---------------------------------------------------------------------------


def test_bucket_spaces_takes_at_its_rate() -> None:
    bucket = TokenBucket(2.0, now=100.0)
    assert bucket.take(100.0) == 0.0  # the first token is there
    assert bucket.take(100.0) == pytest.approx(0.5)  # the next is due in half a second
    assert bucket.take(100.25) == pytest.approx(0.25)
    assert bucket.take(100.5) == 0.0
    taken = sum(1 for i in range(1000) if bucket.take(100.5 + i * 0.01) == 0.0)
    assert taken == 19  # due at 101.0, 101.5, … 110.0


def test_unlimited_bucket_never_waits() -> None:
    bucket = TokenBucket(0.0, now=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(1000))


def test_bucket_keeps_at_most_a_tenth_of_a_second() -> None:
    bucket = TokenBucket(100.0, now=0.0)
    assert bucket.available(60.0) == 10  # idle a minute: no burst of 6,000
    bucket.set_rate(5.0)
    assert bucket.available(60.0) == 1


# AIMD -----------------------------------------------------------------------------------


def test_a_deferral_halves_the_rate_and_deliveries_add_back() -> None:
    learned = domains.deferred(None, rate_now=10.0, rate_limit=False, at=0.0, aimd=AIMD)
    assert (learned.rate, learned.recover_to) == (5.0, 10.0)
    learned = domains.deferred(learned, rate_now=5.0, rate_limit=False, at=1.0, aimd=AIMD)
    assert learned.rate == 2.5
    for _ in range(7):
        back = domains.delivered(learned, at=2.0, aimd=AIMD)
        assert back is not None
        learned = back
    assert learned.rate == 9.5
    assert domains.delivered(learned, at=2.0, aimd=AIMD) is None  # back at 10: learning over


def test_a_bursts_deferrals_decrease_the_rate_once_per_interval() -> None:
    """Ten messages in flight, ten 421s within a tenth of a second: one halving, not ten,
    and one signal towards a pause, not ten; the next decrease waits for the interval (1 s
    here)."""
    learned = None
    for i in range(10):
        learned = domains.deferred(learned, rate_now=50.0, rate_limit=True, at=i / 100, aimd=AIMD)
    assert learned is not None and learned.rate == 25.0
    assert learned.paused_until == 0.0 and learned.hits == (0.0,)
    later = domains.deferred(learned, rate_now=25.0, rate_limit=False, at=0.99, aimd=AIMD)
    assert later.rate == 25.0
    later = domains.deferred(later, rate_now=25.0, rate_limit=False, at=1.0, aimd=AIMD)
    assert later.rate == 12.5


def test_a_domain_refusing_everything_while_slowed_is_paused() -> None:
    """A rate-limit answer every interval and nothing accepted: the third pauses it."""
    learned = None
    for at in (0.0, 1.0, 2.0):
        learned = domains.deferred(learned, rate_now=50.0, rate_limit=True, at=at, aimd=AIMD)
    assert learned is not None and learned.paused_until == 2.0 + AIMD.pause_seconds


def test_a_domain_that_accepts_part_of_its_mail_is_slowed_not_paused() -> None:
    """Metering, not blocking: deliveries between the rate-limit answers. The rate comes
    down at each answer; the domain is never paused."""
    learned = None
    for second in range(10):
        learned = domains.deferred(
            learned, rate_now=50.0, rate_limit=True, at=float(second), aimd=AIMD
        )
        back = domains.delivered(learned, at=second + 0.5, aimd=AIMD)
        assert back is not None
        learned = back
    assert learned is not None and learned.paused_until == 0.0
    assert learned.rate is not None and learned.rate < 50.0 / 10  # slowed right down all the same


def test_the_rate_does_not_fall_below_the_floor() -> None:
    learned = None
    for i in range(20):
        learned = domains.deferred(learned, rate_now=10.0, rate_limit=False, at=i, aimd=AIMD)
    assert learned is not None and learned.rate == AIMD.floor


def test_repeated_rate_limit_answers_within_the_window_pause() -> None:
    learned = domains.deferred(None, rate_now=10.0, rate_limit=True, at=0.0, aimd=AIMD)
    learned = domains.deferred(learned, rate_now=10.0, rate_limit=True, at=30.0, aimd=AIMD)
    assert learned.paused_until == 0.0
    paused = domains.deferred(learned, rate_now=10.0, rate_limit=True, at=59.0, aimd=AIMD)
    assert paused.paused_until == 359.0
    # The same third answer after the window: the first has expired, no pause.
    late = domains.deferred(learned, rate_now=10.0, rate_limit=True, at=61.0, aimd=AIMD)
    assert late.paused_until == 0.0


def test_plain_4xx_never_pauses() -> None:
    learned = None
    for i in range(10):
        learned = domains.deferred(learned, rate_now=10.0, rate_limit=False, at=i, aimd=AIMD)
    assert learned is not None and learned.paused_until == 0.0


@pytest.mark.parametrize(
    ("code", "enhanced", "limit"),
    [(421, "4.7.0", True), (421, None, True), (451, "4.7.1", True), (450, "4.2.1", False)],
)
def test_rate_limit_answers(code: int, enhanced: str | None, limit: bool) -> None:
    assert domains.is_rate_limit(code, enhanced) is limit


# The policy in force --------------------------------------------------------------------


def policy(**inputs: Any) -> domains.Policy:
    default = inputs.pop("default", Limits(10.0, 4))
    return policy_in_force(default, now=NOW, mono=1000.0, **inputs)


def test_defaults_alone() -> None:
    assert policy() == domains.Policy(10.0, 4, NORMAL)
    assert domains.DEFAULTS["docomo.ne.jp"].rate > 0
    assert domains.domain_of("A@Docomo.NE.JP") == "docomo.ne.jp"


def test_a_published_record_only_lowers_the_ceiling() -> None:
    assert policy(published=Published(rate=5.0, connections=8)).rate == 5.0
    assert policy(published=Published(rate=50.0, connections=2)).connections == 2
    unlimited = policy(default=Limits(0.0, 0), published=Published(rate=7.0, connections=0))
    assert (unlimited.rate, unlimited.connections) == (7.0, 0)
    expired = Published(1.0, 1, PAUSED, until=NOW - timedelta(seconds=1))
    assert policy(published=expired) == domains.Policy(10.0, 4, NORMAL)


def test_a_published_pause_until_a_time() -> None:
    p = policy(published=Published(10.0, 4, PAUSED, until=NOW + timedelta(minutes=5)))
    assert (p.state, p.until, p.expires) == (PAUSED, 1300.0, 1300.0)


def test_an_override_replaces_the_ceiling_and_sets_the_state() -> None:
    raised = policy(override=Override(rate=200.0, connections=20))
    assert (raised.rate, raised.connections, raised.state) == (200.0, 20, NORMAL)
    held = policy(override=Override(state=PAUSED, reason="complaints"))
    assert (held.state, held.reason, held.until) == (PAUSED, "complaints", float("inf"))
    timed = policy(override=Override(state=THROTTLED, rate=1.0, until=NOW + timedelta(hours=1)))
    assert (timed.state, timed.rate, timed.expires) == (THROTTLED, 1.0, 4600.0)
    over = policy(override=Override(state=PAUSED, until=NOW - timedelta(seconds=1)))
    assert over.state == NORMAL


def test_an_override_normal_overrules_a_published_pause_not_a_learned_one() -> None:
    published = Published(10.0, 4, PAUSED, reason="complaints")
    assert policy(published=published, override=Override()).state == NORMAL
    learned = Learned(rate=2.0, recover_to=10.0, paused_until=1060.0)
    p = policy(learned=learned, override=Override(rate=100.0))
    assert (p.state, p.rate, p.until, p.expires) == (PAUSED, 2.0, 1060.0, 1060.0)


def test_a_learned_rate_throttles_below_the_ceiling_only() -> None:
    p = policy(learned=Learned(rate=2.5, recover_to=10.0))
    assert (p.state, p.rate) == (THROTTLED, 2.5)
    unlimited = policy(default=Limits(0.0, 0), learned=Learned(rate=3.0, recover_to=40.0))
    assert unlimited.rate == 3.0
    assert policy(learned=Learned(rate=20.0, recover_to=30.0)).rate == 10.0


def test_warm_up_caps_rise_day_by_day() -> None:
    warm = WarmUp(start=date(2026, 12, 4), daily_caps=(1000, 2000, 5000))
    assert warm.cap_on(date(2026, 12, 3)) is None
    assert warm.cap_on(date(2026, 12, 4)) == 1000
    assert warm.cap_on(date(2026, 12, 6)) == 5000
    assert warm.cap_on(date(2026, 12, 7)) is None
    p = policy(override=Override(warmup=warm))
    assert p.daily_cap == 2000
    assert p.expires == 1000.0 + 21 * 3600  # recomputed at the next UTC midnight


# Admission ------------------------------------------------------------------------------


def settings(**values: Any) -> SenderSettings:
    fields = {"domain_max_wait_seconds": 60.0, **values}
    return dataclasses.replace(SenderSettings(), **fields)


class Pool:
    """What the pacing calls back: the queue and the give-up."""

    def __init__(self) -> None:
        self.queued: list[Delivery] = []
        self.given_up: list[tuple[Delivery, str]] = []

    def pacing(self, **values: Any) -> DomainPacing:
        return DomainPacing(
            settings(**values),
            requeue=self.queued.append,
            give_up=lambda d, why: self.given_up.append((d, why)),
            defaults={"slow.example": Limits(2.0, 1)},
        )


def delivery(email: str, n: int = 1) -> Delivery:
    return Delivery(LedgerKey("c", "", n), "campaign", email, lambda: (b"", "", ""))


async def test_a_throttled_domain_waits_while_others_go() -> None:
    pool = Pool()
    pacing = pool.pacing()
    first, second = delivery("a@slow.example", 1), delivery("b@slow.example", 2)
    assert pacing.admit(first)
    assert not pacing.admit(second)  # one in flight at most: parked
    assert all(pacing.admit(delivery(f"x{i}@fast.example", i)) for i in range(100))
    pacing.release(first)  # its transaction ended: the parked one goes back to the queue
    assert pool.queued == [second]
    assert not pacing.admit(second)  # in flight is free, but the next token is 0.5 s away
    await asyncio.sleep(0.6)
    assert pool.queued == [second, second]
    assert pacing.admit(second)
    assert pool.given_up == []
    pacing.stop()


async def test_a_wait_past_the_bound_is_given_up() -> None:
    pool = Pool()
    pacing = pool.pacing()  # the bound: 60 s
    until = datetime.now(UTC) + timedelta(hours=2)
    pacing.set_overrides({"slow.example": Override(state=PAUSED, until=until)})
    d = delivery("a@slow.example")
    assert not pacing.admit(d)
    assert [(x, "paused" in why) for x, why in pool.given_up] == [(d, True)]
    pacing.stop()


async def test_an_open_ended_pause_holds_until_lifted() -> None:
    pool = Pool()
    pacing = pool.pacing()
    pacing.set_overrides({"slow.example": Override(state=PAUSED, reason="test")})
    d = delivery("a@slow.example")
    assert pacing.policy_of("slow.example").state == PAUSED
    assert not pacing.admit(d)
    assert pool.given_up == []  # held: the operator may lift the pause within the bound
    pacing.set_overrides({})
    await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert pool.queued == [d]  # lifted: tried again at once
    assert pacing.admit(d)
    pacing.stop()


async def test_an_open_ended_pause_gives_up_at_the_bound() -> None:
    pool = Pool()
    pacing = pool.pacing(domain_max_wait_seconds=0.1)
    pacing.set_overrides({"slow.example": Override(state=PAUSED)})
    d = delivery("a@slow.example")
    assert not pacing.admit(d)
    await asyncio.sleep(0.2)
    assert pool.queued == [d]
    assert not pacing.admit(d)
    assert [x for x, _ in pool.given_up] == [d]
    pacing.stop()


@pytest.mark.parametrize(
    ("code", "enhanced", "slows"),
    [
        (421, "4.7.0", True),
        (450, "4.7.1", True),
        (451, "4.4.5", True),
        (452, "4.3.1", True),
        (421, None, True),
        (451, "4.3.0", False),  # a greylisting mailbox, or the relay's "try again later"
        (452, "4.2.2", False),  # that mailbox is full
        (450, "4.2.1", False),  # that reader receives too fast (Gmail's per-user rate)
        (450, None, False),
    ],
)
async def test_only_answers_about_the_domain_slow_it(
    code: int, enhanced: str | None, slows: bool
) -> None:
    pool = Pool()
    pacing = pool.pacing()
    d = delivery("a@mixed.example")
    assert pacing.admit(d)
    before = pacing.policy_of("mixed.example")
    pacing.deferred(d, code, enhanced)
    after = pacing.policy_of("mixed.example")
    assert (after != before) is slows
    pacing.release(d)
    pacing.stop()


async def test_deferrals_then_a_pause_then_recovery() -> None:
    pool = Pool()
    pacing = pool.pacing(
        domain_pause_after=2, domain_pause_seconds=0.2, domain_aimd_decrease_interval_seconds=0
    )
    d = delivery("a@other.example")
    assert pacing.admit(d)
    pacing.deferred(d, 421, "4.7.0")
    state = pacing.states["other.example"]
    assert state.policy.state == THROTTLED
    pacing.deferred(d, 421, "4.7.0")  # refused again, nothing accepted between: a block
    assert state.policy.state == PAUSED
    pacing.release(d)
    assert not pacing.admit(d)  # paused: parked, woken when the pause ends
    await asyncio.sleep(0.3)
    assert pool.queued == [d]
    assert pacing.admit(d)
    for _ in range(100):
        pacing.delivered(d)
    assert state.learned is None and state.policy.state == NORMAL
    pacing.stop()


async def test_metric_labels_are_bounded() -> None:
    pacing = Pool().pacing(domain_metrics_top=3)
    labels = {pacing.label(f"d{i}.example") for i in range(50)}
    assert labels == {"d0.example", "d1.example", "d2.example", "other"}


async def test_pacing_off_admits_everything() -> None:
    pacing = Pool().pacing(domain_pacing=False)
    pacing.set_overrides({"slow.example": Override(state=PAUSED)})
    assert all(pacing.admit(delivery("a@slow.example", i)) for i in range(10))


async def test_idle_domains_are_forgotten_busy_ones_kept() -> None:
    pacing = Pool().pacing()
    busy, idle = delivery("a@busy.example"), delivery("b@idle.example", 2)
    assert pacing.admit(busy) and pacing.admit(idle)
    pacing.release(idle)
    pacing.states["idle.example"].last_used -= 3600
    pacing.states["busy.example"].last_used -= 3600  # idle long, but one in flight
    pacing._next_rank = 0.0
    assert pacing.admit(delivery("c@third.example", 3))
    assert set(pacing.states) == {"busy.example", "third.example"}
    pacing.release(busy)
    assert pacing.states["busy.example"].in_flight == 0
