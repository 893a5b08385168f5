"""A database connection whose statements are planned again at every execution.

The ledger's statements join their input arrays to ``send_ledger``. PostgreSQL caches the
plan of a prepared statement (asyncpg prepares every query) and, after five executions,
may keep a generic plan made with the table's size *at that time*. The ledger starts a
campaign nearly empty and grows by a row per recipient: a plan cached at a few hundred rows
(sequential scan and hash join) was still used at 60,000 rows, 34 ms per group-commit cycle
instead of 3.5 ms, and 103 ms at 200,000 (measured on this machine kind); in the campaign
benchmark PostgreSQL then spent ~1 ms of CPU per message. Planning each execution with
``plan_cache_mode = force_custom_plan`` costs ~0.5 ms per cycle (~32 messages) and keeps
the cost flat.

The setting is a connection's own, not the shared pool's (Tayori's pools keep no session
state): :class:`ReplannedConnection` is one connection of the ledger's, opened on first use
and again after it was lost.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from libs.common import db

#: the server setting of connections (or transactions) that must not reuse generic plans.
CUSTOM_PLANS = {"plan_cache_mode": "force_custom_plan"}


async def replan_transaction(conn: asyncpg.Connection) -> None:
    """The rest of the caller's transaction plans its statements at every execution."""
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")


class ReplannedConnection:
    """One connection to ``dsn`` with ``schema`` first on the search path and
    :data:`CUSTOM_PLANS`, one statement at a time; callers retry transient errors, after
    which it reconnects."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def execute(self, query: str, *args: Any) -> str:
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                conn = await db.connect(self.dsn, self.schema, settings=CUSTOM_PLANS)
                self._conn = conn
            result: str = await conn.execute(query, *args)
            return result

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await close_or_drop(self._conn)
                self._conn = None


#: how long a connection may take to close politely before it is dropped.
CLOSE_SECONDS = 2.0


async def close_or_drop(conn: asyncpg.Connection) -> None:
    """Close ``conn``, or drop its socket when that fails or takes more than CLOSE_SECONDS
    (the server is away: a stop must not wait for it)."""
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await conn.close()
    except Exception:  # whatever went wrong, the connection is of no more use
        conn.terminate()
