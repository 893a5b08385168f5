"""The scheduler's migrations give the schema its code expects: every named query prepares."""

from __future__ import annotations

import asyncpg

from libs.common import db
from services.scheduler.app import MIGRATIONS, SCHEMA
from services.scheduler.store import QUERIES
from tests.conftest import Stack


async def test_scheduler_migrations_apply_once_and_every_query_prepares(stack: Stack) -> None:
    dsn = await stack.postgres.create_database("t_scheduler_migrations")
    first = await db.migrate(dsn, SCHEMA, MIGRATIONS)
    assert first == [p.name for _, _, p in db.migration_files(MIGRATIONS)]
    assert await db.migrate(dsn, SCHEMA, MIGRATIONS) == []
    conn = await db.connect(dsn, SCHEMA)
    try:
        for name in QUERIES:
            try:
                await conn.prepare(QUERIES[name])
            except asyncpg.PostgresError as exc:  # pragma: no cover - the failure message
                raise AssertionError(f"query {name!r} does not fit the schema: {exc}") from exc
    finally:
        await conn.close()
