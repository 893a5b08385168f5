"""Pure decisions of the suppression service: who may change a membership to what (F-10,
F-11), and what a change propagates to under the sync policy (F-12). No I/O."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.mail.states import ChangeMethod, MembershipState

STATES = MembershipState.values()
METHODS = ChangeMethod.values()
ACTORS = ("reader", "operator", "upstream", "system")
#: how much mail a state stops (an automatic change only ever moves up).
RANK = {state: rank for rank, state in enumerate(STATES)}
#: the method a change gets when its command names none.
DEFAULT_METHOD = {
    "reader": ChangeMethod.FORM.value,
    "operator": ChangeMethod.SYSTEM.value,
    "upstream": ChangeMethod.UPSTREAM.value,
    "system": ChangeMethod.AUTO_SYNC.value,
}


@dataclass(frozen=True)
class Transition:
    """The answer to "may ``actor`` move this membership to ``wanted``?".

    ``allowed`` False comes with ``rule``, the sentence an operator or API client sees.
    ``changes`` is False for an allowed request that leaves the state as it is.
    """

    allowed: bool
    changes: bool = False
    rule: str | None = None


def decide(current: str, wanted: str, actor: str) -> Transition:
    """F-11: a reader only ever stops mail for themselves; banned is lifted by an operator."""
    if wanted not in RANK:
        return Transition(False, rule=f"unknown state {wanted!r}; use one of {', '.join(STATES)}")
    if actor not in ACTORS:
        return Transition(False, rule=f"unknown actor {actor!r}")
    if current == wanted:
        return Transition(True, changes=False)
    if actor == "operator":
        return Transition(True, changes=True)
    if current == MembershipState.BANNED:
        return Transition(
            False, rule="a banned (配信禁止) membership is changed by an operator only"
        )
    if actor == "reader":
        if wanted == MembershipState.UNSUBSCRIBED:
            return Transition(True, changes=True)
        if wanted == MembershipState.DELIVERABLE:
            return Transition(False, rule="a reader can unsubscribe but not re-subscribe here")
        return Transition(False, rule="only an operator can ban (配信禁止)")
    if actor == "system" and RANK[wanted] < RANK[current]:
        return Transition(False, rule="automatic changes only ever stop mail, never resume it")
    return Transition(True, changes=True)


def reader_unsubscribe(current: str) -> Transition:
    """What the public unsubscribe form does: stop mail; already stopped is fine."""
    if current in (MembershipState.UNSUBSCRIBED, MembershipState.BANNED):
        return Transition(True, changes=False)
    return decide(current, MembershipState.UNSUBSCRIBED.value, "reader")


#: the states a reader's unsubscribe changes (the others it leaves as they are).
READER_STOPS = tuple(state for state in STATES if reader_unsubscribe(state).changes)


def propagation(new_state: str, *, sync_unsubscribe: bool, sync_ban: bool) -> str | None:
    """F-12: the state every other membership of the contact moves to, if any."""
    if new_state == MembershipState.UNSUBSCRIBED and sync_unsubscribe:
        return MembershipState.UNSUBSCRIBED.value
    if new_state == MembershipState.BANNED and sync_ban:
        return MembershipState.BANNED.value
    return None


def join_state(
    requested: str, *, auto_stop: bool, banned_elsewhere: bool, sync_ban: bool
) -> tuple[str, str]:
    """(state, method) of a new membership.

    ``auto_stop`` registers it already stopped. A contact banned in another group while the
    ban switch is on joins banned (the stronger refusal follows them); an unsubscribe
    elsewhere does not stop a new, explicit join.
    """
    if banned_elsewhere and sync_ban:
        return MembershipState.BANNED.value, ChangeMethod.AUTO_SYNC.value
    if auto_stop:
        return MembershipState.UNSUBSCRIBED.value, ChangeMethod.AUTO_STOP.value
    return requested, ChangeMethod.SYSTEM.value
