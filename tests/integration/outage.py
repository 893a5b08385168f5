"""Outages for one test, without stopping the servers the session's tests share.

:func:`database_away`: this test's database refuses new connections (``ALLOW_CONNECTIONS
false``: asyncpg raises ObjectNotInPrerequisiteStateError, which errors.classify calls
transient) and every connection it had is terminated, as when PostgreSQL restarts or fails
over; the other tests' databases on the same server are not touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from tests.conftest import Stack


def database_name(dsn: str) -> str:
    """The database a DSN of the embedded server names (``…/<name>?host=…``)."""
    return dsn.split("?", 1)[0].rsplit("/", 1)[1]


class DatabaseOutage:
    """Take one database away and bring it back."""

    def __init__(self, stack: Stack, dsn: str) -> None:
        self.stack = stack
        self.name = database_name(dsn)

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.stack.postgres.dsn())
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def begin(self) -> None:
        """New connections are refused; the open ones are terminated."""
        await self._admin(
            f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{self.name}' AND pid <> pg_backend_pid()",
        )

    async def end(self) -> None:
        await self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@contextlib.asynccontextmanager
async def database_away(stack: Stack, dsn: str) -> AsyncIterator[DatabaseOutage]:
    """The database of ``dsn`` is away inside the block and back after it."""
    outage = DatabaseOutage(stack, dsn)
    await outage.begin()
    try:
        yield outage
    finally:
        await outage.end()
