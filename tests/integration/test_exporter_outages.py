"""The exporter through a PostgreSQL outage: a running export pauses, takes its job up again
once the database is back, and ends done with every row; it is never failed for it."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
from pathlib import Path

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
