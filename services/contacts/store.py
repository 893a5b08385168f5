"""The contacts service's state changes, each inside the caller's transaction.

Every change that others must see is queued in the outbox in the same transaction:
``contacts.changelog`` for the contact, ``suppression.commands`` for joins and leaves.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.db import Queries
from libs.common.errors import InvalidMessage, NotFound
from libs.common.topics import Topic
from services.contacts.models import FieldDefinition
from services.contacts.processor import ContactPatch, changelog_value

QUERIES = Queries(Path(__file__).with_name("queries.sql"))
MODES = ("insert_or_update", "update_only", "insert_only")


class FieldCache:
    """Custom field definitions, re-read at most every few seconds (replicas add fields too)."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._fields: dict[str, FieldDefinition] = {}
        self._loaded = 0.0

    async def get(self, conn: asyncpg.Connection, *, fresh: bool = False) -> dict[str, FieldDefinition]:
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
        conn, Topic.CONTACTS_CHANGELOG, row["id"],
        changelog_value(row, row["id"], version=row["version"], changed_at=row["updated_at"]),
    )


async def publish_contacts(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
    await outbox.add_many(conn, [
        (Topic.CONTACTS_CHANGELOG, row["id"],
         changelog_value(row, row["id"], version=row["version"], changed_at=row["updated_at"]))
        for row in rows
    ])


async def publish_deleted(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
    now = dt.datetime.now(dt.UTC)
    await outbox.add_many(conn, [
        (Topic.CONTACTS_CHANGELOG, r["id"], changelog_value(None, r["id"], version=r["version"] + 1,
                                                           changed_at=now))
        for r in rows
    ])


async def _owner(conn: asyncpg.Connection, column: str, value: str) -> int | None:
    query = "contact-id-by-email" if column == "email" else "contact-id-by-external-id"
    return await conn.fetchval(QUERIES[query], value)


async def upsert(
    conn: asyncpg.Connection, patch: ContactPatch, *, key: str = "email",
    mode: str = "insert_or_update",
) -> tuple[str, asyncpg.Record | None]:
    """Create or update the contact ``patch`` names by ``key`` (email or external_id).

    Returns (effect, row): effect is inserted, updated or skipped (mode forbade it).
    A change that would take another contact's email or external_id is refused.
    """
    key_value = patch.columns.get(key)
    if not key_value:
        raise InvalidMessage(f"{key} is required to find the contact", field=key)
    lookup = "contact-by-email-for-update" if key == "email" else "contact-by-external-id-for-update"
    existing = await conn.fetchrow(QUERIES[lookup], key_value)
    if existing is None and key == "external_id" and patch.email:
        # The upstream key is new but the address is known: adopt that contact, unless
        # it already carries another upstream key.
        by_email = await conn.fetchrow(QUERIES["contact-by-email-for-update"], patch.email)
        if by_email is not None:
            if by_email["external_id"] not in (None, key_value):
                raise InvalidMessage(
                    f"email already belongs to the contact with external_id {by_email['external_id']!r}",
                    field="email",
                )
            existing = by_email
    if existing is None:
        if mode == "update_only":
            return "skipped", None
        if not patch.email:
            raise InvalidMessage("email is required to create a contact", field="email")
        return "inserted", await insert(conn, patch)
    if mode == "insert_only":
        return "skipped", existing
    return "updated", await update(conn, existing, patch)


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


async def update(conn: asyncpg.Connection, existing: asyncpg.Record, patch: ContactPatch) -> asyncpg.Record:
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


async def update_by_id(conn: asyncpg.Connection, contact_id: int, patch: ContactPatch) -> asyncpg.Record:
    existing = await conn.fetchrow(QUERIES["contact-by-id-for-update"], contact_id)
    if existing is None:
        raise NotFound(f"contact {contact_id} does not exist")
    return await update(conn, existing, patch)


async def delete(conn: asyncpg.Connection, contact_ids: list[int]) -> list[int]:
    rows = await conn.fetch(QUERIES["bulk-delete"], contact_ids)
    await publish_deleted(conn, rows)
    return [r["id"] for r in rows]


async def find_id(conn: asyncpg.Connection, *, external_id: str | None, email: str | None) -> int | None:
    if external_id:
        found = await _owner(conn, "external_id", external_id)
        if found is not None or not email:
            return found
    return await _owner(conn, "email", email) if email else None


async def join(
    conn: asyncpg.Connection, contact_id: int, group_id: int, *, auto_stop: bool = False,
    method: str = "system", actor: str = "operator",
) -> asyncpg.Record | None:
    """Add a membership (F-10) and ask suppression to own its state. Idempotent."""
    group = await conn.fetchrow(QUERIES["group-by-id"], group_id)
    if group is None:
        raise NotFound(f"group or plan {group_id} does not exist")
    state = "unsubscribed" if auto_stop else "deliverable"
    method = "auto_stop" if auto_stop else method
    row = await conn.fetchrow(QUERIES["join-membership"], contact_id, group_id, state, method)
    if row is not None:
        email = await conn.fetchval("SELECT email FROM contact WHERE id = $1", contact_id)
        await outbox.add(conn, Topic.SUPPRESSION_COMMANDS, contact_id, {
            "command_id": str(uuid.uuid4()), "type": "Join", "contact_id": contact_id,
            "email": email, "group_id": group_id, "state": state, "method": method,
            "actor": actor, "campaign_id": None, "issued_at": row["joined_at"],
        })
    return row
