"""The suppression service's state changes, each inside the caller's transaction.

Every change is queued on ``suppression.changes`` through the outbox in the transaction
that made it, so contacts' projection and the sender's last-mile copy see exactly what
was committed. Changes of one contact are serialised by locking its memberships first.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import asyncpg

from libs.common import avro, avrocodec, outbox, trace
from libs.common.db import Queries
from libs.common.errors import Forbidden, NotFound
from libs.common.mail.states import LEFT, MembershipState
from libs.common.metrics import SUPPRESSION_CHANGES
from libs.common.topics import Topic
from services.suppression.processor import (
    DEFAULT_METHOD,
    READER_STOPS,
    Transition,
    decide,
    join_state,
    propagation,
    reader_unsubscribe,
)

QUERIES = Queries(Path(__file__).with_name("queries.sql"))


def change_record(
    kind: str,
    *,
    state: str,
    version: int,
    contact_id: int | None = None,
    group_id: int | None = None,
    email: str | None = None,
    method: str | None = None,
    changed_at: dt.datetime | None = None,
) -> dict[str, Any]:
    """A ``suppression.changes`` record."""
    return {
        "change_id": str(uuid.uuid4()),
        "kind": kind,
        "contact_id": contact_id,
        "email": email,
        "group_id": group_id,
        "state": state,
        "method": method,
        "changed_at": changed_at or dt.datetime.now(dt.UTC),
        "version": version,
    }


def membership_change(row: Mapping[str, Any], state: str | None = None) -> dict[str, Any]:
    return change_record(
        "membership",
        state=state or row["state"],
        version=row["version"],
        contact_id=row["contact_id"],
        group_id=row["group_id"],
        method=row["method"],
        changed_at=row.get("changed_at"),
    )


def no_membership(contact_id: int, group_id: int) -> NotFound:
    """What this service can say of a membership it has not recorded: contacts records a join
    at once and its Join command is applied here a moment later, so it may be a member."""
    return NotFound(
        f"contact {contact_id} has no membership in group or plan {group_id} here: not a "
        "member, or a join made a moment ago that is still being applied (retry in a moment)"
    )


async def publish(conn: asyncpg.Connection, changes: Iterable[dict[str, Any]]) -> None:
    messages = []
    for change in changes:
        # Address-level kinds are keyed by the address, so one address's changes stay in order.
        by_address = change["kind"] in ("address", "blacklist_rule") or change["contact_id"] is None
        key = change["email"] if by_address else change["contact_id"]
        messages.append((Topic.SUPPRESSION_CHANGES, key, change))
        SUPPRESSION_CHANGES.labels(change["kind"], change["state"], change["method"] or "").inc()
    await outbox.add_many(conn, messages)


async def _policy(conn: asyncpg.Connection) -> asyncpg.Record:
    return await conn.fetchrow(QUERIES["sync-policy"])


async def change_state(
    conn: asyncpg.Connection,
    contact_id: int,
    group_id: int,
    wanted: str,
    *,
    actor: str,
    method: str | None = None,
    campaign_id: str | None = None,
    requested_by: str | None = None,
) -> tuple[Transition, asyncpg.Record]:
    """Move one membership to ``wanted`` if ``actor`` may (F-11), then propagate (F-12).

    ``requested_by`` (who asked: a person or a role; None for a reader) is kept as the
    membership's ``changed_by``, and as that of every membership the change propagates to.

    Raises NotFound for an unknown membership and Forbidden naming the rule when the
    actor may not; an allowed no-op changes and publishes nothing.
    """
    memberships = {
        r["group_id"]: r for r in await conn.fetch(QUERIES["lock-memberships"], contact_id)
    }
    current = memberships.get(group_id)
    if current is None:
        raise no_membership(contact_id, group_id)
    if actor == "reader" and wanted == MembershipState.UNSUBSCRIBED:
        transition = reader_unsubscribe(current["state"])
    else:
        transition = decide(current["state"], wanted, actor)
    if not transition.allowed:
        raise Forbidden(transition.rule or "not allowed")
    if not transition.changes:
        return transition, current
    row = await conn.fetchrow(
        QUERIES["set-state"],
        contact_id,
        group_id,
        wanted,
        method or DEFAULT_METHOD[actor],
        campaign_id,
        requested_by,
    )
    changes = [membership_change(row)]
    policy = await _policy(conn)
    target = propagation(wanted, sync_unsubscribe=policy["unsubscribe"], sync_ban=policy["ban"])
    if target is not None:
        propagated = await conn.fetch(
            QUERIES["propagate"], contact_id, group_id, target, requested_by
        )
        for other in propagated:
            changes.append(membership_change(other))
    await publish(conn, changes)
    return transition, row


@functools.cache
def _tail_checked() -> None:
    """reader-unsubscribe appends changed_at and version to a record encoded without them:
    they must stay the schema's last two fields, both Avro longs."""
    _, schema = avro.current_schema(Topic.SUPPRESSION_CHANGES.value)
    assert isinstance(schema, dict)
    tail = [(f["name"], f["type"]) for f in schema["fields"][-2:]]
    expected = [
        ("changed_at", {"type": "long", "logicalType": "timestamp-millis"}),
        ("version", "long"),
    ]
    if tail != expected:
        raise RuntimeError(f"suppression.changes no longer ends with changed_at, version: {tail}")


