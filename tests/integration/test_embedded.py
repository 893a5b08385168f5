"""The embedded stack's restart helpers, which `tayori dev` and the fault-injection tests use:
``EmbeddedPostgres.stop_server()/start_server()`` (the same dsn works again, data kept, also
after a ``kill -9``) and ``EmbeddedBroker.restart()`` (the same port, an empty broker).

Each test runs its own server, not the session ``stack``, so the other tests never see it go.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from libs.common.kafka import ensure_topics
from libs.common.topics import Topic, all_topic_names, topic_name
from tayori.embedded import EmbeddedBroker, EmbeddedPostgres, free_port


@pytest.fixture
def postgres(pg_home: Path) -> Iterator[EmbeddedPostgres]:
    # Durable (not fast_unsafe): with synchronous_commit off a kill -9 loses the last commits.
    server = EmbeddedPostgres(pg_home / "pg")
    yield server
    server.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    server = EmbeddedBroker(free_port(), log_path=tmp_path / "broker.log")
    yield server
    server.stop()


async def _write_and_read(dsn: str, value: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (value text)")
        await conn.execute("INSERT INTO kept VALUES ($1)", value)
        return [r["value"] for r in await conn.fetch("SELECT value FROM kept ORDER BY value")]
    finally:
        await conn.close()


async def test_postgres_stop_and_start_keep_the_dsn_and_the_data(
    postgres: EmbeddedPostgres,
) -> None:
    dsn = await postgres.create_database("restart")
    assert await _write_and_read(dsn, "a") == ["a"]
    first = postgres.postmaster_pid()

    postgres.stop_server()
    assert not postgres.running()
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(dsn, timeout=5)
    postgres.stop_server()  # stopping a stopped server does nothing

    postgres.start_server()
    assert postgres.running()
    assert postgres.postmaster_pid() != first
    assert postgres.dsn("restart") == dsn
    assert await _write_and_read(dsn, "b") == ["a", "b"]
    postgres.start_server()  # starting a running server does nothing


async def test_postgres_start_server_after_kill_9_with_sessions_open(
    postgres: EmbeddedPostgres,
) -> None:
    dsn = await postgres.create_database("crash")
    assert await _write_and_read(dsn, "committed") == ["committed"]
    session = await asyncpg.connect(dsn)  # its backend outlives the postmaster for a moment
    try:
        pid = postgres.postmaster_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        postgres.start_server()  # waits for the old postmaster and its backends to go
        assert postgres.running()
        assert await _write_and_read(dsn, "after") == ["after", "committed"]
    finally:
        session.terminate()


async def topic_names(bootstrap: str) -> set[str]:
    """The topics the broker at ``bootstrap`` lists."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_broker_restart_gives_an_empty_broker_on_the_same_port(
    broker: EmbeddedBroker,
) -> None:
    await ensure_topics(broker.bootstrap, "r.", partitions=1)
    assert set(all_topic_names("r.")) <= await topic_names(broker.bootstrap)

    broker.kill()
    assert not broker.running()
    broker.restart()
    assert broker.running()
    assert not set(all_topic_names("r.")) & await topic_names(broker.bootstrap)

    await ensure_topics(broker.bootstrap, "r.", partitions=1)
    name = topic_name(Topic.MAIL_SYSTEM, "r.")
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(name, b"after the restart")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        name, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert record.value == b"after the restart"

    broker.restart()  # a running broker is stopped first
    assert broker.running()
