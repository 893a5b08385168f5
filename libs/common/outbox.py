"""The transactional outbox: publish to Kafka exactly what a transaction committed.

A service that changes state and must tell others writes the message into its own
``outbox`` table *in the same transaction* (:func:`add`). The relay (:class:`OutboxRelay`)
publishes committed rows in id order and deletes them once the broker acknowledged them.
A crash between publish and delete publishes a row twice — consumers are idempotent — but
never loses one, and never publishes a change that was rolled back.

One relay per schema publishes at a time, so rows for one key keep their order across
replicas: the leader holds a session advisory lock on a connection of its own while it runs
(:meth:`OutboxRelay.publish_once`, for shutdown and tests, takes it for one transaction).
``NOTIFY`` wakes the relays at commit; a writer that queues rows without one (a single
statement on the unsubscribe link's hot path) wakes its own process's relay instead.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable
from typing import Any

import asyncpg

from libs.common import avro, db, trace
from libs.common.aio import woken
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
);
-- the trace the row was written in (libs/common/trace), its Kafka header when published
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text
"""

# One round trip: the rows, and the NOTIFY that wakes the relay when they commit.
_INSERT = (
    "WITH queued AS (INSERT INTO outbox (topic, key, payload, schema_version, traceparent)"
    " SELECT *, $5::text FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int[])"
    " RETURNING 1)"
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
    await add_rows(conn, [row(topic, key, value) for topic, key, value in messages])


async def add_rows(
    conn: asyncpg.Connection, rows: list[tuple[str, str | None, bytes, int]]
) -> None:
    """Queue messages encoded already (:func:`row`) in the caller's transaction, in the
    current trace (their records carry it)."""
    if not rows:
        return
    topics, keys, payloads, versions = (list(col) for col in zip(*rows, strict=True))
    await conn.execute(_INSERT, topics, keys, payloads, versions, trace.current())


#: how often an idle relay looks for rows nobody woke it for (a lost wake-up, a crash), and
#: a relay that is not the leader tries to become it.
POLL_SECONDS = 1.0

# One round trip: the transaction's lock, and the rows if it got it.
_LOCK_AND_READ = (
    "WITH lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock($1) AS held)"
    " SELECT lock.held, o.id, o.topic, o.key, o.payload, o.schema_version, o.traceparent"
    " FROM lock"
    " LEFT JOIN LATERAL (SELECT * FROM outbox WHERE lock.held ORDER BY id LIMIT $2) o ON true"
    " ORDER BY o.id"
)
# The leader's round: delete what it published last round, read the next rows (the read sees
# the statement's snapshot, from before the delete, hence the filter).
_DELETE_AND_READ = (
    "WITH published AS (DELETE FROM outbox WHERE id = ANY($1::bigint[]))"
    " SELECT id, topic, key, payload, schema_version, traceparent FROM outbox"
    " WHERE id <> ALL($1::bigint[]) ORDER BY id LIMIT $2"
)
_DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"


class OutboxRelay:
    """Publishes the outbox of one schema until cancelled.

    One relay per schema leads (a session advisory lock on its own connection) and publishes
    in rounds of one statement each: delete the rows the last round published, read the
    next. The others wait to take over, and pass on what wakes them (below) with a NOTIFY.
    A relay wakes on ``NOTIFY`` at commit (:func:`add`), on :meth:`wake` from a writer in
    this process that queued rows without one, and every ``POLL_SECONDS``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: Publisher,
        schema: str,
        *,
        dsn: str,
        batch: int = 5000,
    ) -> None:
        self.pool = pool
        self.dsn = dsn
        self.publisher = publisher
        self.schema = schema
        self.batch = batch
        self._wake = asyncio.Event()
        self._woken_here = False
        self._lock_key = zlib.crc32(f"outbox:{schema}".encode())
        self._channel = f"{schema}_outbox"

    async def run(self) -> None:
        """Lead or wait to lead, on a connection of its own (not the pool's: a lost pool
        connection is handed back to the pool under its holder). A lost connection ends
        the run with a transient error; the runtime starts it again, and what was
        published but not deleted goes out a second time."""
        conn = await db.connect(self.dsn, self.schema)
        published: list[int] = []
        try:
            await conn.add_listener(self._channel, self._notified)
            leading = False
            while True:
                # Cleared before reading: a commit notified meanwhile is not lost.
                self._wake.clear()
                woken_here, self._woken_here = self._woken_here, False
                if not leading:
                    leading = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key)
                if not leading:
                    if woken_here:  # the leader, elsewhere, knows nothing of these rows
                        await conn.execute("SELECT pg_notify($1, '')", self._channel)
                    await self._idle()
                    continue
                rows = await conn.fetch(_DELETE_AND_READ, published, self.batch)
                published = []
                if rows:
                    await self._send(rows)
                    published = [r["id"] for r in rows]
                else:
                    OUTBOX_BACKLOG.labels(self.publisher.settings.service).set(0)
                    await self._idle()
        finally:
            await self._leave(conn, published)

    async def _idle(self) -> None:
        await woken(self._wake, POLL_SECONDS)

    async def _leave(self, conn: asyncpg.Connection, published: list[int]) -> None:
        """Delete what was published and close the connection, which gives up the lead
        and the channel server-side; a connection left mid-statement (cancelled) or lost
        is terminated instead (what was published and not deleted goes out again)."""
        try:
            async with asyncio.timeout(5):
                if published:
                    await conn.execute(_DELETE, published)
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    def wake(self) -> None:
        """Publish soon: a writer in this process committed rows without a NOTIFY."""
        self._woken_here = True
        self._wake.set()

    async def _send(self, rows: list[asyncpg.Record]) -> None:
        """Publish ``rows`` in id order and wait for the broker's acknowledgements."""
        by_topic: dict[str, list[tuple[str | None, bytes, list[tuple[str, bytes]]]]] = {}
        for row in rows:
            headers = [(avro.VERSION_HEADER, str(row["schema_version"]).encode())]
            if row["traceparent"] is not None:
                headers.append((trace.HEADER, row["traceparent"].encode()))
            by_topic.setdefault(row["topic"], []).append((row["key"], row["payload"], headers))
        futures = []
        for topic, records in by_topic.items():
            futures += await self.publisher.send_encoded(Topic(topic), records)
        await asyncio.gather(*futures)

    async def publish_once(self) -> int:
        """Publish and delete up to one batch of rows, unless another relay holds the lock;
        returns how many (graceful shutdown, tests)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_LOCK_AND_READ, self._lock_key, self.batch)
            if not rows[0]["held"] or rows[0]["id"] is None:
                return 0
            await self._send(rows)
            # By id, not by range: a transaction that took a lower id may commit later.
            await conn.execute(_DELETE, [r["id"] for r in rows])
            return len(rows)

    async def drain(self) -> None:
        """Publish everything committed so far (graceful shutdown, tests)."""
        while await self.publish_once():
            pass