def record_head(change: dict[str, Any]) -> tuple[bytes, int]:
    """(the Avro record of ``change`` without its trailing changed_at and version, schema
    version): with both 0 the record ends in one zero byte each."""
    _tail_checked()
    _, _, payload, version = outbox.row(
        Topic.SUPPRESSION_CHANGES, None, {**change, "changed_at": avrocodec.EPOCH, "version": 0}
    )
    assert payload.endswith(b"\0\0"), payload
    return payload[:-2], version


async def unsubscribe_by_link(
    conn: asyncpg.Connection, contact_id: int, group_id: int, *, campaign_id: str | None
) -> bool | None:
    """The public link's unsubscribe in one statement (its own transaction) when nothing
    propagates: True if it stopped the membership, False if it was stopped already, None
    when it is for :func:`change_state` (the sync policy propagates, or a concurrent change
    took the row first). Raises NotFound for an unknown membership.

    The change is queued in the outbox without a NOTIFY: the caller wakes its own relay.
    """
    method = DEFAULT_METHOD["reader"]
    head, schema_version = record_head(
        change_record(
            "membership",
            state=MembershipState.UNSUBSCRIBED.value,
            version=0,
            contact_id=contact_id,
            group_id=group_id,
            method=method,
        )
    )
    row = await conn.fetchrow(
        QUERIES["reader-unsubscribe"],
        contact_id,
        group_id,
        list(READER_STOPS),
        method,
        campaign_id,
        head,
        Topic.SUPPRESSION_CHANGES.value,
        schema_version,
        trace.current(),
    )
    if row["was"] is None:
        raise no_membership(contact_id, group_id)
    if row["queued"]:
        SUPPRESSION_CHANGES.labels("membership", MembershipState.UNSUBSCRIBED.value, method).inc()
        return True
    return None if row["was"] in READER_STOPS else False


async def join(
    conn: asyncpg.Connection,
    contact_id: int,
    group_id: int,
    *,
    state: str = MembershipState.DELIVERABLE.value,
    auto_stop: bool = False,
    email: str | None = None,
    joined_at: dt.datetime | None = None,
    requested_by: str | None = None,
) -> asyncpg.Record | None:
    """A new membership (idempotent: an existing one is left as it is), ``changed_by``
    ``requested_by``.

    A reader's unsubscribe that arrived first (:func:`unsubscribe_early`) is applied to it
    when the membership was joined before the click: nothing the reader asked is lost."""
    await conn.execute(QUERIES["lock-joins-of-contact"], contact_id)
    memberships = await conn.fetch(QUERIES["lock-memberships"], contact_id)
    policy = await _policy(conn)
    state, method = join_state(
        state,
        auto_stop=auto_stop,
        sync_ban=policy["ban"],
        banned_elsewhere=any(m["state"] == MembershipState.BANNED for m in memberships),
    )
    row = await conn.fetchrow(
        QUERIES["join"],
        contact_id,
        group_id,
        state,
        method,
        joined_at or dt.datetime.now(dt.UTC),
        requested_by,
    )
    if email:
        await conn.execute(
            "INSERT INTO contact (id, email) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            contact_id,
            email,
        )
    early = await conn.fetchrow(QUERIES["take-early-unsubscribe"], contact_id, group_id)
    if row is not None:
        await publish(conn, [membership_change(row)])
        if early is not None and clicked_after_join(early["clicked_at"], row["joined_at"]):
            _, row = await change_state(
                conn,
                contact_id,
                group_id,
                MembershipState.UNSUBSCRIBED.value,
                actor="reader",
                method=DEFAULT_METHOD["reader"],
                campaign_id=early["campaign_id"],
            )
    return row


