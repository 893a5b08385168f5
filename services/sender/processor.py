"""The sender's domain decisions, pure: no I/O, testable with no broker and no database.

What to do with a send request, in two steps around the ledger claim:

* before the claim, :func:`campaign_stop`: a request of a halted, cancelled or paused
  campaign, or of a campaign whose mail to the recipient's domain is held (a pause with
  ``domains``, :func:`control_change`), is dropped with no result (nothing happened to the
  recipient; after a resume the scheduler releases it again);
* after it, :func:`after_claim` over what the ledger held for its key and what the
  sender's suppression copy answered (``copy.decide``, which applies
  ``libs/common/mail/can_send.py``): :class:`Duplicate` (the ledger decided it already: its
  recorded result is published again, same result_id), :class:`Suppressed` (and why) or
  :class:`Deliverable` (``resend`` when an earlier claim never finished: same Message-ID).

And what an outcome turns into: :func:`delivery_result` (the ``delivery.results`` record
stored in the ledger row) and :func:`ledger_row` (what the ledger records for it).
``mail.system`` takes the same path with no suppression check and no result.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from libs.common.mail.can_send import Decision
from services.sender.models import Claimed, Done, LedgerKey, Outcome

#: what a request is in the ledger: a campaign's recipient, a test send, an operator mail.
CAMPAIGN, TEST, SYSTEM = "campaign", "test", "system"


def request_key(request: Mapping[str, Any]) -> LedgerKey:
    """The ledger key of a send request: one mail per (campaign, step, contact)."""
    return LedgerKey(request["campaign_id"], request.get("step_id") or "", request["contact_id"])


def system_key(mail_id: str, index: int) -> LedgerKey:
    """The ledger key of a ``mail.system`` mail's ``index``-th recipient."""
    return LedgerKey(f"mail:{mail_id}", "", index)


def kind_of(request: Mapping[str, Any]) -> str:
    return TEST if request.get("test") else CAMPAIGN


#: why a request is dropped when its campaign's mail to its recipient's domain is held.
DOMAIN_PAUSED = "domain_paused"
#: the campaign state each campaign.control action sets (pause / resume without domains).
CONTROL_STATES = {"halt": "halted", "cancel": "cancelled", "pause": "paused", "resume": "active"}


def campaign_stop(
    request: Mapping[str, Any],
    stopped: Mapping[str, str],
    held: Mapping[str, Collection[str]] | None = None,
) -> str | None:
    """What stops this request, if anything: its campaign's state (halted, cancelled,
    paused) or :data:`DOMAIN_PAUSED`. ``stopped`` holds the campaigns that are not active,
    ``held`` each campaign's held receiving domains. A test send is never stopped."""
    if request.get("test"):
        return None
    return stop_of(request["campaign_id"], request["email"], stopped, held)


def stop_of(
    campaign_id: str,
    email: str,
    stopped: Mapping[str, str],
    held: Mapping[str, Collection[str]] | None = None,
) -> str | None:
    """:func:`campaign_stop` of a campaign mail to ``email`` (also asked of a delivery still
    queued: one whose campaign or domain stopped meanwhile is abandoned)."""
    state = stopped.get(campaign_id)
    if state is not None:
        return state
    domains = held.get(campaign_id) if held else None
    if domains and recipient_domain(email) in domains:
        return DOMAIN_PAUSED
    return None


def recipient_domain(email: str) -> str:
    """The receiving domain of an address as campaign.control names it: lower case after
    the last '@', an IDN as its A-label (the contract's form; an address's own domain may
    be written either way)."""
    domain = email.rpartition("@")[2].lower()
    return domain if domain.isascii() else a_label(domain)


def a_label(domain: str) -> str:
    """``domain`` with its non-ASCII labels as A-labels; as it is if it cannot be encoded."""
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def domains_of(names: Iterable[str]) -> tuple[str, ...]:
    """A command's domains as :func:`recipient_domain` gives them: lower case, A-labels,
    no blanks, each once, sorted."""
    return tuple(sorted({recipient_domain(n.strip()) for n in names if n.strip()}))


@dataclass(frozen=True)
class StateChange:
    """A campaign.control command that sets the whole campaign's state."""

    state: str


