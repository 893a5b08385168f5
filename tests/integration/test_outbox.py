"""The transactional outbox: committed changes are published in order, rolled back ones never."""

from __future__ import annotations

import datetime as dt

from libs.common import db, outbox
from libs.common.kafka import Publisher
from libs.common.outbox import OutboxRelay
from libs.common.topics import Topic
from tests.conftest import eventually


def _job(job_id: str, status: str) -> dict:
    now = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    return {
        "job_id": job_id,
        "kind": "import",
        "status": status,
        "service": "test",
        "title": "t",
        "requested_by": None,
        "total": None,
        "processed": 0,
        "succeeded": 0,
        "failed": 0,
        "errors": [],
        "detail": None,
        "created_at": now,
        "updated_at": now,
    }


async def test_outbox_publishes_committed_rows_in_order_and_never_rolled_back_ones(
    database: str, kafka
) -> None:
    pool = await db.create_pool(database, "contacts", size=2)
    relay = OutboxRelay(
        pool,
        Publisher(kafka.publisher.settings, kafka.publisher.producer),
        "contacts",
        dsn=database,
    )
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                await outbox.add_many(
                    conn,
                    [
                        (Topic.JOBS_EVENTS, "j1", _job("j1", s))
                        for s in ("queued", "running", "done")
                    ],
                )
            try:
                async with conn.transaction():
                    await outbox.add(conn, Topic.JOBS_EVENTS, "j2", _job("j2", "queued"))
                    raise RuntimeError("roll back")
            except RuntimeError:
                pass
        assert await relay.publish_once() == 3
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
        # A second relay finds nothing: each row is published once.
        assert await relay.publish_once() == 0

        records = await kafka.read(Topic.JOBS_EVENTS, until=lambda r: len(r) >= 3)
        assert [(r["job_id"], r["status"]) for r in records] == [
            ("j1", "queued"),
            ("j1", "running"),
            ("j1", "done"),
        ]

        # While one relay holds the lock, another publishes nothing (order across replicas).
        async with pool.acquire() as conn:
            await outbox.add(conn, Topic.JOBS_EVENTS, "j3", _job("j3", "queued"))
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", relay._lock_key)
                assert await relay.publish_once() == 0
        assert await relay.publish_once() == 1
        more = await kafka.read(Topic.JOBS_EVENTS, until=lambda r: len(r) >= 4)
        assert more[-1]["job_id"] == "j3"
        assert not [r for r in more if r["job_id"] == "j2"]
    finally:
        await pool.close()


async def test_relay_wakes_on_commit(database: str, kafka) -> None:
    import asyncio

    pool = await db.create_pool(database, "contacts", size=3)
    relay = OutboxRelay(pool, kafka.publisher, "contacts", dsn=database)
    task = asyncio.ensure_future(relay.run())
    try:
        await asyncio.sleep(0.2)
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, Topic.JOBS_EVENTS, "w", _job("w", "done"))
        await eventually(lambda: _empty(pool))
        records = await kafka.read(Topic.JOBS_EVENTS, until=lambda r: len(r) >= 1)
        assert records[0]["job_id"] == "w"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()


async def test_a_relay_woken_as_it_is_cancelled_stops(database: str, kafka, monkeypatch) -> None:
    """A service's stop cancels its idle relay; a commit's NOTIFY (or a wake) landing in the
    same loop step must not keep it going (the stop then waited for it forever)."""
    import asyncio

    monkeypatch.setattr(outbox, "POLL_SECONDS", 60.0)  # idle from its first round on
    pool = await db.create_pool(database, "contacts", size=2)
    relay = OutboxRelay(pool, kafka.publisher, "contacts", dsn=database)
    task = asyncio.ensure_future(relay.run())
    try:
        await eventually(lambda: _leading(pool, relay))
        await asyncio.sleep(0.2)  # its first round (nothing to publish) is over: it idles
        relay.wake()
        task.cancel()
        await asyncio.wait({task}, timeout=10)
        assert task.cancelled()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()


async def _leading(pool, relay: OutboxRelay) -> bool:
    return (
        await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::bigint::oid",
            relay._lock_key,
        )
        == 1
    )


async def _empty(pool) -> bool:
    return await pool.fetchval("SELECT count(*) FROM outbox") == 0
