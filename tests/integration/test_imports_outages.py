"""F-04 imports through PostgreSQL outages: a job pauses and goes on from its committed
checkpoint, every row applied once; it is never failed nor left running without a runner."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from libs.common.metrics import sample_value
from tests.conftest import Service, Stack, eventually
from tests.integration.outage import database_away
from tests.integration.test_imports import _csv, _ctx, _finished, _upload

pytestmark = pytest.mark.integration


def retries(operation: str) -> float:
    labels = {"service": "contacts", "operation": operation}
    return sample_value("tayori_transient_retries_total", labels) or 0


def _rows(count: int) -> bytes:
    return _csv(["email,name", *(f"o{n}@example.jp,顧客 {n}" for n in range(count))]).encode()


async def _imported(contacts: Service, count: int) -> None:
    emails = await contacts.runtime.pool.fetchval(
        "SELECT count(*) FROM contact WHERE email LIKE 'o%@example.jp'"
    )
    assert emails == count


async def test_an_import_caught_by_a_database_outage_goes_on_from_its_checkpoint(
    stack: Stack, database: str, contacts: Service
) -> None:
    """The outage outlasts several attempts of the job: it waits for the database and goes
    on from its checkpoint instead of failing."""
    count = 2000
    ctx = _ctx(contacts)
    ctx.settings = dataclasses.replace(ctx.settings, import_chunk_rows=10)
    status, job = await _upload(contacts, _rows(count))
    assert status == 202, job

    async def under_way() -> bool:
        running = await contacts.api.ok("GET", f"/v1/imports/{job['id']}")
        assert running["status"] != "done", "the import ended before the outage"
        return bool(running["processed"])

    await eventually(under_way, interval=0.01)
    before = retries("import")
    async with database_away(stack, database):

        async def paused_twice() -> bool:
            return retries("import") >= before + 2

        await eventually(paused_twice)
    done = await _finished(contacts, job["id"])
    assert (done["status"], done["inserted"], done["failed"]) == ("done", count, 0)
    assert done["processed"] == count
    await _imported(contacts, count)


class _AnswerLost:
    """A pool whose first transaction that leaves an import's checkpoint moved commits and
    then reports its connection lost: the connection dropped between the COMMIT and its
    answer."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.lost: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn:
            yield _Connection(conn, self.lost)


class _Connection:
    def __init__(self, conn: asyncpg.Connection, lost: list[int]) -> None:
        self.conn = conn
        self.lost = lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self.conn.transaction():
            yield
        if self.lost or self.conn.is_in_transaction():  # a savepoint's end: no answer to lose
            return
        moved = await self.conn.fetchval("SELECT max(next_line) FROM import_job")
        if moved:
            self.lost.append(moved)
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")


async def test_a_chunk_whose_commit_answer_was_lost_is_not_taken_for_another_runner(
    contacts: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is lost after a chunk's COMMIT went through and before its answer
    came: the job goes on from the checkpoint at the chunk's end, which is its own commit,
    not another runner's (it used to step aside, leaving the job running)."""
    count = 50
    ctx = _ctx(contacts)
    ctx.settings = dataclasses.replace(ctx.settings, import_chunk_rows=10)
    pool = _AnswerLost(ctx.pool)
    monkeypatch.setattr(ctx, "pool", pool)
    status, job = await _upload(contacts, _rows(count))
    assert status == 202, job
    done = await _finished(contacts, job["id"])
    assert pool.lost == [12]  # the first chunk: lines 2–11
    assert (done["status"], done["processed"], done["failed"]) == ("done", count, 0)
    await _imported(contacts, count)