@dataclass(frozen=True)
class DomainChange:
    """A pause (``held``) or resume with domains: the campaign's mail to those receiving
    domains is held, or no longer; its state and its other domains are untouched."""

    domains: tuple[str, ...]
    held: bool


def control_change(command: Mapping[str, Any]) -> StateChange | DomainChange:
    """What a campaign.control command changes. halt and cancel always stop the whole
    campaign (their ``domains`` mean nothing); pause and resume with ``domains`` change
    the held set only, without the whole campaign as before (v1 had no ``domains``). A
    command whose domains are all blank changes nothing rather than the whole campaign: a
    resume meant for some domains must not resume everything."""
    action = command["action"]
    named = command.get("domains") or []
    if action in ("pause", "resume") and named:
        return DomainChange(domains_of(named), held=action == "pause")
    return StateChange(CONTROL_STATES[action])


def needs_check(claimed: Claimed) -> bool:
    """Whether the suppression copy must be asked about a claimed key: not for a row the
    ledger already finished (its outcome stands)."""
    return not already_done(claimed)


def already_done(claimed: Claimed) -> bool:
    return not claimed.fresh and claimed.status == "done"


@dataclass(frozen=True)
class Duplicate:
    """Decided before (a redelivery or a re-release): publish its recorded result again
    (None: a row with no result, a test send or a system mail)."""

    result: dict[str, Any] | None


@dataclass(frozen=True)
class Suppressed:
    """Refused at the last moment by the can-send rule; ``resend``: claimed before."""

    reason: str | None
    resend: bool


@dataclass(frozen=True)
class Deliverable:
    """To be sent; ``resend``: an earlier claim of it never finished (a crash, a sender
    that is gone), so its relay may have kept a first copy: same Message-ID."""

    resend: bool


Action = Duplicate | Suppressed | Deliverable


def after_claim(claimed: Claimed, verdict: Decision | None) -> Action:
    """What to do with a claimed key, given the suppression copy's verdict (None: not
    checked, as for ``mail.system``)."""
    if already_done(claimed):
        return Duplicate(claimed.result)
    resend = not claimed.fresh
    if verdict is not None and not verdict:
        return Suppressed(verdict.reason, resend)
    return Deliverable(resend)


def suppressed(reason: str | None) -> Outcome:
    return Outcome("suppressed", suppressed_reason=reason)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def delivery_result(key: LedgerKey, email: str, outcome: Outcome, at: datetime) -> dict[str, Any]:
    """A new DeliveryResult (fresh result_id) as stored in the ledger (times in ms)."""
    return {
        "result_id": str(uuid.uuid4()),
        "campaign_id": key.campaign_id,
        "contact_id": key.contact_id,
        "email": email,
        "outcome": outcome.outcome,
        "smtp_code": outcome.smtp_code,
        "enhanced_code": outcome.enhanced_code,
        "diagnostic": outcome.diagnostic,
        "relay": outcome.relay,
        "message_id": outcome.message_id,
        "step_id": key.step_id or None,
        "suppressed_reason": outcome.suppressed_reason,
        "occurred_at": _ms(at),
    }


def deferral(
    key: LedgerKey,
    domain: str,
    code: int,
    enhanced_code: str | None,
    diagnostic: str | None,
    relay: str | None,
    at: datetime,
) -> dict[str, Any]:
    """A DeliveryDeferral (``delivery.deferrals``): one 4xx answer that ``key``'s delivery
    met and will be tried again after. The receiving domain, not the address: the record
    is about the domain's intake (deliverability counts it per domain)."""
    return {
        "deferral_id": str(uuid.uuid4()),
        "campaign_id": key.campaign_id,
        "contact_id": key.contact_id,
        "domain": domain,
        "smtp_code": code,
        "enhanced_code": enhanced_code,
        "diagnostic": diagnostic,
        "relay": relay,
        "step_id": key.step_id or None,
        "occurred_at": _ms(at),
    }


def ledger_row(key: LedgerKey, kind: str, email: str, outcome: Outcome, at: datetime) -> Done:
    """What the ledger records for an outcome: a campaign row stores its DeliveryResult
    (published after the commit, and again from the row if its batch comes back); a test
    send or a system mail has none."""
    result = delivery_result(key, email, outcome, at) if kind == CAMPAIGN else None
    return key, kind, outcome, result