def clicked_after_join(clicked_at: dt.datetime, joined_at: dt.datetime) -> bool:
    """Whether a reader's click came after the join, compared at the join's resolution: a
    join's ``issued_at`` travels in milliseconds and a click is kept to the microsecond, so a
    click a few hundred microseconds before the join would otherwise count as after it. A click
    in the join's own millisecond is taken as before it: that join is a new subscription."""
    return clicked_at.replace(microsecond=clicked_at.microsecond // 1000 * 1000) > joined_at


async def unsubscribe_early(
    conn: asyncpg.Connection, contact_id: int, group_id: int, *, campaign_id: str | None
) -> bool:
    """The link's unsubscribe of a membership not recorded here (yet), in the caller's
    transaction: contacts records a join at once and its Join command arrives a moment later.
    If the membership arrived meanwhile, it is stopped as usual (whether it changed);
    otherwise the click is kept and :func:`join` applies it (True: it will be stopped)."""
    await conn.execute(QUERIES["lock-joins-of-contact"], contact_id)
    if await conn.fetchrow(QUERIES["membership"], contact_id, group_id) is not None:
        transition, _ = await change_state(
            conn,
            contact_id,
            group_id,
            MembershipState.UNSUBSCRIBED.value,
            actor="reader",
            method=DEFAULT_METHOD["reader"],
            campaign_id=campaign_id,
        )
        return transition.changes
    await conn.execute(QUERIES["record-early-unsubscribe"], contact_id, group_id, campaign_id)
    return True


def left_change(row: Mapping[str, Any]) -> dict[str, Any]:
    """The change that says a membership no longer exists."""
    return change_record(
        "membership",
        state=LEFT,
        version=row["version"],
        contact_id=row["contact_id"],
        group_id=row["group_id"],
        method=row["method"],
    )


async def leave(conn: asyncpg.Connection, contact_id: int, group_id: int) -> bool:
    row = await conn.fetchrow(QUERIES["leave"], contact_id, group_id)
    if row is None:
        return False
    await publish(conn, [left_change(row)])
    return True


async def set_black(conn: asyncpg.Connection, contact_id: int, black: bool) -> bool:
    """F-14: the per-contact black flag; returns whether it changed."""
    row = await conn.fetchrow(QUERIES["set-black"], contact_id, black)
    if row is None:
        return False
    await publish(
        conn,
        [
            change_record(
                "contact_black",
                state="black" if black else "cleared",
                version=row["version"],
                contact_id=contact_id,
                email=row["email"],
                method="system",
            )
        ],
    )
    return True


async def suppress_address(conn: asyncpg.Connection, email: str, reason: str, source: str) -> bool:
    """F-15: bounced, complained or invalid; returns whether it changed."""
    row = await conn.fetchrow(QUERIES["suppress-address"], email, reason, source)
    if row is None:
        return False
    await publish(conn, [await _address_change(conn, row["email"], reason, row["version"])])
    return True


async def clear_bounce(conn: asyncpg.Connection, email: str) -> None:
    """An operator lifts ``bounced`` (only that: complaints stay)."""
    row = await conn.fetchrow(QUERIES["clear-bounce"], email)
    if row is None:
        existing = await conn.fetchrow(QUERIES["address-suppression"], email)
        if existing is None:
            raise NotFound("this address is not suppressed")
        raise Forbidden(f"only a bounced address can be cleared; this one is {existing['reason']}")
    await publish(conn, [await _address_change(conn, row["email"], "cleared", row["version"])])


async def _address_change(
    conn: asyncpg.Connection, email: str, state: str, version: int
) -> dict[str, Any]:
    contact_id = await conn.fetchval(QUERIES["contacts-with-address"], email)
    return change_record(
        "address", state=state, version=version, contact_id=contact_id, email=email, method="system"
    )


async def blacklist_change(
    conn: asyncpg.Connection, rule: Mapping[str, Any], *, removed: bool
) -> None:
    version = await conn.fetchval("SELECT nextval('change_version')")
    await publish(
        conn,
        [
            change_record(
                "blacklist_rule",
                state="cleared" if removed else rule["match"],
                version=version,
                email=rule["value"],
                method="system",
            )
        ],
    )
