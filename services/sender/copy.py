"""The sender's own copy of suppression state, fed by ``suppression.changes`` (F-16).

Per entity — (contact, group) for memberships, contact for the black flag, address for
address suppressions, rule value for blacklist rules — the change with the highest
``version`` wins; an older change arriving later is ignored. Cleared and left entities are
kept (state ``cleared`` / ``left``) so that an older change cannot bring them back.

:func:`decide` gathers the facts of a whole batch of requests in four indexed lookups and
applies :func:`libs.common.mail.can_send.can_send` to each, at the last moment before SMTP.
``suppression.changes`` carries no delivery status (F-32) today, so that input of the rule
is always None here; a change kind for it would be one more table like the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from libs.common.db import columns
from libs.common.errors import InvalidMessage
from libs.common.mail.can_send import Decision, blacklisted, can_send, suffix_candidates
from libs.common.mail.states import MEMBERSHIP_CHANGE_STATES
from services.sender.ledger import QUERIES

MEMBERSHIP_STATES = frozenset(MEMBERSHIP_CHANGE_STATES)
ADDRESS_STATES = frozenset({"bounced", "complained", "invalid", "cleared"})
RULE_STATES = frozenset({"exact", "suffix", "cleared"})


def _latest(changes: Sequence[dict[str, Any]], key: Any) -> list[dict[str, Any]]:
    """The highest-version change per entity (one statement cannot update a row twice)."""
    best: dict[Any, dict[str, Any]] = {}
    for change in changes:
        k = key(change)
        if k not in best or change["version"] > best[k]["version"]:
            best[k] = change
    return list(best.values())


def check(change: dict[str, Any]) -> dict[str, Any]:
    """The change, or refused (→ DLQ) if this copy cannot hold it."""
    kind, state = change["kind"], change["state"]
    if kind == "membership":
        if change.get("contact_id") is None or change.get("group_id") is None:
            raise InvalidMessage("a membership change needs contact_id and group_id")
        if state not in MEMBERSHIP_STATES:
            raise InvalidMessage(f"unknown membership state {state!r}", field="state")
    elif kind == "contact_black":
        if change.get("contact_id") is None:
            raise InvalidMessage("a contact_black change needs contact_id", field="contact_id")
    elif kind in ("address", "blacklist_rule"):
        if not change.get("email"):
            raise InvalidMessage(f"a {kind} change needs email", field="email")
        if state not in (ADDRESS_STATES if kind == "address" else RULE_STATES):
            raise InvalidMessage(f"unknown {kind} state {state!r}", field="state")
    return change


async def apply(conn: asyncpg.Connection, changes: Sequence[dict[str, Any]]) -> None:
    """Apply a batch of changes, each entity's newest winning, in four statements at most."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for change in changes:
        by_kind.setdefault(change["kind"], []).append(change)
    memberships = _latest(by_kind.get("membership", []), lambda c: (c["contact_id"], c["group_id"]))
    if memberships:
        await conn.execute(
            QUERIES["copy-memberships"],
            *columns(memberships, "contact_id", "group_id", "state", "version"),
        )
    blacks = _latest(by_kind.get("contact_black", []), lambda c: c["contact_id"])
    if blacks:
        await conn.execute(
            QUERIES["copy-contact-black"],
            *columns(blacks, "contact_id"),
            [c["state"] == "black" for c in blacks],
            *columns(blacks, "version"),
        )
    addresses = _latest(by_kind.get("address", []), lambda c: c["email"].strip().lower())
    if addresses:
        await conn.execute(
            QUERIES["copy-addresses"],
            [c["email"].strip().lower() for c in addresses],
            *columns(addresses, "state", "version"),
        )
    rules = _latest(by_kind.get("blacklist_rule", []), lambda c: _rule_value(c["email"]))
    if rules:
        await conn.execute(
            QUERIES["copy-blacklist"],
            [_rule_value(c["email"]) for c in rules],
            *columns(rules, "state", "version"),
        )


def _rule_value(value: str) -> str:
    """The stored form of a rule value (as the suppression service normalises it)."""
    value = value.strip().lower()
    return value if "@" in value else value.lstrip(".").rstrip(".")


async def decide(conn: asyncpg.Connection, requests: Sequence[dict[str, Any]]) -> list[Decision]:
    """The can-send decision of each send request, from this copy, in order.

    Test sends (``test=true``) get the address-level checks only (blacklist and address
    suppressions): they go to an operator's address, not to the sample contact's.
    """
    if not requests:
        return []
    emails = sorted({r["email"].strip().lower() for r in requests})
    candidates = sorted({c for e in emails for c in (e, *suffix_candidates(e))})
    campaign = [r for r in requests if not r.get("test")]
    pairs = [(r["contact_id"], r["group_id"]) for r in campaign if r.get("group_id") is not None]
    memberships: dict[tuple[int, int], str] = {}
    if pairs:
        rows = await conn.fetch(
            QUERIES["memberships-for"], [p[0] for p in pairs], [p[1] for p in pairs]
        )
        memberships = {(r["contact_id"], r["group_id"]): r["state"] for r in rows}
    black: set[int] = set()
    if campaign:
        rows = await conn.fetch(
            QUERIES["black-contacts"], sorted({r["contact_id"] for r in campaign})
        )
        black = {r["contact_id"] for r in rows}
    suppressed = {
        r["email"]: r["state"] for r in await conn.fetch(QUERIES["suppressed-addresses"], emails)
    }
    exact: set[str] = set()
    suffixes: set[str] = set()
    for row in await conn.fetch(QUERIES["blacklist-rules"], candidates):
        (exact if row["state"] == "exact" else suffixes).add(row["value"])

    decisions = []
    for r in requests:
        email = r["email"].strip().lower()
        test = bool(r.get("test"))
        group = r.get("group_id")
        decisions.append(
            can_send(
                blacklisted=blacklisted(email, exact, suffixes),
                black=not test and r["contact_id"] in black,
                suppression=suppressed.get(email),
                membership_state=(
                    None if test or group is None else memberships.get((r["contact_id"], group))
                ),
                include_unsubscribed=bool(r.get("include_unsubscribed")),
            )
        )
    return decisions
