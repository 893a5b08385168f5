"""The exporter through a PostgreSQL outage: a running export pauses, takes its job up again
once the database is back, and ends done with every row; it is never failed for it. An end
whose commit fails is run again and counted once."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
from pathlib import Path

import asyncpg
import pytest

from libs.common.metrics import sample_value
from tests.conftest import Service, Stack, eventually, running
from tests.integration.outage import database_away
from tests.integration.test_exporter import download, finished, seed

pytestmark = pytest.mark.integration


class HoldingRelay:
    """A TCP relay in front of a contacts service that holds the first response after
    ``limit`` bytes until ``release`` is set: an export under way, caught mid-stream."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.upstream_port = upstream_port
        self.limit = limit
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self._first = True

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        limit: int | None = self.limit if self._first else None
        self._first = False

        async def forward(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None
        ) -> None:
            sent = 0
            while data := await src.read(16384):
                if limit is not None and sent + len(data) > limit:
                    self.holding.set()
                    await self.release.wait()
                    limit = None
                dst.write(data)
                await dst.drain()
                sent += len(data)
            dst.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(
                forward(reader, up_writer, None), forward(up_reader, writer, limit)
            )
        writer.close()
        up_writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.release.set()
        self.server.close()
        await self.server.wait_closed()


def pauses() -> float:
    labels = {"service": "exporter", "operation": "export"}
    return sample_value("tayori_transient_retries_total", labels) or 0


async def test_an_export_caught_by_a_database_outage_pauses_and_ends_done(
    stack: Stack, database: str, prefix: str, contacts: Service, tmp_path: Path
) -> None:
    count = 3000
    await seed(database, count)
    relay = HoldingRelay(contacts.runtime.port, limit=40_000)
    port = await relay.start()
    try:
        async with running(
            "exporter",
            stack,
            database,
            prefix,
            contacts_url=f"http://127.0.0.1:{port}",
            export_dir=tmp_path / "exports",
            progress_seconds=0.05,
        ) as exporter:
            body = {
                "source": "filter",
                "filter": {"field": "tags", "op": "include_any", "value": ["大量"]},
                "columns": ["id", "email"],
            }
            status, queued = await exporter.api.call("POST", "/v1/exports", body)
            assert status == 202, queued
            await asyncio.wait_for(relay.holding.wait(), 60)
            before = pauses()
            async with database_away(stack, database):
                relay.release.set()  # the rows come; their progress cannot be recorded

                async def paused() -> bool:
                    return pauses() > before

                await eventually(paused)
            job = await finished(exporter, queued["id"])
            assert (job["status"], job["rows"], job["error"]) == ("done", count, None), job
            status, data = await download(exporter, job)
            assert status == 200
            rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
            assert len(rows) == count + 1  # the header and every contact, once
            assert len({r[0] for r in rows[1:]}) == count
    finally:
        await relay.stop()


def sample(name: str, labels: dict[str, str]) -> float:
    return sample_value(name, labels) or 0


async def fail_the_first_commit_of(database: str, status: str) -> None:
    """The first transaction that moves an export job to ``status`` fails at its commit, as a
    connection lost in the COMMIT does (a deferred trigger; the sequence is not rolled back
    with the transaction, so only the first time)."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(
            f"""
            CREATE SEQUENCE exporter.commit_fault;
            CREATE FUNCTION exporter.fail_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.status = '{status}' AND nextval('exporter.commit_fault') = 1 THEN
                    RAISE EXCEPTION 'the commit fails' USING ERRCODE = '40001';
                END IF;
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER fail_first_commit AFTER UPDATE ON exporter.export_job
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                EXECUTE FUNCTION exporter.fail_first_commit();
            """
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("status", ["done", "failed"])
async def test_an_export_whose_end_fails_to_commit_is_counted_once(
    stack: Stack, database: str, prefix: str, contacts: Service, tmp_path: Path, status: str
) -> None:
    """The end of an export is counted (tayori_export_job_seconds, export_failures) after its
    transaction committed: an end whose commit failed is run again and counted once, not
    once per attempt."""
    await seed(database, 20)
    # A failed export: its file cannot be written (its directory would be under a file).
    (tmp_path / "a-file").write_bytes(b"")
    exports = tmp_path / ("exports" if status == "done" else "a-file/exports")
    counted = {"status": status}
    before = sample("tayori_export_job_seconds_count", counted)
    failures_before = sample("tayori_export_failures_total", {"cause": "file"})
    paused = pauses()
    async with running(
        "exporter",
        stack,
        database,
        prefix,
        contacts_url=contacts.api.base,
        export_dir=exports,
    ) as exporter:
        await fail_the_first_commit_of(database, status)  # its schema is there now
        body = {"source": "filter", "filter": {}, "columns": ["id", "email"]}
        status_code, queued = await exporter.api.call("POST", "/v1/exports", body)
        assert status_code == 202, queued
        job = await finished(exporter, queued["id"])
        assert job["status"] == status, job

        async def counted_once() -> bool:
            return sample("tayori_export_job_seconds_count", counted) > before

        await eventually(counted_once)
    assert pauses() > paused  # the first commit did fail: the run paused and ran again
    assert sample("tayori_export_job_seconds_count", counted) == before + 1
    failures = sample("tayori_export_failures_total", {"cause": "file"}) - failures_before
    assert failures == (1 if status == "failed" else 0)
