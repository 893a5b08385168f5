"""The bounce rules (F-31) and delivery status (F-32): pure decisions, no I/O.

One contact's state (its consecutive soft bounces, its delivery status, whether it was
already stopped) and one event in, the new state and what to tell other services out:

- a **hard** bounce (``invalid_address``, ``error``) stops the address at once: action
  ``bounced`` (suppression sets the address ``bounced``), status = the classification;
- a **soft** bounce (``temporary_error``) is counted and the status becomes
  ``temporary_error``, which does not stop sends by itself; the ``soft_threshold``-th in a
  row stops the address (``bounced``), its status becomes ``bounced`` (バウンス: stopped, as
  a hard bounce is, so search and the next frozen list see it) and the count starts again
  (if an operator clears the address, it gets the whole count again);
- a **policy** failure (5.7.x) is a campaign error, not the recipient's: counted on
  bounce.events for the record, no state change;
- **spam** (an ARF complaint): ``complained``, status ``spam``;
- an **open or click** proves the address reads mail: the soft count goes back to 0
  (``reset``) and an unconfirmed or temporary status becomes ``ok``;
- a **delivered** mail (SMTP accepted) makes an unconfirmed or temporary status ``ok`` but
  does **not** reset the soft count (the seed's rule: acceptance is not reading; a mailbox
  that accepts and then bounces asynchronously is exactly the soft case).

A stopping status (``invalid_address``, ``error``, ``bounced``, ``spam``) is never lifted by a mail
event: only an operator does that (**cleared**: the soft count goes back to 0 and a bounce
status back to ``unconfirmed``; a complaint stays), so a late "delivered" cannot re-open an
address the rules closed. A complaint outranks a later hard bounce in the status. ``bounced`` and
``complained`` are published for every new failure, not only the first: suppression's
write is idempotent, and an address an operator cleared is stopped again by its next hard
bounce. Each failure reaches the rules once (duplicates are dropped before, store.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from libs.common.mail.bounce_class import is_hard, is_soft
from libs.common.mail.can_send import STOPPING_DELIVERY_STATUSES
from libs.common.mail.states import DeliveryStatus

#: statuses an open, click or delivery may turn into ``ok``.
LIFTABLE = frozenset({DeliveryStatus.UNCONFIRMED, DeliveryStatus.TEMPORARY_ERROR})
#: bounce.events actions (a plain string in the schema; see its doc).
Action = Literal["counted", "bounced", "complained", "reset", "status"]
#: the classification of events that carry no failure (reset, status).
NO_CLASSIFICATION = "none"


@dataclass(frozen=True)
class ContactState:
    contact_id: int
    email: str | None = None
    soft_streak: int = 0
    delivery_status: str = DeliveryStatus.UNCONFIRMED.value


@dataclass(frozen=True)
class Bounce:
    """A classified failure of one mail to this contact (DSN, ARF, or SMTP reply)."""

    classification: str


@dataclass(frozen=True)
class Engaged:
    """An open or a click."""

    kind: str


@dataclass(frozen=True)
class Delivered:
    """The relay accepted a mail to this contact."""


@dataclass(frozen=True)
class Cleared:
    """An operator lifted the address's ``bounced`` suppression (suppression's
    ``DELETE /v1/suppressions/{email}``): try the address again from a clean slate."""


Event = Bounce | Engaged | Delivered | Cleared
#: statuses an operator's clearing lifts back to ``unconfirmed`` (a complaint stays: only
#: bounced addresses can be cleared).
CLEARABLE = frozenset(
    {
        DeliveryStatus.INVALID_ADDRESS,
        DeliveryStatus.ERROR,
        DeliveryStatus.BOUNCED,
        DeliveryStatus.TEMPORARY_ERROR,
    }
)


@dataclass(frozen=True)
class Effect:
    state: ContactState
    #: what to publish on bounce.events; None: nothing changed that others must know.
    action: Action | None
    classification: str = NO_CLASSIFICATION
    hard: bool = False
    #: the new delivery status when it changed (published), else None.
    delivery_status: str | None = None


def _status(state: ContactState, wanted: str) -> str:
    """The status after an event that suggests ``wanted``: a complaint stays; another
    stopping status gives way only to a complaint or a newer hard bounce."""
    current = state.delivery_status
    if current == DeliveryStatus.SPAM:
        return current
    if (
        current in STOPPING_DELIVERY_STATUSES
        and wanted != DeliveryStatus.SPAM
        and not is_hard(wanted)
    ):
        return current
    return wanted


def _effect(
    before: ContactState, after: ContactState, action: Action | None, classification: str
) -> Effect:
    changed = after.delivery_status if after.delivery_status != before.delivery_status else None
    if action is None and changed is not None:
        action = "status"
    return Effect(after, action, classification, is_hard(classification), changed)


def _bounce(state: ContactState, classification: str, soft_threshold: int) -> Effect:
    if classification == "policy":
        return Effect(state, "counted", classification, False, None)
    if classification == "spam":
        after = replace(state, delivery_status=_status(state, DeliveryStatus.SPAM.value))
        return _effect(state, after, "complained", "spam")
    if is_hard(classification):
        after = replace(state, delivery_status=_status(state, classification))
        return _effect(state, after, "bounced", classification)
    if is_soft(classification):
        streak = state.soft_streak + 1
        stops = streak >= soft_threshold
        after = replace(
            state,
            # counting starts again once the address is stopped (an operator may clear it)
            soft_streak=0 if stops else streak,
            delivery_status=_status(
                state,
                DeliveryStatus.BOUNCED.value if stops else DeliveryStatus.TEMPORARY_ERROR.value,
            ),
        )
        return _effect(state, after, "bounced" if stops else "counted", classification)
    raise ValueError(f"unknown classification {classification!r}")


def apply(state: ContactState, event: Event, *, soft_threshold: int) -> Effect:
    """The rules for one event; see the module docstring."""
    if isinstance(event, Bounce):
        return _bounce(state, event.classification, soft_threshold)
    if isinstance(event, Cleared):
        status = (
            DeliveryStatus.UNCONFIRMED.value
            if state.delivery_status in CLEARABLE
            else state.delivery_status
        )
        after = replace(state, soft_streak=0, delivery_status=status)
        return _effect(state, after, None, NO_CLASSIFICATION)
    status = DeliveryStatus.OK.value if state.delivery_status in LIFTABLE else state.delivery_status
    if isinstance(event, Engaged):
        after = replace(state, soft_streak=0, delivery_status=status)
        if state.soft_streak > 0:
            return _effect(state, after, "reset", "temporary_error")
        return _effect(state, after, None, NO_CLASSIFICATION)
    after = replace(state, delivery_status=status)
    return _effect(state, after, None, NO_CLASSIFICATION)
