"""Migrations give the schema the code expects: every named query prepares against it."""

from __future__ import annotations

import asyncpg

from libs.common import db
from services.contacts.app import MIGRATIONS, SCHEMA
from services.contacts.store import QUERIES
from tests.conftest import Stack


async def test_migrations_apply_once_and_every_query_prepares(stack: Stack) -> None:
    dsn = await stack.postgres.create_database("t_migrations_fresh")
    first = await db.migrate(dsn, SCHEMA, MIGRATIONS)
    assert first == [p.name for _, _, p in db.migration_files(MIGRATIONS)]
    assert await db.migrate(dsn, SCHEMA, MIGRATIONS) == []  # applying again changes nothing

    conn = await db.connect(dsn, SCHEMA)
    try:
        recorded = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in recorded] == list(range(1, len(first) + 1))
        for name in QUERIES:
            try:
                await conn.prepare(QUERIES[name])
            except asyncpg.PostgresError as exc:  # pragma: no cover - the failure message
                raise AssertionError(f"query {name!r} does not fit the schema: {exc}") from exc
        outbox_columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = 'outbox'",
            SCHEMA,
        )
        assert {r["column_name"] for r in outbox_columns} >= {"id", "topic", "key", "payload"}
    finally:
        await conn.close()
