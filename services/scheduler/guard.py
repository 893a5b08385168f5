"""The complaint guard's decisions in the scheduler (issue 21), without I/O.

Deliverability publishes ``campaign.guard`` (compacted, keyed by campaign): a campaign whose
complaint rate over delivered mail passed the threshold has its remaining sends to some
receiving domains held; the latest record per campaign carries the whole set of domains.
The scheduler keeps, per campaign, the domains held now and those an operator resumed
(``campaign_guard``, migration 0008):

- a record holds ``record.domains − resumed − held``: the latest record carries the whole
  set, so every later record names the domains an operator resumed again — they stay
  resumed (the operator's decision stands);
- newly held domains of a campaign that may still send are paused on ``campaign.control``
  (``pause`` with those ``domains``): the sender drops the queued requests to them; their
  rows without a result are marked ``held`` (out of the release index; those released go
  back to unreleased) and the release loop also skips any row whose recipient's domain is
  held (:data:`DOMAIN_SQL`), so a row dropped or not yet sent goes out only after a resume,
  with attempt + 1 if it was released before;
- a campaign does not become ``sent`` while held rows have no result: it stays ``sending``
  and its ``guard`` says why;
- ``POST /v1/campaigns/{id}/guard/resume`` moves named (default: all) held domains to resumed
  and publishes ``resume`` with them;
- ``POST /v1/campaigns/{id}/guard/drop`` gives named (default: all) held domains up: their
  rows without a result are recorded ``suppressed`` (no mail) and counted, so the campaign
  can finish; the sender keeps them paused. A later record does not hold a resumed or
  dropped domain again.

A finished campaign's record is kept for display only: nothing is paused.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from libs.common.errors import InvalidMessage
from services.scheduler.status import SENDING_OVER

#: a recipient's receiving domain in SQL: the lower-case part after the last '@' (as
#: :func:`domain_of`); the release queries compare it with the held domains.
DOMAIN_SQL = "lower(substring(email from '[^@]*$'))"
#: the longest domain name (RFC 1035: 253 characters in text form).
MAX_DOMAIN = 253
#: the most domains one resume may name.
MAX_RESUME_DOMAINS = 100


@dataclass(frozen=True)
class GuardRecord:
    """One decoded ``campaign.guard`` record."""

    guard_id: str
    campaign_id: uuid.UUID
    domains: frozenset[str]
    reason: str
    delivered: int
    complaints: int
    decided_at: dt.datetime


def normalise_domain(raw: str) -> str:
    """A receiving domain as compared: lower case, no surrounding space or final dot."""
    return raw.strip().rstrip(".").lower()


def domain_of(email: str) -> str:
    """The receiving domain of an address: the lower-case part after its last '@'."""
    return email.rsplit("@", 1)[-1].lower()


def parse(value: Mapping[str, Any]) -> GuardRecord:
    """A ``campaign.guard`` value checked; :class:`InvalidMessage` (dead-lettered) names the
    first field that no campaign could use."""
    try:
        campaign_id = uuid.UUID(str(value["campaign_id"]))
    except ValueError:
        raise InvalidMessage("campaign_id is not a UUID", field="campaign_id") from None
    guard_id = str(value["guard_id"]).strip()
    if not guard_id:
        raise InvalidMessage("guard_id is empty", field="guard_id")
    domains = set()
    for raw in value["domains"]:
        domain = normalise_domain(raw)
        if not domain or len(domain) > MAX_DOMAIN or "@" in domain or "\x00" in domain:
            raise InvalidMessage(f"not a receiving domain: {raw[:80]!r}", field="domains")
        domains.add(domain)
    return GuardRecord(
        guard_id=guard_id,
        campaign_id=campaign_id,
        domains=frozenset(domains),
        reason=str(value["reason"]).replace("\x00", ""),
        delivered=int(value["delivered"]),
        complaints=int(value["complaints"]),
        decided_at=value["decided_at"],
    )


def newly_held(record: Iterable[str], held: Collection[str], resumed: Collection[str]) -> list[str]:
    """The domains a record holds now: named, neither resumed by an operator nor held
    already (sorted)."""
    return sorted(set(record) - set(resumed) - set(held))


def to_resume(held: Collection[str], requested: Iterable[str] | None) -> list[str]:
    """The held domains a resume names (all of them when it names none), sorted; empty
    when none of those named is held."""
    if requested is None:
        return sorted(held)
    return sorted({normalise_domain(d) for d in requested} & set(held))


def may_send(status: str) -> bool:
    """Whether a campaign in ``status`` may still send (so a hold or resume is sent to the
    sender): not once it finished."""
    return status not in SENDING_OVER


def guard_json(
    row: Mapping[str, Any] | None, held_recipients: int | None = None
) -> dict[str, Any] | None:
    """The API's ``guard`` of a campaign: null when the guard never tripped for it."""
    if row is None:
        return None
    body: dict[str, Any] = {
        "held": sorted(row["held"]),
        "resumed": sorted(row["resumed"]),
        "dropped": sorted(row["dropped"]),
        "reason": row["reason"],
        "delivered": row["delivered"],
        "complaints": row["complaints"],
        "decided_at": row["decided_at"],
        "resumed_by": row["resumed_by"],
        "resumed_at": row["resumed_at"],
    }
    if held_recipients is not None:
        body["held_recipients"] = held_recipients
    return body
