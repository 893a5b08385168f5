"""Outages for one test, without stopping the servers the session's tests share.

- :func:`database_away`: this test's database refuses new connections (``ALLOW_CONNECTIONS
  false``: asyncpg raises ObjectNotInPrerequisiteStateError, which errors.classify calls
  transient) and every connection it had is terminated, as when PostgreSQL restarts or
  fails over; the other tests' databases on the same server are not touched.
- :class:`OwnBroker`: a broker of this test's own, which it may restart: like the
  embedded one in dev, it comes back empty, and its topics are created again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from libs.common.kafka import ensure_topics
from tayori.embedded import EmbeddedBroker, free_port
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


class OwnBroker:
    """A broker for one test (``stack`` is the session's stack with it in place)."""

    def __init__(self, stack: Stack, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.broker = EmbeddedBroker(self.port, log_path=log_path)
        self.stack = dataclasses.replace(stack, broker=self.broker)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def stop(self) -> None:
        """The broker is gone (connections refused), with everything it held."""
        self.broker.stop()

    async def start_again(self, prefix: str) -> None:
        """Back on the same port, empty; the operator creates the topics again."""
        self.broker = EmbeddedBroker(self.port, log_path=self.log_path)
        self.stack.broker = self.broker
        await ensure_topics(self.bootstrap, prefix, partitions=2)
