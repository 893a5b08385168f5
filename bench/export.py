"""CSV export (issue 6, F-40/F-41): N contacts, 8 columns, through the exporter.

contacts and the exporter run as their own processes (`tayori <service>`), as in
`tayori dev`, on the database the search and snapshot benchmarks loaded (N contacts, every
one in group 1). One export of every contact is requested through ``POST /v1/exports``:
the exporter streams the rows from contacts' ``POST /v1/contacts/stream`` (PostgreSQL
``COPY ... TO STDOUT`` as CSV), parses them, neutralises formula cells (F-42), writes the
file (CRLF, UTF-8) and renames it into place. The figure is rows / (finished_at −
started_at) of the job as the exporter records it.

Ceiling, in the same run on the same database: the raw ``COPY (same query) TO STDOUT``
(the query contacts' stream compiles for this request, in the same transaction mode),
read by asyncpg into a sink that drops the bytes — the bare cost of getting the rows out
of PostgreSQL. It runs before and after the export; the faster run is the ceiling. Peak RSS
(VmHWM) of the exporter and contacts processes is printed beside it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.campaign import ADMIN, Api
from bench.processes import ready, start, stop
from bench.report import Result, n, progress, rate
from bench.stack import Database, field_definitions, stack
from libs.common import db
from services.contacts.stream import compile_stream
from tayori.embedded import free_port

GOAL_RATIO = 0.5
COLUMNS = [
    "id",
    "email",
    "name",
    "name_kana",
    "company",
    "custom_fields.plan",
    "created_at",
    "score",
]
#: the same columns as contacts' stream names them (what the exporter asks for).
STREAM_COLUMNS = [c.replace("custom_fields.", "custom.") for c in COLUMNS]
TIME_ZONE = "Asia/Tokyo"


async def copy_rate(dsn: str) -> tuple[int, int, float]:
    """Raw COPY of the export's query: (rows, bytes, seconds)."""
    conn = await db.connect(dsn, "contacts")
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            query = await compile_stream(
                conn,
                await field_definitions(conn),
                {"filter": {}, "columns": STREAM_COLUMNS, "time_zone": TIME_ZONE, "safe_csv": True},
            )
            await conn.execute("SELECT set_config('TimeZone', $1, true)", TIME_ZONE)
            size = 0

            async def sink(chunk: bytes) -> None:
                nonlocal size
                size += len(chunk)

            started = time.monotonic()
            status = await conn.copy_from_query(
                query.select, *query.params, output=sink, format="csv"
            )
            seconds = time.monotonic() - started
        return int(status.split()[-1]), size, seconds
    finally:
        await conn.close()


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a running process, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _export(exporter: Api) -> dict[str, Any]:
    body = {"source": "filter", "filter": {}, "columns": COLUMNS}
    queued = await exporter("POST", "/v1/exports", body)
    while True:
        job: dict[str, Any] = await exporter("GET", f"/v1/exports/{queued['id']}")
        if job["status"] in ("done", "failed"):
            return job
        await asyncio.sleep(0.2)


async def run(root: Path, database: Database, loaded: dict[str, Any]) -> list[Result]:
    dsn = database.dsn
    progress("export: raw COPY of the same query (ceiling, first run)")
    copies = [await copy_rate(dsn)]
    async with stack(root, "export", database) as st:
        ports = {"contacts": free_port(), "exporter": free_port()}
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            **st.broker.profile(),
            "KAFKA_TOPIC_PREFIX": st.prefix,
            "KAFKA_SESSION_TIMEOUT_MS": "1000",
            "TAYORI_ADMIN_TOKEN": ADMIN,
            "LOG_LEVEL": "warning",
            "CONTACTS_URL": f"http://127.0.0.1:{ports['contacts']}",
            "EXPORT_DIR": str(root / "exports"),
            "EXPORT_TIME_ZONE": TIME_ZONE,
        }
        processes = {
            name: start(name, env, port, root / f"export-{name}.log")
            for name, port in ports.items()
        }
        try:
            async with aiohttp.ClientSession() as session:
                for port in ports.values():
                    await ready(session, port)
                progress(f"export: {n(loaded['contacts'])} contacts, {len(COLUMNS)} columns")
                job = await _export(Api(session, ports["exporter"]))
            rss = {name: peak_rss_mib(p.pid) for name, p in processes.items()}
        finally:
            stop(list(processes.values()))
    if job["status"] != "done":
        raise RuntimeError(f"export failed: {job}")
    progress("export: raw COPY of the same query (ceiling, second run)")
    copies.append(await copy_rate(dsn))
    rows = job["rows"]
    seconds = _at(job["finished_at"]) - _at(job["started_at"])
    per_s = rate(rows, seconds)
    copy_rows, copy_bytes, copy_s = min(copies, key=lambda c: c[2])
    ceiling = rate(copy_rows, copy_s)
    ratio = per_s / ceiling
    return [
        Result(
            name="export",
            figure=f"{n(per_s)} rows/s",
            ceiling=f"COPY TO STDOUT {n(ceiling)} rows/s",
            goal=f">= {GOAL_RATIO:.0%}",
            passed=ratio >= GOAL_RATIO and copy_rows == rows,
            ratio=ratio,
            data={
                "rows": rows,
                "columns": len(COLUMNS),
                "export_seconds": round(seconds, 2),
                "rows_per_s": round(per_s),
                "file_bytes": job["size_bytes"],
                "copy_rows": copy_rows,
                "copy_bytes": copy_bytes,
                "copy_seconds": [round(c[2], 2) for c in copies],
                "copy_rows_per_s": round(ceiling),
                "exporter_peak_rss_mib": round(rss["exporter"], 1),
                "contacts_peak_rss_mib": round(rss["contacts"], 1),
            },
        )
    ]


def _at(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()
