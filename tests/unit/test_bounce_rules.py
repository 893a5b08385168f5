"""F-31, F-32: the bounce rules and the delivery status, with no broker and no database."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from services.bounce_processor.rules import (
    Bounce,
    Cleared,
    ContactState,
    Delivered,
    Effect,
    Engaged,
    Event,
    apply,
)

THRESHOLD = 5


def run(events: Sequence[Event], state: ContactState | None = None) -> list[Effect]:
    state = state or ContactState(1, "a@example.jp")
    effects = []
    for event in events:
        effect = apply(state, event, soft_threshold=THRESHOLD)
        effects.append(effect)
        state = effect.state
    return effects


SOFT, HARD = Bounce("temporary_error"), Bounce("invalid_address")


def test_one_hard_bounce_stops_the_address() -> None:
    [effect] = run([HARD])
    assert (effect.action, effect.hard, effect.delivery_status) == (
        "bounced",
        True,
        "invalid_address",
    )
    [effect] = run([Bounce("error")])
    assert (effect.action, effect.delivery_status) == ("bounced", "error")


def test_five_soft_bounces_in_a_row_stop_it_and_counting_starts_again() -> None:
    effects = run([SOFT] * 6)
    assert [e.action for e in effects] == ["counted"] * 4 + ["bounced", "counted"]
    assert [e.state.soft_streak for e in effects] == [1, 2, 3, 4, 0, 1]
    assert effects[0].delivery_status == "temporary_error"
    assert effects[1].delivery_status is None  # unchanged: not published again
    assert not effects[4].hard
    # stopped: バウンス, a stopping status of its own; a later soft bounce keeps it, a
    # delivery or an open does not lift it (only an operator's clearing does)
    assert effects[4].delivery_status == "bounced"
    assert effects[5].delivery_status is None and effects[5].state.delivery_status == "bounced"
    later = run([Delivered(), Engaged("open")], effects[5].state)
    assert [e.state.delivery_status for e in later] == ["bounced", "bounced"]
    [cleared] = run([Cleared()], effects[5].state)
    assert cleared.state.delivery_status == "unconfirmed" and cleared.state.soft_streak == 0


def test_an_open_or_click_resets_the_count_a_delivery_does_not() -> None:
    effects = run([SOFT] * 4 + [Engaged("open")] + [SOFT] * 4)
    assert "bounced" not in [e.action for e in effects]
    reset = effects[4]
    assert (reset.action, reset.classification, reset.delivery_status) == (
        "reset",
        "temporary_error",
        "ok",
    )
    effects = run([SOFT] * 4 + [Delivered(), SOFT])
    assert effects[4].state.soft_streak == 4
    assert effects[4].action == "status" and effects[4].delivery_status == "ok"
    assert effects[5].action == "bounced"
    effects = run([SOFT] * 4 + [Engaged("click"), SOFT])
    assert effects[-1].action == "counted" and effects[-1].state.soft_streak == 1


def test_policy_is_counted_but_not_held_against_the_recipient() -> None:
    effects = run([Bounce("policy")] * 10)
    assert {(e.action, e.hard, e.delivery_status) for e in effects} == {("counted", False, None)}
    assert effects[-1].state == ContactState(1, "a@example.jp")


def test_a_complaint() -> None:
    [effect] = run([Bounce("spam")])
    assert (effect.action, effect.delivery_status) == ("complained", "spam")


@pytest.mark.parametrize(
    ("start", "event", "status"),
    [
        ("unconfirmed", Delivered(), "ok"),
        ("temporary_error", Delivered(), "ok"),
        ("unconfirmed", Engaged("open"), "ok"),
        # a stopping status is never lifted by an event, only by an operator
        ("invalid_address", Delivered(), "invalid_address"),
        ("error", Engaged("click"), "error"),
        ("spam", Engaged("open"), "spam"),
        ("invalid_address", SOFT, "invalid_address"),
        # a newer hard bounce or a complaint replaces it; nothing replaces a complaint
        ("invalid_address", Bounce("error"), "error"),
        ("error", Bounce("spam"), "spam"),
        ("spam", HARD, "spam"),
        # an operator's clearing lifts a bounce status, never a complaint
        ("invalid_address", Cleared(), "unconfirmed"),
        ("error", Cleared(), "unconfirmed"),
        ("temporary_error", Cleared(), "unconfirmed"),
        ("spam", Cleared(), "spam"),
        ("ok", Cleared(), "ok"),
    ],
)
def test_delivery_status(start: str, event: Event, status: str) -> None:
    [effect] = run([event], ContactState(1, "a@example.jp", 0, start))
    assert effect.state.delivery_status == status
    assert effect.delivery_status == (status if status != start else None)


def test_nothing_to_publish_when_nothing_changed() -> None:
    [effect] = run([Engaged("open")], ContactState(1, None, 0, "ok"))
    assert effect.action is None


def test_clearing_gives_the_address_its_whole_soft_count_again() -> None:
    effects = run([SOFT] * 3 + [Cleared()] + [SOFT] * 4)
    assert "bounced" not in [e.action for e in effects]
    cleared = effects[3]
    assert (cleared.action, cleared.delivery_status, cleared.state.soft_streak) == (
        "status",
        "unconfirmed",
        0,
    )
