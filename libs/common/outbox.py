"""The transactional outbox: publish to Kafka exactly what a transaction committed.

A service that changes state and must tell others writes the message into its own
``outbox`` table *in the same transaction* (:func:`add`). The relay (:class:`OutboxRelay`)
publishes committed rows in id order and deletes them once the broker acknowledged them.
A crash between publish and delete publishes a row twice — consumers are idempotent — but
never loses one, and never publishes a change that was rolled back.

One relay per schema publishes at a time (a transaction-scoped advisory lock), so rows
for one key keep their order across replicas. ``NOTIFY`` wakes the relay at commit.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable
from typing import Any

import asyncpg

from libs.common import avro
from libs.common.kafka import Publisher
from libs.common.logging import get_logger
from libs.common.metrics import OUTBOX_BACKLOG
from libs.common.topics import Topic

log = get_logger(__name__)

DDL = """
CREATE TABLE IF NOT EXISTS outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    key text,
    payload bytea NOT NULL,
    schema_version int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

# One round trip: the rows, and the NOTIFY that wakes the relay when they commit.
_INSERT = (
    "WITH queued AS (INSERT INTO outbox (topic, key, payload, schema_version)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int[]) RETURNING 1)"
    " SELECT pg_notify(current_schema() || '_outbox', '') WHERE EXISTS (SELECT 1 FROM queued)"
)


def row(topic: Topic, key: Any, value: dict[str, Any]) -> tuple[str, str | None, bytes, int]:
    """The outbox row (topic, key, payload, schema_version) of one message: what
    :func:`add_many` inserts, for a statement that inserts outbox rows itself."""
    data, headers = avro.encode(topic, value)
    return topic.value, None if key is None else str(key), data, int(headers[0][1])


async def add(conn: asyncpg.Connection, topic: Topic, key: Any, value: dict[str, Any]) -> None:
    """Queue one message in the caller's transaction."""
    await add_many(conn, [(topic, key, value)])


async def add_many(
    conn: asyncpg.Connection, messages: Iterable[tuple[Topic, Any, dict[str, Any]]]
) -> None:
    """Queue many messages in the caller's transaction with one statement."""
    rows = [row(topic, key, value) for topic, key, value in messages]
    if not rows:
        return
    topics, keys, payloads, versions = (list(col) for col in zip(*rows, strict=True))
    await conn.execute(_INSERT, topics, keys, payloads, versions)


class OutboxRelay:
    """Publishes the outbox of one schema until cancelled."""

    def __init__(
        self, pool: asyncpg.Pool, publisher: Publisher, schema: str, *, batch: int = 5000
    ) -> None:
        self.pool = pool
        self.publisher = publisher
        self.schema = schema
        self.batch = batch
        self._wake = asyncio.Event()
        self._lock_key = zlib.crc32(f"outbox:{schema}".encode())

    async def run(self) -> None:
        listener = await self.pool.acquire()
        channel = f"{self.schema}_outbox"
        await listener.add_listener(channel, self._notified)
        try:
            while True:
                # Cleared before publishing: a commit notified meanwhile is not lost.
                self._wake.clear()
                published = await self.publish_once()
                if published < self.batch:
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                    except TimeoutError:
                        pass
        finally:
            await listener.remove_listener(channel, self._notified)
            await listener.execute("UNLISTEN *")  # the pool does not reset sessions
            await self.pool.release(listener)

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    async def publish_once(self) -> int:
        """Publish and delete up to one batch of rows; returns how many."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", self._lock_key):
                return 0
            rows = await conn.fetch(
                "SELECT id, topic, key, payload, schema_version FROM outbox ORDER BY id LIMIT $1",
                self.batch,
            )
            if not rows:
                OUTBOX_BACKLOG.labels(self.publisher.settings.service).set(0)
                return 0
            futures = []
            for row in rows:
                headers = [(avro.VERSION_HEADER, str(row["schema_version"]).encode())]
                futures.append(
                    await self.publisher.send_raw(
                        Topic(row["topic"]), row["key"], row["payload"], headers
                    )
                )
            await asyncio.gather(*futures)
            # By id, not by range: a transaction that took a lower id may commit later.
            await conn.execute(
                "DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
            OUTBOX_BACKLOG.labels(self.publisher.settings.service).set(
                max(0, len(rows) - self.batch)
            )
            return len(rows)

    async def drain(self) -> None:
        """Publish everything committed so far (graceful shutdown, tests)."""
        while await self.publish_once():
            pass
