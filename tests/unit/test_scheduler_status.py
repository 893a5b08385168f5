"""The campaign status machine (F-25): every allowed edge, and the refusals that matter."""

from __future__ import annotations

import itertools

import pytest

from libs.common.errors import Conflict
from services.scheduler import status
from services.scheduler.processor import Counters, halt_reason, should_halt


def test_the_happy_path_is_a_chain() -> None:
    path = ["draft", "reserving", "scheduled", "sending", "sent", "aggregating", "aggregated"]
    for current, target in itertools.pairwise(path):
        assert status.allowed(current, target), (current, target)
        status.check(current, target)


@pytest.mark.parametrize("current", ["draft", "reserving", "scheduled"])
def test_cancel_only_before_sending_starts(current: str) -> None:
    assert status.allowed(current, "cancelled")


@pytest.mark.parametrize(
    "current", ["sending", "sent", "aggregating", "aggregated", "failed", "halted", "cancelled"]
)
def test_cancel_after_sending_started_is_a_conflict(current: str) -> None:
    with pytest.raises(Conflict, match="cannot become cancelled"):
        status.check(current, "cancelled")


def test_final_statuses_never_move() -> None:
    assert status.FINAL == {"aggregated", "failed", "halted", "cancelled"}
    for final in status.FINAL:
        assert not any(status.allowed(final, target) for target in status.STATUSES)


def test_halted_never_resumes_and_only_sending_halts() -> None:
    assert status.sources("halted") == ["sending"]
    assert not status.allowed("halted", "sending")
    assert status.sources("failed") == ["reserving"]


def test_reserving_twice_is_a_conflict() -> None:
    assert status.sources("reserving") == ["draft"]
    with pytest.raises(Conflict):
        status.check("scheduled", "reserving")


def test_every_status_has_a_label_and_known_edges() -> None:
    assert set(status.TRANSITIONS) == set(status.LABELS)
    for nexts in status.TRANSITIONS.values():
        assert nexts <= set(status.STATUSES)
    with pytest.raises(ValueError):
        status.sources("lost")


def test_outstanding_and_the_error_rate_halt() -> None:
    c = Counters(planned=300, success=170, error=30, suppressed=10)
    assert (c.outstanding, c.attempts) == (90, 200)
    assert should_halt(c, min_attempts=200, threshold=0.10)
    assert "15.0% > 10% after 200 attempts" in halt_reason(c, 0.10)
    # Too few attempts yet, however bad; suppressed results are not attempts.
    assert not should_halt(Counters(300, 100, 99, 50), min_attempts=200, threshold=0.10)
    # Exactly at the threshold is not over it.
    assert not should_halt(Counters(300, 180, 20, 0), min_attempts=200, threshold=0.10)
    assert Counters(5, 3, 2, 1).outstanding == 0


@pytest.mark.parametrize("current", ["draft", "reserving", "scheduled", "sending"])
def test_pending_while_the_campaign_may_still_send(current: str) -> None:
    c = Counters(planned=10, success=6, error=1, suppressed=1)
    assert (c.pending(current), c.unsent(current)) == (2, 0)


@pytest.mark.parametrize(
    "current", ["sent", "aggregating", "aggregated", "halted", "cancelled", "failed"]
)
def test_unsent_is_what_was_given_up_once_nothing_more_is_sent(current: str) -> None:
    c = Counters(planned=10, success=6, error=1, suppressed=1)
    assert (c.pending(current), c.unsent(current)) == (0, 2)
    # Every recipient with a result: nothing given up (F-25: 未配信数 reaches 0).
    assert Counters(10, 8, 1, 1).unsent(current) == 0


def test_sending_over_covers_every_status_after_sending() -> None:
    assert status.SENDING_OVER == status.FINAL | {"sent", "aggregating"}
