"""The bounce processor's state changes, each inside the caller's transaction.

Every event — a classified failure, a delivery, an open or click — goes through
:func:`apply_events`: lock the contacts' rows in contact order, run the pure rules
(:mod:`services.bounce_processor.rules`), write the new states and queue what changed on
``bounce.events`` through the outbox, all in the caller's transaction. So an event's effect
and its announcement commit together or not at all.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.db import Queries, columns
from libs.common.metrics import BOUNCE_RULE_ACTIONS, BOUNCES
from libs.common.topics import Topic
from services.bounce_processor import rules
from services.bounce_processor.rules import ContactState, Effect

QUERIES = Queries(Path(__file__).with_name("queries.sql"))


@dataclass(frozen=True)
class ContactEvent:
    """One event about one contact, with what its bounce.events record would carry."""

    contact_id: int
    event: rules.Event
    occurred_at: dt.datetime
    #: the address the event names (a delivery result's, a DSN's recipient), if any.
    email: str | None = None
    campaign_id: str | None = None
    diagnostic: str | None = None


@dataclass(frozen=True)
class Failure:
    """A classified failure of one campaign mail, attributed to its contact."""

    campaign_id: str
    contact_id: int
    classification: str
    source: str  # dsn | arf | heuristic | smtp
    occurred_at: dt.datetime
    email: str | None = None
    diagnostic: str | None = None
    message_id: str | None = None

    def as_event(self) -> ContactEvent:
        return ContactEvent(
            self.contact_id,
            rules.Bounce(self.classification),
            self.occurred_at,
            self.email,
            self.campaign_id,
            self.diagnostic,
        )


def bounce_event(effect: Effect, event: ContactEvent) -> dict[str, Any]:
    """The bounce.events record of one effect."""
    return {
        "event_id": str(uuid.uuid4()),
        "contact_id": effect.state.contact_id,
        "email": effect.state.email or event.email or "",
        "campaign_id": event.campaign_id,
        "classification": effect.classification,
        "hard": effect.hard,
        "action": effect.action,
        "delivery_status": effect.delivery_status,
        "diagnostic": event.diagnostic,
        "occurred_at": event.occurred_at,
    }


async def apply_events(
    conn: asyncpg.Connection, events: Sequence[ContactEvent], *, soft_threshold: int
) -> list[Effect]:
    """Apply ``events`` in order (per contact, the order matters) and queue what changed."""
    if not events:
        return []
    emails: dict[int, str | None] = {}
    for e in events:
        if e.email or e.contact_id not in emails:
            emails[e.contact_id] = e.email or emails.get(e.contact_id)
    ids = sorted(emails)
    await conn.execute(QUERIES["lock-states"], ids, [emails[i] for i in ids])
    states = {
        r["contact_id"]: ContactState(**dict(r)) for r in await conn.fetch(QUERIES["states"], ids)
    }
    before = dict(states)
    effects: list[Effect] = []
    messages = []
    for e in events:
        effect = rules.apply(states[e.contact_id], e.event, soft_threshold=soft_threshold)
        states[e.contact_id] = effect.state
        effects.append(effect)
        if effect.action is not None:
            BOUNCE_RULE_ACTIONS.labels(effect.action).inc()
            messages.append((Topic.BOUNCE_EVENTS, e.contact_id, bounce_event(effect, e)))
    changed = [s for i, s in states.items() if s != before[i]]
    if changed:
        await conn.execute(
            QUERIES["save-states"],
            *columns(changed, "contact_id", "soft_streak", "delivery_status"),
        )
    await outbox.add_many(conn, messages)
    return effects


async def record_failures(
    conn: asyncpg.Connection, failures: Sequence[Failure], *, soft_threshold: int
) -> list[Failure]:
    """Record failures once each (campaign, contact, classification) and apply the rules to
    the new ones; returns those (duplicates are dropped here, before the rules)."""
    if not failures:
        return []
    rows = await conn.fetch(
        QUERIES["record-bounces"],
        *columns(
            failures,
            "campaign_id",
            "contact_id",
            "classification",
            "source",
            "diagnostic",
            "message_id",
            "occurred_at",
        ),
    )
    fresh_keys = {(r["campaign_id"], r["contact_id"], r["classification"]) for r in rows}
    fresh = []
    for f in failures:
        key = (f.campaign_id, f.contact_id, f.classification)
        if key in fresh_keys:
            fresh_keys.discard(key)  # a batch may hold the same failure twice
            fresh.append(f)
            BOUNCES.labels(f.source, f.classification, "new").inc()
        else:
            BOUNCES.labels(f.source, f.classification, "duplicate").inc()
    await apply_events(conn, [f.as_event() for f in fresh], soft_threshold=soft_threshold)
    return fresh


@dataclass(frozen=True)
class Hit:
    """One valid open or click."""

    kind: str  # open | click
    campaign_id: str
    contact_id: int
    occurred_at: dt.datetime
    url: str | None = None
    user_agent: str | None = None


async def record_hits(
    conn: asyncpg.Connection, hits: Sequence[Hit], *, soft_threshold: int
) -> None:
    """Opens and clicks: counted per (campaign, contact) for uniques, each published on
    feedback.events, and each a reason to reset the soft count (F-31)."""
    if not hits:
        return
    totals: dict[tuple[str, str, int], list[Any]] = {}
    for h in hits:
        key = (h.campaign_id, h.kind, h.contact_id)
        entry = totals.setdefault(key, [0, h.occurred_at, h.occurred_at])
        entry[0] += 1
        entry[1], entry[2] = min(entry[1], h.occurred_at), max(entry[2], h.occurred_at)
    keys = sorted(totals)
    await conn.execute(
        QUERIES["record-engagement"],
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [totals[k][0] for k in keys],
        [totals[k][1] for k in keys],
        [totals[k][2] for k in keys],
    )
    await outbox.add_many(
        conn,
        [
            (
                Topic.FEEDBACK_EVENTS,
                h.contact_id,
                {
                    "event_id": str(uuid.uuid4()),
                    "type": h.kind,
                    "campaign_id": h.campaign_id,
                    "contact_id": h.contact_id,
                    "url": h.url,
                    "user_agent": h.user_agent,
                    "occurred_at": h.occurred_at,
                },
            )
            for h in hits
        ],
    )
    await apply_events(
        conn,
        [
            ContactEvent(h.contact_id, rules.Engaged(h.kind), h.occurred_at, None, h.campaign_id)
            for h in hits
        ],
        soft_threshold=soft_threshold,
    )
