"""F-04 imports through PostgreSQL outages: a job pauses and goes on from its committed
checkpoint, every row applied once; it is never failed nor left running without a runner."""

from __future__ import annotations

import dataclasses
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from libs.common.retry import Backoff
from services.contacts import imports
from tests.conftest import Service, Stack, eventually
from tests.integration.outage import database_away
from tests.integration.test_imports import _csv, _ctx, _finished, _upload

pytestmark = pytest.mark.integration


def retries(operation: str) -> float:
    labels = {"service": "contacts", "operation": operation}
    return REGISTRY.get_sample_value("tayori_transient_retries_total", labels) or 0


def _rows(count: int) -> bytes:
    return _csv(["email,name", *(f"o{n}@example.jp,顧客 {n}" for n in range(count))]).encode()


async def _imported(contacts: Service, count: int) -> None:
    emails = await contacts.runtime.pool.fetchval(
        "SELECT count(*) FROM contact WHERE email LIKE 'o%@example.jp'"
    )
    assert emails == count


async def test_an_import_caught_by_a_database_outage_goes_on_from_its_checkpoint(
    stack: Stack, database: str, contacts: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage outlasts a chunk's own retries (cut short here): the job waits for the
    database and goes on from its checkpoint instead of failing."""
    count = 2000
    ctx = _ctx(contacts)
    ctx.settings = dataclasses.replace(ctx.settings, import_chunk_rows=10)
    monkeypatch.setattr(imports, "_CHUNK_RETRY", Backoff(initial=0.01, maximum=0.01, attempts=2))
    status, job = await _upload(contacts, _rows(count))
    assert status == 202, job

    async def under_way() -> bool:
        running = await contacts.api.ok("GET", f"/v1/imports/{job['id']}")
        assert running["status"] != "done", "the import ended before the outage"
        return bool(running["processed"])

    await eventually(under_way, interval=0.01)
    before = retries("import_chunk")
    async with database_away(stack, database):

        async def chunk_gave_up() -> bool:
            return retries("import_chunk") >= before + 2

        await eventually(chunk_gave_up)
    done = await _finished(contacts, job["id"])
    assert (done["inserted"], done["failed"], done["processed"]) == (count, 0, count)
    await _imported(contacts, count)


async def test_a_chunk_whose_commit_answer_was_lost_is_not_taken_for_another_runner(
    contacts: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is lost after a chunk's COMMIT went through and before its answer
    came: the retry finds the checkpoint at the chunk's end, which is its own commit, not
    another runner's, and goes on (it used to step aside, leaving the job running)."""
    count = 50
    ctx = _ctx(contacts)
    ctx.settings = dataclasses.replace(ctx.settings, import_chunk_rows=10)
    real = imports._Runner._transaction
    lost: list[int] = []

    async def answer_lost(self: Any, chunk: Any, next_line: int, **options: Any) -> Any:
        tally = await real(self, chunk, next_line, **options)
        if not lost and tally is not None:
            lost.append(next_line)
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")
        return tally

    monkeypatch.setattr(imports._Runner, "_transaction", answer_lost)
    status, job = await _upload(contacts, _rows(count))
    assert status == 202, job
    done = await _finished(contacts, job["id"])
    assert lost
    assert (done["processed"], done["failed"]) == (count, 0)
    await _imported(contacts, count)
