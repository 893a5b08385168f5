"""The can-send decision (F-16), shared by the suppression service and the sender.

One pure function decides whether one contact may receive one campaign's mail, from
everything that can refuse it, strongest first:

1. the blacklist (F-14): an exact address rule, or a suffix rule on the domain or a
   parent domain — ``example.com`` matches ``a@example.com`` and ``a@mx.example.com``,
   never ``a@notexample.com``;
2. the contact's black flag (F-14);
3. an address-level suppression (F-15): bounced, complained, invalid;
4. a delivery status that stops sends (F-32): invalid_address, error, spam;
5. the membership state (F-10): banned never; unsubscribed only when the campaign
   deliberately includes unsubscribed memberships (F-20).

Nothing here does I/O: callers gather the facts, from their database or their copy of
``suppression.changes``, and get a :class:`Decision` with the reason when it is "no".
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from libs.common.mail.states import LEFT, DeliveryStatus, MembershipState

#: the statuses of an address that was stopped, however it was: a hard bounce, soft bounces
#: up to the threshold, a complaint. Left out of a campaign's frozen list up front.
STOPPING_DELIVERY_STATUSES = frozenset(
    {
        DeliveryStatus.INVALID_ADDRESS,
        DeliveryStatus.ERROR,
        DeliveryStatus.BOUNCED,
        DeliveryStatus.SPAM,
    }
)
SUPPRESSION_REASONS = frozenset({"bounced", "complained", "invalid"})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.allowed


ALLOWED = Decision(True)


def address_domain(email: str) -> str:
    return email.rpartition("@")[2].lower().rstrip(".")


def suffix_candidates(email: str) -> list[str]:
    """The domain of ``email`` and each parent domain: the keys a suffix rule can have.

    ``a@mx.example.co.jp`` → ``["mx.example.co.jp", "example.co.jp", "co.jp", "jp"]``.
    Looking these up by equality is what makes blacklist matching an index lookup rather
    than a scan of every rule.
    """
    labels = address_domain(email).split(".")
    return [".".join(labels[i:]) for i in range(len(labels)) if labels[i]]


def normalise_rule(match: str, value: str) -> str:
    """The stored form of a rule value: exact addresses lower-cased whole (matching is
    case-insensitive), suffix domains without ``@`` or a leading dot."""
    value = value.strip().lower()
    if match == "suffix":
        return value.lstrip("@").lstrip(".").rstrip(".")
    return value


def blacklisted(email: str, exact: Collection[str], suffixes: Collection[str]) -> bool:
    """Whether a rule set (stored forms) matches ``email``."""
    if email.strip().lower() in exact:
        return True
    return any(candidate in suffixes for candidate in suffix_candidates(email))


def can_send(
    *,
    blacklisted: bool,
    black: bool = False,
    suppression: str | None = None,
    delivery_status: str | None = None,
    membership_state: str | None = None,
    include_unsubscribed: bool = False,
) -> Decision:
    """Whether one mail may go to one contact; ``membership_state`` None means the
    campaign targets no group (a filter-only target), so no membership decides."""
    if blacklisted:
        return Decision(False, "blacklisted")
    if black:
        return Decision(False, "black_flag")
    if suppression in SUPPRESSION_REASONS:
        return Decision(False, f"address_{suppression}")
    if delivery_status in STOPPING_DELIVERY_STATUSES:
        return Decision(False, f"delivery_status_{delivery_status}")
    if membership_state == MembershipState.BANNED:
        return Decision(False, MembershipState.BANNED.value)
    if membership_state == MembershipState.UNSUBSCRIBED and not include_unsubscribed:
        return Decision(False, MembershipState.UNSUBSCRIBED.value)
    if membership_state == LEFT:
        return Decision(False, "not_a_member")
    return ALLOWED
