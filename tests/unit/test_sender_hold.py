"""Held deliveries: the hold decision (projected wait) and the stored record's round trip."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest

from libs.common import avro
from libs.common.topics import Topic
from services.sender.domains import NORMAL, PAUSED, THROTTLED, Limits, Override, Policy
from services.sender.holding import decode_request, encode_request
from services.sender.ledger import HOLDING, Delivery
from services.sender.models import LedgerKey
from services.sender.pacing import DomainPacing, projected_wait, should_hold, slower
from services.sender.settings import SenderSettings
from tests.integration.test_sender import send_request


def test_a_rate_wait_counts_the_queue_ahead_at_the_domains_rate() -> None:
    # Its own 0.2 s, then 40 parked before it at 10 msgs/s.
    assert projected_wait(0.2, "rate", 40, 10.0) == pytest.approx(4.2)
    assert projected_wait(0.2, "rate", 0, 10.0) == pytest.approx(0.2)


def test_a_connections_wait_is_the_queue_ahead_only() -> None:
    assert projected_wait(-1.0, "connections", 30, 10.0) == pytest.approx(3.0)
    assert projected_wait(-1.0, "connections", 0, 10.0) == 0.0


def test_a_pause_or_cap_is_what_remains_of_it_whatever_the_queue() -> None:
    assert projected_wait(120.0, "paused", 5000, 10.0) == 120.0
    assert projected_wait(3600.0, "daily_cap", 0, 10.0) == 3600.0


def test_hold_only_beyond_the_threshold() -> None:
    assert not should_hold(2.0, 2.0)
    assert should_hold(2.01, 2.0)
    assert should_hold(0.5, 0.0)  # 0: anything that waits at all
    assert not should_hold(1e9, -1.0)  # negative: nothing held


def test_a_policy_is_slower_when_it_pauses_or_lowers_the_rate() -> None:
    normal = Policy(10.0, 0, NORMAL)
    assert slower(normal, Policy(5.0, 0, THROTTLED))
    assert slower(Policy(0.0, 0, NORMAL), Policy(5.0, 0, THROTTLED))  # from unlimited
    assert slower(normal, Policy(10.0, 0, PAUSED, until=100.0))
    assert slower(Policy(10.0, 0, PAUSED, until=100.0), Policy(10.0, 0, PAUSED, until=200.0))
    assert not slower(Policy(10.0, 0, PAUSED, until=200.0), Policy(10.0, 0, PAUSED, until=100.0))
    assert not slower(Policy(5.0, 0, THROTTLED), normal)  # recovering
    assert not slower(normal, Policy(0.0, 0, NORMAL))  # unlimited now
    assert not slower(normal, normal)


class Pool:
    def __init__(self) -> None:
        self.queued: list[Delivery] = []
        self.held: list[Delivery] = []

    def hold(self, d: Delivery) -> None:
        d.hold = HOLDING  # as holding.Holder.hold marks it
        self.held.append(d)

    def pacing(self, **values: Any) -> DomainPacing:
        fields = {"domain_max_wait_seconds": 900.0, "domain_hold_seconds": 2.0, **values}
        return DomainPacing(
            dataclasses.replace(SenderSettings(), **fields),
            requeue=self.queued.append,
            give_up=lambda d, why: None,
            hold=self.hold,
            defaults={"slow.example": Limits(10.0, 0)},
        )


def delivery(email: str, n: int, *, request: bool = True) -> Delivery:
    return Delivery(
        LedgerKey("c", "", n),
        "campaign",
        email,
        lambda: (b"", "", ""),
        request={"email": email} if request else None,
    )


async def test_a_domain_with_a_long_queue_holds_what_would_wait_past_the_threshold() -> None:
    pool = Pool()
    pacing = pool.pacing()
    parked = [delivery(f"r{i}@slow.example", i) for i in range(60)]
    admitted = [d for d in parked if pacing.admit(d)]
    assert admitted  # the bucket's first token
    # 10 msgs/s: the first ~20 parked wait at most 2 s and stay their batch's; the rest
    # are held.
    waiting = [d for d in parked if d not in admitted]
    held = {id(d) for d in pool.held}
    assert 15 <= waiting.index(pool.held[0]) <= 22
    assert all(id(d) in held for d in waiting[waiting.index(pool.held[0]) :])
    # Other domains are not concerned.
    assert all(pacing.admit(delivery(f"x{i}@fast.example", 100 + i)) for i in range(50))
    assert len(pool.held) == len(waiting) - waiting.index(pool.held[0])
    pacing.stop()


async def test_a_paused_domain_holds_at_once_but_not_mail_without_a_record() -> None:
    pool = Pool()
    pacing = pool.pacing()
    pacing.set_overrides({"slow.example": Override(state=PAUSED, reason="test")})
    campaign, system = delivery("a@slow.example", 1), delivery("b@slow.example", 2, request=False)
    assert not pacing.admit(campaign)
    assert not pacing.admit(system)
    assert pool.held == [campaign]  # mail.system (no record to store) stays its batch's
    pacing.stop()


async def test_what_a_delivery_waited_already_counts_towards_the_threshold() -> None:
    pool = Pool()
    pacing = pool.pacing()
    assert pacing.admit(delivery("first@slow.example", 1))  # the bucket's token
    fresh, again = delivery("a@slow.example", 2), delivery("b@slow.example", 3)
    # ``again`` waited 1.95 s already (a 421 sent it back, say): 0.2 s more passes 2 s.
    again.waiting_since = time.monotonic() - 1.95
    assert not pacing.admit(fresh)
    assert not pacing.admit(again)
    assert pool.held == [again]
    pacing.stop()


async def test_a_domain_that_slows_holds_what_was_parked_before_it_slowed() -> None:
    """Parked with short waits (not held), then the domain slows: a halved rate holds the
    deliveries whose queue ahead now passes the threshold, a pause holds all of them — left
    unheld, each kept its batch, and the batches after it, until the pause ended."""
    pool = Pool()
    pacing = pool.pacing(
        domain_pause_after=2,
        domain_pause_seconds=300.0,
        domain_aimd_decrease_interval_seconds=0.0,  # each 421 a signal
    )
    first = delivery("first@slow.example", 0)
    assert pacing.admit(first)
    parked = [delivery(f"r{i}@slow.example", 1 + i) for i in range(15)]
    system = delivery("sys@slow.example", 99, request=False)
    assert not any(pacing.admit(d) for d in [*parked, system])
    assert pool.held == []  # 10 msgs/s: the last waits 1.5 s
    pacing.deferred(first, 421, "4.7.0")  # 5 msgs/s: 10 or more ahead wait 2 s or more
    assert pacing.policy_of("slow.example").rate == 5.0
    assert 4 <= len(pool.held) <= 5
    assert pool.held == parked[-len(pool.held) :]
    pacing.deferred(first, 421, "4.7.0")  # the second, nothing accepted: paused for 300 s
    assert pacing.policy_of("slow.example").state == PAUSED
    assert sorted(d.key.contact_id for d in pool.held) == list(range(1, 16))
    assert system.hold == ""  # no record to store: its batch's
    pacing.release(first)
    pacing.stop()


async def test_nothing_is_held_with_a_negative_threshold() -> None:
    pool = Pool()
    pacing = pool.pacing(domain_hold_seconds=-1.0)
    pacing.set_overrides({"slow.example": Override(state=PAUSED, reason="test")})
    assert not pacing.admit(delivery("a@slow.example", 1))
    assert pool.held == []
    pacing.stop()


def test_the_stored_record_decodes_to_the_request() -> None:
    request = avro.decode(
        Topic.SEND_REQUESTS, *avro.encode(Topic.SEND_REQUESTS, send_request("c1", 7))
    )
    value, headers = encode_request(request)
    assert decode_request(value, json.loads(headers)) == request
