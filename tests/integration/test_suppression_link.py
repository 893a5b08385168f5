"""The unsubscribe link's one-statement path (store.unsubscribe_by_link) against the full
transaction it stands in for: the same record on suppression.changes, the same decisions,
the cases it hands over; its Avro tail written by PostgreSQL exactly as fastavro writes it;
and the relay that publishes what it queued without a NOTIFY.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import random
from typing import Any

import fastavro
import pytest

from libs.common import avro, avrocodec, db, outbox
from libs.common.errors import NotFound
from libs.common.outbox import OutboxRelay
from libs.common.topics import Topic
from services.suppression import store
from tests.conftest import eventually


async def _pool(database: str) -> Any:
    return await db.create_pool(database, "suppression", size=3)


async def _member(pool: Any, contact_id: int, group_id: int, state: str = "deliverable") -> None:
    await pool.execute(
        "INSERT INTO membership (contact_id, group_id, state, method)"
        " VALUES ($1, $2, $3, 'system')",
        contact_id,
        group_id,
        state,
    )


async def _queued(pool: Any) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT topic, key, payload, schema_version FROM outbox ORDER BY id")
    return [
        {
            "topic": r["topic"],
            "key": r["key"],
            "version_header": r["schema_version"],
            **avro.decode(
                Topic.SUPPRESSION_CHANGES,
                r["payload"],
                [(avro.VERSION_HEADER, str(r["schema_version"]).encode())],
            ),
        }
        for r in rows
    ]


def _fastavro_long(value: int) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, "long", value)
    return buffer.getvalue()


async def test_avro_long_in_sql_is_fastavros(database: str) -> None:
    values = [0, 1, -1, 63, 64, -64, -65, 127, 128, 8191, 8192, 2**31, 2**53 + 1]
    values += [2**62, 2**63 - 1, -(2**63), 1_764_170_000_123, 987_654_321]
    pool = await _pool(database)
    try:
        for value in values:
            assert await pool.fetchval("SELECT avro_long($1)", value) == _fastavro_long(value)
        millis = {"type": "long", "logicalType": "timestamp-millis"}
        for at in (
            dt.datetime(2026, 11, 26, 15, 4, 5, 999_999, tzinfo=dt.UTC),
            dt.datetime(2026, 11, 26, 15, 4, 5, 1_000, tzinfo=dt.UTC),
            dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            dt.datetime(2038, 1, 19, 3, 14, 8, 500, tzinfo=dt.UTC),
        ):
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, millis, at)
            assert await pool.fetchval("SELECT avro_timestamp_millis($1)", at) == buffer.getvalue()
    finally:
        await pool.close()


async def test_avro_tail_in_sql_is_the_compiled_codecs(database: str) -> None:
    """avro_long and avro_timestamp_millis (migration 0002) write what libs/common/avrocodec
    writes for the same long or moment, so the Avro encoder in SQL cannot drift from the one
    every topic uses."""
    write_long = avrocodec.compile_writer("long")
    write_millis = avrocodec.compile_writer({"type": "long", "logicalType": "timestamp-millis"})
    assert write_long is not None and write_millis is not None
    rng = random.Random(2)
    longs = [0, 1, -1, 63, 64, -64, -65, 8191, 8192, 16383, 16384, 2**63 - 1, -(2**63)]
    longs += [rng.randrange(-(2**bits), 2**bits) for bits in range(1, 64) for _ in range(8)]
    moments = [
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        + dt.timedelta(microseconds=rng.randrange(-(2**51), 2**53))
        for _ in range(300)
    ]
    moments += [dt.datetime.now(dt.UTC), dt.datetime(2026, 12, 4, 18, 0, 0, 999_999, tzinfo=dt.UTC)]
    pool = await _pool(database)
    try:
        in_sql = await pool.fetch("SELECT avro_long(n) AS n FROM unnest($1::bigint[]) n", longs)
        assert [r["n"] for r in in_sql] == [write_long(n) for n in longs]
        in_sql = await pool.fetch(
            "SELECT avro_timestamp_millis(at) AS at FROM unnest($1::timestamptz[]) at", moments
        )
        assert [r["at"] for r in in_sql] == [write_millis(at) for at in moments]
    finally:
        await pool.close()


async def test_the_links_record_is_the_compiled_codecs(database: str) -> None:
    """The record the link's statement queues (Python's head, SQL's tail) is byte for byte
    what the compiled codec writes for the record it decodes to."""
    write = avrocodec.compile_writer(avro.current_schema(Topic.SUPPRESSION_CHANGES.value)[1])
    assert write is not None
    pool = await _pool(database)
    try:
        for contact_id in (9, 300, 2**40):
            await _member(pool, contact_id, 1)
            async with pool.acquire() as conn:
                assert await store.unsubscribe_by_link(conn, contact_id, 1, campaign_id="c") is True
        payloads = [
            r["payload"] for r in await pool.fetch("SELECT payload FROM outbox ORDER BY id")
        ]
        assert len(payloads) == 3
        for payload in payloads:
            assert write(avro.decode(Topic.SUPPRESSION_CHANGES, payload)) == payload
    finally:
        await pool.close()


async def test_link_queues_the_record_the_full_transaction_would(database: str) -> None:
    pool = await _pool(database)
    try:
        await _member(pool, 5, 1)
        await _member(pool, 6, 1)
        async with pool.acquire() as conn:
            assert await store.unsubscribe_by_link(conn, 5, 1, campaign_id="camp-a") is True
        async with pool.acquire() as conn, conn.transaction():
            transition, _ = await store.change_state(
                conn, 6, 1, "unsubscribed", actor="reader", method="form", campaign_id="camp-a"
            )
        assert transition.changes
        one, full = await _queued(pool)
        for change, contact_id in ((one, 5), (full, 6)):
            row = await pool.fetchrow(
                "SELECT * FROM membership WHERE contact_id = $1 AND group_id = 1", contact_id
            )
            assert (row["state"], row["method"], row["campaign_id"]) == (
                "unsubscribed",
                "form",
                "camp-a",
            )
            # changed_at as fastavro writes the row's: whole milliseconds
            changed_at = row["changed_at"].replace(
                microsecond=row["changed_at"].microsecond // 1000 * 1000
            )
            assert change["changed_at"] == changed_at
            assert change["version"] == row["version"]
            assert change["key"] == str(contact_id)
        ignore = {"change_id", "contact_id", "key", "changed_at", "version"}
        assert {k: v for k, v in one.items() if k not in ignore} == {
            k: v for k, v in full.items() if k not in ignore
        }
        assert one["change_id"] != full["change_id"]
    finally:
        await pool.close()


async def test_link_decisions_and_what_it_hands_over(database: str) -> None:
    pool = await _pool(database)
    try:
        await _member(pool, 7, 1, "unsubscribed")
        await _member(pool, 7, 2, "banned")
        await _member(pool, 8, 1)
        await _member(pool, 8, 2)
        async with pool.acquire() as conn:
            # stopped already, or banned: nothing to do, nothing queued
            assert await store.unsubscribe_by_link(conn, 7, 1, campaign_id=None) is False
            assert await store.unsubscribe_by_link(conn, 7, 2, campaign_id=None) is False
            with pytest.raises(NotFound):
                await store.unsubscribe_by_link(conn, 7, 3, campaign_id=None)
            assert await _queued(pool) == []

            # The unsubscribe switch on: the change propagates, so it is not for one statement.
            await conn.execute("UPDATE sync_policy SET unsubscribe = true")
            assert await store.unsubscribe_by_link(conn, 8, 1, campaign_id=None) is None
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM membership"
                    " WHERE contact_id = 8 AND state <> 'deliverable'"
                )
                == 0
            )
            assert await _queued(pool) == []
            await conn.execute("UPDATE sync_policy SET unsubscribe = false")

        # A concurrent change holding the row: the statement waits for it, then finds the
        # row no longer deliverable and hands over (the full transaction decides again).
        async with pool.acquire() as other, other.transaction():
            await other.execute(
                "UPDATE membership SET state = 'banned' WHERE contact_id = 8 AND group_id = 1"
            )

            async def link() -> bool | None:
                async with pool.acquire() as conn:
                    return await store.unsubscribe_by_link(conn, 8, 1, campaign_id=None)

            waiting = asyncio.ensure_future(link())
            await eventually(lambda: _waiting_for_lock(pool))
        assert await waiting is None
        assert await _queued(pool) == []
    finally:
        await pool.close()


async def _waiting_for_lock(pool: Any) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
    )


async def test_a_relay_that_does_not_lead_passes_its_wake_up_on(
    database: str, kafka, monkeypatch
) -> None:
    # No poll to fall back on: only wake-ups can get the change published.
    monkeypatch.setattr(outbox, "POLL_SECONDS", 3600.0)
    pool = await _pool(database)
    leader = OutboxRelay(pool, kafka.publisher, "suppression", dsn=database)
    other = OutboxRelay(pool, kafka.publisher, "suppression", dsn=database)  # another replica's
    tasks = [asyncio.ensure_future(leader.run())]
    try:
        await eventually(lambda: _lead_taken(pool))
        tasks.append(asyncio.ensure_future(other.run()))
        await _member(pool, 9, 1)
        await _member(pool, 10, 1)
        await asyncio.sleep(0.2)  # both wait for a wake-up
        async with pool.acquire() as conn:
            assert await store.unsubscribe_by_link(conn, 9, 1, campaign_id="c") is True
        other.wake()  # the change was queued by the replica that does not lead
        await eventually(lambda: _empty(pool))
        async with pool.acquire() as conn:
            assert await store.unsubscribe_by_link(conn, 10, 1, campaign_id="c") is True
        leader.wake()
        await eventually(lambda: _empty(pool))

        def both(records: list[dict[str, Any]]) -> bool:
            return {r["contact_id"] for r in records} >= {9, 10}

        records = await kafka.read(Topic.SUPPRESSION_CHANGES, until=both)
        assert sorted((r["contact_id"], r["state"], r["method"]) for r in records) == [
            (9, "unsubscribed", "form"),
            (10, "unsubscribed", "form"),
        ]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Neither left its lock or its LISTEN on a pooled connection.
        assert not await _lead_taken(pool)
        await pool.close()


async def _lead_taken(pool: Any) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    )


async def _empty(pool: Any) -> bool:
    return await pool.fetchval("SELECT count(*) FROM outbox") == 0
