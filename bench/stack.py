"""The embedded stack for the benchmarks: PostgreSQL (default durability) and a new broker.

PostgreSQL keeps its stock settings (fsync and synchronous_commit on), unlike the test
fixtures, in a data directory of its own under the run's temp directory. Every benchmark
gets its own broker process (the broker's memory never shrinks and its fetches slow as
partitions grow); search and snapshot share one loaded database (it takes a minute to load
and neither changes it). The service runs in this process exactly as the test fixtures
start it.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from libs.common import db
from libs.common.kafka import ensure_topics
from services.contacts.app import MIGRATIONS, SCHEMA
from services.contacts.models import FieldDefinition
from services.contacts.settings import ContactsSettings
from tayori.embedded import EmbeddedBroker, EmbeddedPostgres, free_port

ADMIN_TOKEN = "bench-admin-token"


@dataclass
class Stack:
    postgres: EmbeddedPostgres
    broker: EmbeddedBroker
    dsn: str
    prefix: str

    def settings(self, **overrides: Any) -> ContactsSettings:
        values: dict[str, Any] = dict(
            database_url=self.dsn,
            kafka_bootstrap=self.broker.bootstrap,
            topic_prefix=self.prefix,
            kafka_session_timeout_ms=1000,
            kafka_profile="embedded",
            kafka_fetch_max_wait_ms=20,
            http_host="127.0.0.1",
            http_port=0,
            admin_token=ADMIN_TOKEN,
        )
        values.update(overrides)
        return ContactsSettings(**values)

    async def connect(self) -> asyncpg.Connection:
        """A connection like the service's (search_path, json codecs)."""
        return await db.connect(self.dsn, SCHEMA)

    async def connect_plain(self) -> asyncpg.Connection:
        return await connect_plain(self.dsn)


@dataclass
class Database:
    postgres: EmbeddedPostgres
    dsn: str


@contextlib.asynccontextmanager
async def database(root: Path, name: str) -> AsyncIterator[Database]:
    """A new PostgreSQL in ``root/<name>-pg`` with the contacts schema migrated."""
    data_dir = root / f"{name}-pg"
    postgres = EmbeddedPostgres(data_dir)
    try:
        dsn = await postgres.create_database("tayori")
        await db.migrate(dsn, SCHEMA, MIGRATIONS)
        yield Database(postgres, dsn)
    finally:
        postgres.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def stack(root: Path, name: str, database: Database) -> AsyncIterator[Stack]:
    """A new broker with every topic created under a prefix of its own, beside ``database``."""
    broker = EmbeddedBroker(free_port(), log_path=root / f"{name}-broker.log")
    try:
        prefix = f"b{uuid.uuid4().hex[:8]}."
        await ensure_topics(broker.bootstrap, prefix)
        yield Stack(database.postgres, broker, database.dsn, prefix)
    finally:
        broker.stop()


async def connect_plain(dsn: str) -> asyncpg.Connection:
    """A connection without json codecs (COPY takes JSON text as it is)."""
    return await asyncpg.connect(dsn, server_settings={"search_path": f"{SCHEMA},public"})


async def define_fields(
    conn: asyncpg.Connection, fields: list[tuple[str, str, str, list[str]]]
) -> None:
    await conn.executemany(
        "INSERT INTO field_definition (key, label, type, choices) VALUES ($1, $2, $3, $4)", fields
    )


async def field_definitions(conn: asyncpg.Connection) -> dict[str, FieldDefinition]:
    rows = await conn.fetch("SELECT key, label, type, choices FROM field_definition")
    return {
        r["key"]: FieldDefinition(r["key"], r["label"], r["type"], tuple(r["choices"]))
        for r in rows
    }
