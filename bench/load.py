"""Bulk-load N contacts with memberships and delivery history by COPY (streamed, flat memory)."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Iterator
from typing import Any

from bench.data import (
    COPY_COLUMNS,
    CUSTOM_FIELDS,
    GROUPS,
    copy_row,
    history_rows,
    membership_rows,
    profiles,
)
from bench.report import n, progress
from bench.stack import connect_plain, define_fields

#: contact.membership_flags bits of a membership state (0003_membership_flags.sql)
_STATE_BITS = {"deliverable": 1, "unsubscribed": 3, "banned": 5}
_MEMBERSHIP_SEED = 11


def _contacts(count: int) -> Iterator[tuple[Any, ...]]:
    """Contact rows with the membership_flags their memberships give (the same stream as
    :func:`_memberships`), so the memberships can be copied without the per-statement
    trigger recomputing a million contacts."""
    rng = random.Random(_MEMBERSHIP_SEED)
    for p in profiles(count):
        contact_id = p["i"] + 1
        flags = 0
        for _, _, state, _ in membership_rows(contact_id, rng):
            flags |= _STATE_BITS[state]
        yield (contact_id, *copy_row(p), flags)


def _memberships(count: int) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(_MEMBERSHIP_SEED)
    for contact_id in range(1, count + 1):
        yield from membership_rows(contact_id, rng)


def _history(count: int, now: dt.datetime) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(13)
    for contact_id in range(1, count + 1):
        yield from history_rows(contact_id, rng, now)


async def load(dsn: str, count: int) -> dict[str, Any]:
    """Contacts 1..count (ids as given), every one in group 1, ~30% in each of groups 2..5,
    delivery history for ~30%; then VACUUM ANALYZE (autovacuum's steady state)."""
    conn = await connect_plain(dsn)
    started = time.monotonic()
    try:
        await define_fields(conn, CUSTOM_FIELDS)
        await conn.executemany(
            "INSERT INTO contact_group (kind, name) VALUES ('group', $1)",
            [(name,) for name, _ in GROUPS],
        )
        await conn.copy_records_to_table(
            "contact", columns=("id", *COPY_COLUMNS, "membership_flags"), records=_contacts(count)
        )
        await conn.execute("SELECT setval(pg_get_serial_sequence('contact', 'id'), $1)", count)
        progress(f"loaded {n(count)} contacts in {time.monotonic() - started:.0f}s")
        # The contacts' flags are already those of these memberships: no triggers (and no
        # foreign-key checks, the ids are ours) for the COPY; checked against them below.
        await conn.execute("SET session_replication_role = replica")
        await conn.copy_records_to_table(
            "membership",
            columns=("contact_id", "group_id", "state", "method"),
            records=_memberships(count),
        )
        await conn.execute("RESET session_replication_role")
        memberships = await conn.fetchval("SELECT count(*) FROM membership")
        wrong = await conn.fetchval(
            "SELECT count(*) FROM contact c WHERE c.membership_flags <> coalesce("
            " (SELECT bit_or(membership_state_bits(m.state)) FROM membership m"
            "  WHERE m.contact_id = c.id), 0)"
        )
        if wrong:
            raise RuntimeError(f"{wrong} contacts' membership_flags differ from their memberships")
        await conn.copy_records_to_table(
            "delivery_history",
            columns=("contact_id", "campaign_id", "kind", "first_at", "last_at"),
            records=_history(count, dt.datetime.now(dt.UTC)),
        )
        histories = await conn.fetchval("SELECT count(*) FROM delivery_history")
        await conn.execute("VACUUM (ANALYZE)")
        await conn.execute("CHECKPOINT")
        seconds = time.monotonic() - started
        progress(
            f"loaded {n(memberships)} memberships, {n(histories)} history rows; "
            f"{seconds:.0f}s in all"
        )
        return {
            "contacts": count,
            "memberships": memberships,
            "history_rows": histories,
            "load_seconds": round(seconds, 1),
        }
    finally:
        await conn.close()
