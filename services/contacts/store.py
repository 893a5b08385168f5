"""The contacts service's state changes, each inside the caller's transaction.

Every change that others must see is queued in the outbox in the same transaction:
``contacts.changelog`` for the contact, ``suppression.commands`` for joins and leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from libs.common import outbox
from libs.common.db import Queries
from libs.common.errors import InvalidMessage, NotFound
from libs.common.mail.states import ChangeMethod, MembershipState
from libs.common.topics import Topic
from services.contacts.models import WRITABLE, FieldDefinition
from services.contacts.processor import ContactPatch, changelog_value

QUERIES = Queries(Path(__file__).with_name("queries.sql"))
MODES = ("insert_or_update", "update_only", "insert_only")
T = TypeVar("T")


class FieldCache:
    """Custom field definitions, re-read at most every few seconds (replicas add fields too)."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._fields: dict[str, FieldDefinition] = {}
        self._loaded = 0.0

    async def get(
        self, conn: asyncpg.Connection, *, fresh: bool = False
    ) -> dict[str, FieldDefinition]:
        if fresh or time.monotonic() - self._loaded > self.ttl:
            rows = await conn.fetch(QUERIES["field-definitions"])
            self._fields = {
                r["key"]: FieldDefinition(r["key"], r["label"], r["type"], tuple(r["choices"]))
                for r in rows
            }
            self._loaded = time.monotonic()
        return self._fields

    def invalidate(self) -> None:
        self._loaded = 0.0


async def publish_contact(conn: asyncpg.Connection, row: asyncpg.Record) -> None:
    await outbox.add(
        conn,
        Topic.CONTACTS_CHANGELOG,
        row["id"],
        changelog_value(row, row["id"], version=row["version"], changed_at=row["updated_at"]),
    )


async def publish_contacts(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
    await outbox.add_rows(conn, _changelog_rows(rows))


def _changelog_rows(rows: list[asyncpg.Record]) -> list[tuple[str, str | None, bytes, int]]:
    """The outbox rows of the contacts.changelog records of ``rows`` (contacts as written)."""
    return [
        outbox.row(
            Topic.CONTACTS_CHANGELOG,
            row["id"],
            changelog_value(row, row["id"], version=row["version"], changed_at=row["updated_at"]),
        )
        for row in rows
    ]


async def publish_deleted(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
    now = dt.datetime.now(dt.UTC)
    await outbox.add_many(
        conn,
        [
            (
                Topic.CONTACTS_CHANGELOG,
                r["id"],
                changelog_value(None, r["id"], version=r["version"] + 1, changed_at=now),
            )
            for r in rows
        ],
    )


async def _owner(conn: asyncpg.Connection, column: str, value: str) -> int | None:
    query = "contact-id-by-email" if column == "email" else "contact-id-by-external-id"
    return await conn.fetchval(QUERIES[query], value)


async def upsert(
    conn: asyncpg.Connection,
    patch: ContactPatch,
    *,
    key: str = "email",
    mode: str = "insert_or_update",
) -> tuple[str, asyncpg.Record | None]:
    """Create or update the contact ``patch`` names by ``key`` (email or external_id).

    Returns (effect, row): effect is inserted, updated or skipped (mode forbade it).
    A change that would take another contact's email or external_id is refused
    with InvalidMessage, before anything is written.
    """
    (outcome,) = await upsert_run(conn, [patch], keys=key, mode=mode)
    if isinstance(outcome, InvalidMessage):
        raise outcome
    return outcome


async def insert(conn: asyncpg.Connection, patch: ContactPatch) -> asyncpg.Record:
    for column in ("email", "external_id"):
        value = patch.columns.get(column)
        if value and await _owner(conn, column, value) is not None:
            raise InvalidMessage(f"a contact with this {column} already exists", field=column)
    columns = list(patch.columns)
    values = [patch.columns[c] for c in columns]
    columns.append("custom")
    values.append(patch.custom_set)
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    sql = f"INSERT INTO contact ({', '.join(columns)}) VALUES ({placeholders}) RETURNING *"
    row = await conn.fetchrow(sql, *values)
    await publish_contact(conn, row)
    return row


async def update(
    conn: asyncpg.Connection, existing: asyncpg.Record, patch: ContactPatch
) -> asyncpg.Record:
    for column in ("email", "external_id"):
        value = patch.columns.get(column)
        if value and value != existing[column]:
            owner = await _owner(conn, column, value)
            if owner is not None and owner != existing["id"]:
                raise InvalidMessage(f"another contact already has this {column}", field=column)
    sets = []
    values: list[Any] = [existing["id"]]
    for column, value in patch.columns.items():
        values.append(value)
        sets.append(f"{column} = ${len(values)}")
    if patch.custom_set or patch.custom_clear:
        values.append(patch.custom_set)
        values.append(patch.custom_clear)
        sets.append(f"custom = (custom || ${len(values) - 1}::jsonb) - ${len(values)}::text[]")
    sets.append("version = version + 1")
    sets.append("updated_at = now()")
    sql = f"UPDATE contact SET {', '.join(sets)} WHERE id = $1 RETURNING *"
    row = await conn.fetchrow(sql, *values)
    await publish_contact(conn, row)
    return row


async def update_by_id(
    conn: asyncpg.Connection, contact_id: int, patch: ContactPatch
) -> asyncpg.Record:
    existing = await conn.fetchrow(QUERIES["contact-by-id-for-update"], contact_id)
    if existing is None:
        raise NotFound(f"contact {contact_id} does not exist")
    return await update(conn, existing, patch)


async def delete(conn: asyncpg.Connection, contact_ids: list[int]) -> list[int]:
    rows = await conn.fetch(QUERIES["bulk-delete"], contact_ids)
    await publish_deleted(conn, rows)
    return [r["id"] for r in rows]


async def find_id(
    conn: asyncpg.Connection, *, external_id: str | None, email: str | None
) -> int | None:
    if external_id:
        found = await _owner(conn, "external_id", external_id)
        if found is not None or not email:
            return found
    return await _owner(conn, "email", email) if email else None


async def leave(conn: asyncpg.Connection, contact_id: int, group_id: int) -> bool:
    """Remove a membership here and ask suppression to end it. Idempotent."""
    removed = await conn.fetchval(QUERIES["leave-membership"], contact_id, group_id)
    if removed is None:
        return False
    await outbox.add(
        conn,
        Topic.SUPPRESSION_COMMANDS,
        contact_id,
        {
            "command_id": str(uuid.uuid4()),
            "type": "Leave",
            "contact_id": contact_id,
            "email": None,
            "group_id": group_id,
            "state": None,
            "method": "system",
            "actor": "operator",
            "campaign_id": None,
            "issued_at": dt.datetime.now(dt.UTC),
        },
    )
    return True


async def join(
    conn: asyncpg.Connection,
    contact_id: int,
    group_id: int,
    *,
    auto_stop: bool = False,
    method: str = "system",
    actor: str = "operator",
) -> asyncpg.Record | None:
    """Add a membership (F-10) and ask suppression to own its state. Idempotent."""
    group = await conn.fetchrow(QUERIES["group-by-id"], group_id)
    if group is None:
        raise NotFound(f"group or plan {group_id} does not exist")
    state = (MembershipState.UNSUBSCRIBED if auto_stop else MembershipState.DELIVERABLE).value
    method = ChangeMethod.AUTO_STOP.value if auto_stop else method
    row = await conn.fetchrow(QUERIES["join-membership"], contact_id, group_id, state, method)
    if row is not None:
        email = await conn.fetchval("SELECT email FROM contact WHERE id = $1", contact_id)
        await outbox.add(
            conn,
            Topic.SUPPRESSION_COMMANDS,
            contact_id,
            {
                "command_id": str(uuid.uuid4()),
                "type": "Join",
                "contact_id": contact_id,
                "email": email,
                "group_id": group_id,
                "state": state,
                "method": method,
                "actor": actor,
                "campaign_id": None,
                "issued_at": row["joined_at"],
            },
        )
    return row


# Batches ---------------------------------------------------------------------------------


async def started(operation: Awaitable[T]) -> asyncio.Future[T]:
    """``operation`` as a task that has sent its statement, so the caller's CPU work until
    it awaits the task overlaps the database's. The connection is busy until then."""
    task = asyncio.ensure_future(operation)
    await asyncio.sleep(0)
    return task


#: new contacts are inserted this many at a time (see upsert_run)
INSERT_CHUNK = 500

#: the columns of insert-contacts' arrays, in its order: the writable fields but tags (tags
#: as JSON text and custom follow)
INSERT_COLUMNS = tuple(name for name in WRITABLE if name != "tags")


def _insert_row(patch: ContactPatch) -> tuple[Any, ...]:
    """A new contact's values for insert-contacts: an absent column is NULL (its default)."""
    get = patch.columns.get
    tags = get("tags")
    return (
        *[get(c) for c in INSERT_COLUMNS],
        None if tags is None else json.dumps(tags, ensure_ascii=False),
        patch.custom_set,
    )


def _patch_json(patch: ContactPatch) -> dict[str, Any]:
    body: dict[str, Any] = {
        k: (v.isoformat() if isinstance(v, dt.date) else v) for k, v in patch.columns.items()
    }
    if patch.custom_set:
        body["custom_set"] = patch.custom_set
    if patch.custom_clear:
        body["custom_clear"] = patch.custom_clear
    return body


def email_key(address: str) -> str:
    """An address's identity: its case does not matter (the SQL's lower(email); addresses
    are ASCII, see libs.common.mail.addresses)."""
    return address.lower()


def _identities(patch: ContactPatch) -> set[tuple[str, str]]:
    found = {(c, patch.columns[c]) for c in ("email", "external_id") if patch.columns.get(c)}
    return {(c, email_key(v) if c == "email" else v) for c, v in found}


class _ByAddress:
    """Locked contacts by address, case-insensitively; the exact spelling first (rows that
    collide by case may exist until an operator resolves them, see migration 0007)."""

    def __init__(self, rows: list[asyncpg.Record]) -> None:
        self._exact = {r["email"]: r for r in rows}
        self._key: dict[str, asyncpg.Record] = {}
        for r in rows:  # in id order: the oldest of a collision
            self._key.setdefault(email_key(r["email"]), r)

    def get(self, address: str) -> asyncpg.Record | None:
        return self._exact.get(address) or self._key.get(email_key(address))


def batch_runs(patches: list[ContactPatch]) -> list[list[int]]:
    """Split patches (in order) into runs in which no address or upstream key repeats,
    so each run can be applied with one statement per kind and keep the order's meaning."""
    runs: list[list[int]] = []
    seen: set[tuple[str, str]] = set()
    for i, patch in enumerate(patches):
        ids = _identities(patch)
        if not runs or ids & seen:
            runs.append([])
            seen = set()
        runs[-1].append(i)
        seen |= ids
    return runs


async def upsert_run(
    conn: asyncpg.Connection,
    patches: list[ContactPatch],
    *,
    keys: list[str] | str = "email",
    mode: str = "insert_or_update",
) -> list[tuple[str, asyncpg.Record | None] | InvalidMessage]:
    """:func:`upsert` for many patches whose identities do not repeat (see batch_runs).

    Decides every patch in Python against the locked rows it could touch, then writes with
    one INSERT and one UPDATE. Returns per patch (effect, row) or the InvalidMessage that
    refuses it; when any patch is refused nothing is written, so the caller can decide.
    """
    emails = [email_key(p.columns["email"]) for p in patches if p.columns.get("email")]
    external_ids = [p.columns["external_id"] for p in patches if p.columns.get("external_id")]
    locking = await started(conn.fetch(QUERIES["lock-identities"], emails, external_ids))
    try:
        inserted_rows = [_insert_row(p) for p in patches]  # meanwhile, for those it inserts
    finally:
        locked = await locking
    by_email = _ByAddress(locked)
    by_external = {r["external_id"]: r for r in locked if r["external_id"] is not None}

    outcomes: list[tuple[str, asyncpg.Record | None] | InvalidMessage] = []
    inserts: list[tuple[int, ContactPatch]] = []
    updates: list[tuple[int, int, ContactPatch]] = []
    for i, patch in enumerate(patches):
        key = keys if isinstance(keys, str) else keys[i]
        try:
            target = _target(patch, key, by_email, by_external)
        except InvalidMessage as exc:
            outcomes.append(exc)
            continue
        if target is None:
            if mode == "update_only":
                outcomes.append(("skipped", None))
            elif not patch.email:
                outcomes.append(
                    InvalidMessage("email is required to create a contact", field="email")
                )
            else:
                outcomes.append(("inserted", None))
                inserts.append((i, patch))
        elif mode == "insert_only":
            outcomes.append(("skipped", target))
        else:
            outcomes.append(("updated", None))
            updates.append((i, target["id"], _found_by(patch, key)))
    if any(isinstance(o, InvalidMessage) for o in outcomes):
        return outcomes
    changelog: list[tuple[str, str | None, bytes, int]] = []
    if inserts:
        # In chunks: Python encodes the changelog of one chunk while PostgreSQL inserts the
        # next (until now the insert, then the encoding, each waited for the other).
        rows: list[asyncpg.Record] = []
        for start in range(0, len(inserts), INSERT_CHUNK):
            chunk = inserts[start : start + INSERT_CHUNK]
            columns = [list(c) for c in zip(*(inserted_rows[i] for i, _ in chunk), strict=True)]
            inserting = await started(conn.fetch(QUERIES["insert-contacts"], *columns))
            try:
                changelog += _changelog_rows(rows)
            finally:
                rows = await inserting
            by_address = {r["email"]: r for r in rows}  # addresses are distinct within a run
            for i, patch in chunk:
                outcomes[i] = ("inserted", by_address[patch.columns["email"]])
        changelog += _changelog_rows(rows)
    if updates:
        rows = await conn.fetch(
            QUERIES["update-contacts"],
            [cid for _, cid, _ in updates],
            [_patch_json(p) for _, _, p in updates],
        )
        by_id = {r["id"]: r for r in rows}
        for i, contact_id, _ in updates:
            outcomes[i] = ("updated", by_id[contact_id])
        changelog += _changelog_rows(rows)
    await outbox.add_rows(conn, changelog)
    return outcomes


def _found_by(patch: ContactPatch, key: str) -> ContactPatch:
    """The update of a contact found by ``key``: an address that found it by identity leaves
    its spelling as it was typed (NORM@ in an event or a file does not respell Norm@)."""
    if key != "email":
        return patch
    columns = {c: v for c, v in patch.columns.items() if c != "email"}
    return dataclasses.replace(patch, columns=columns)


def _target(
    patch: ContactPatch, key: str, by_email: _ByAddress, by_external: dict[str, Any]
) -> Any:
    """The existing contact a patch applies to (None: a new one), or InvalidMessage."""
    key_value = patch.columns.get(key)
    if not key_value:
        raise InvalidMessage(f"{key} is required to find the contact", field=key)
    target = (by_email if key == "email" else by_external).get(key_value)
    if target is None and key == "external_id" and patch.email:
        adopt = by_email.get(patch.email)
        if adopt is not None:
            if adopt["external_id"] not in (None, key_value):
                owner = adopt["external_id"]
                raise InvalidMessage(
                    f"email already belongs to the contact with external_id {owner!r}",
                    field="email",
                )
            return adopt
    for column, index in (("email", by_email), ("external_id", by_external)):
        value = patch.columns.get(column)
        owner = index.get(value) if value else None
        if owner is not None and (target is None or owner["id"] != target["id"]):
            raise InvalidMessage(f"another contact already has this {column}", field=column)
    return target
