"""Ingest: ContactUpserted events on contacts.events → rows in PostgreSQL, against COPY.

1. N events (Japanese names, 2 tags, 2 custom fields defined first) are produced onto
   ``contacts.events`` before the service runs (not timed).
2. Ceiling: ``copy_records_to_table`` of the same rows, same columns, into a fresh copy of
   the contact table (``LIKE contacts.contact INCLUDING ALL``: same indexes) in the same
   database; only the COPY calls are timed.
3. The service starts; the figure is events/s from the moment its consumers have
   partitions until ``SELECT count(*) FROM contact`` reaches N (its outbox also publishes
   one contacts.changelog record per contact meanwhile, as in production).

With ``--ingest-replicas R`` the service runs instead as R processes (``tayori contacts``,
as deployed), started before the events are produced so that the group has settled; the
figure is then events/s from the end of production until the count reaches N (the rows
written while the producer ran are left out, and so is its CPU).
"""

from __future__ import annotations

import asyncio
import cProfile
import datetime as dt
import io
import os
import pstats
import time
from pathlib import Path
from subprocess import Popen
from typing import Any

import aiohttp

from bench import processes
from bench.cpu import CpuMeter, Sample
from bench.data import COPY_COLUMNS, CUSTOM_FIELDS, copy_row, profiles, upserted_event
from bench.report import Result, n, progress, rate
from bench.stack import ADMIN_TOKEN, Stack, database, define_fields, stack
from libs.common import avro
from libs.common.kafka import Publisher, make_producer
from libs.common.topics import Topic
from services.contacts.app import build
from tayori.embedded import free_port

GOAL_RATIO = 0.5
COPY_CHUNK = 50_000


async def produce_events(st: Stack, count: int) -> float:
    settings = st.settings(service="bench")
    producer = make_producer(settings)
    await producer.start()
    publisher = Publisher(settings, producer)
    occurred_at = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)
    started = time.monotonic()
    try:
        pending = []
        for p in profiles(count):
            data, headers = avro.encode(Topic.CONTACTS_EVENTS, upserted_event(p, occurred_at))
            pending.append(
                await publisher.send_raw(Topic.CONTACTS_EVENTS, p["external_id"], data, headers)
            )
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


async def copy_ceiling(st: Stack, count: int) -> float:
    """Seconds spent in COPY for the same rows into an identically indexed empty table."""
    conn = await st.connect_plain()
    try:
        await conn.execute(
            "CREATE SCHEMA bench_copy;"
            " CREATE TABLE bench_copy.contact (LIKE contacts.contact INCLUDING ALL)"
        )
        spent = 0.0
        source = profiles(count)
        while True:
            chunk = [copy_row(p) for _, p in zip(range(COPY_CHUNK), source, strict=False)]
            if not chunk:
                break
            started = time.monotonic()
            await conn.copy_records_to_table(
                "contact", schema_name="bench_copy", columns=COPY_COLUMNS, records=chunk
            )
            spent += time.monotonic() - started
        await conn.execute("CHECKPOINT")  # the service does not pay for the COPY's dirty pages
        return spent
    finally:
        await conn.close()


def _postmaster(st: Stack) -> int:
    return int((Path(st.postgres.server.pgdata) / "postmaster.pid").read_text().split()[0])


def _per_event(start: Sample, end: Sample, count: int) -> dict[str, float]:
    """CPU µs per event of each process while the service ingested (the service's
    includes the bench's own count every 0.1 s, a few µs a second)."""
    return {name: round((end[1][name] - start[1][name]) / count * 1e6, 1) for name in end[1]}


def _cores(start: Sample, end: Sample) -> dict[str, float]:
    return {
        name: round((end[1][name] - start[1][name]) / (end[0] - start[0]), 2) for name in end[1]
    }


def _result(name: str, events_per_s: float, copy_per_s: float, data: dict[str, Any]) -> Result:
    """The ingest figure beside the COPY ceiling, checked against the goal."""
    ratio = events_per_s / copy_per_s
    return Result(
        name=name,
        figure=f"{n(events_per_s)} events/s",
        ceiling=f"COPY {n(copy_per_s)} rows/s",
        goal=f">= {GOAL_RATIO:.0%} of COPY",
        passed=ratio >= GOAL_RATIO,
        ratio=ratio,
        data={
            "events_per_s": round(events_per_s),
            "copy_rows_per_s": round(copy_per_s),
            **data,
        },
    )


async def run(
    root: Path, count: int, *, profile: Path | None = None, replicas: int = 0
) -> list[Result]:
    if replicas:
        return await run_replicas(root, count, replicas)
    async with database(root, "ingest") as db, stack(root, "ingest", db) as st:
        conn = await st.connect_plain()
        await define_fields(conn, CUSTOM_FIELDS)
        progress(f"ingest: producing {n(count)} events")
        produce_s = await produce_events(st, count)
        progress(f"ingest: produced in {produce_s:.1f}s; COPY ceiling")
        copy_s = await copy_ceiling(st, count)
        progress(f"ingest: COPY {n(rate(count, copy_s))} rows/s; starting the service")

        meter = CpuMeter(
            {"service": os.getpid(), "postgres": _postmaster(st), "broker": st.broker.process.pid},
            frozenset({"postgres"}),
        )
        runtime = build(st.settings())
        profiler = cProfile.Profile() if profile else None
        started = time.monotonic()
        await runtime.start()
        await runtime.wait_for_consumers()
        ready = time.monotonic()
        if profiler:
            profiler.enable()
        cpu_from = meter.sample()
        last_report = ready
        done = 0
        try:
            while done < count:
                await asyncio.sleep(0.1)
                done = await conn.fetchval("SELECT count(*) FROM contacts.contact")
                if time.monotonic() - last_report > 10:
                    last_report = time.monotonic()
                    progress(f"ingest: {n(done)} rows, {n(rate(done, last_report - ready))}/s")
            finished = time.monotonic()
            cpu_to = meter.sample()
            if profiler:
                profiler.disable()
            while True:  # and the changelog of every row published
                if not await conn.fetchval("SELECT count(*) FROM contacts.outbox"):
                    break
                await asyncio.sleep(0.1)
            outbox_drained = time.monotonic()
        finally:
            await runtime.stop()
        same = await conn.fetchval(
            "SELECT count(*) FROM contacts.contact c JOIN bench_copy.contact b USING (external_id)"
            " WHERE (c.email, c.name, c.name_kana, c.company, c.phone, c.acquired_at, c.tags,"
            "        c.custom, c.sales_status, c.engagement)"
            "   IS NOT DISTINCT FROM (b.email, b.name, b.name_kana, b.company, b.phone,"
            "        b.acquired_at, b.tags, b.custom, b.sales_status, b.engagement)"
        )
        await conn.close()

    if profiler and profile:
        profiler.dump_stats(profile)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        progress(f"ingest profile written to {profile}\n{text.getvalue()}")

    return [
        _result(
            "ingest",
            rate(count, finished - ready),
            rate(count, copy_s),
            {
                "events": count,
                "ingest_seconds": round(finished - ready, 2),
                "startup_seconds": round(ready - started, 2),
                "changelog_published_seconds": round(outbox_drained - ready, 2),
                "copy_seconds": round(copy_s, 2),
                "produce_seconds": round(produce_s, 2),
                "rows_identical_to_copy": same,
                "cpu_us_per_event": _per_event(cpu_from, cpu_to, count),
                "cpu_cores": _cores(cpu_from, cpu_to),
            },
        )
    ]


async def run_replicas(root: Path, count: int, replicas: int) -> list[Result]:
    """The service as ``replicas`` processes of ``tayori contacts`` (see the module doc)."""
    async with database(root, "ingest") as db, stack(root, "ingest", db) as st:
        conn = await st.connect_plain()
        await define_fields(conn, CUSTOM_FIELDS)
        progress(f"ingest: COPY ceiling of {n(count)} rows")
        copy_s = await copy_ceiling(st, count)
        env = {
            **os.environ,
            "DATABASE_URL": st.dsn,
            **st.broker.profile(),
            "KAFKA_TOPIC_PREFIX": st.prefix,
            "KAFKA_SESSION_TIMEOUT_MS": "1000",
            "KAFKA_FETCH_MAX_WAIT_MS": "20",
            "TAYORI_ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_LEVEL": "warning",
        }
        started: list[Popen[bytes]] = []
        try:
            ports = [free_port() for _ in range(replicas)]
            for i, port in enumerate(ports):
                log = root / f"ingest-replica-{i}.log"
                started.append(processes.start("contacts", env, port, log))
            async with aiohttp.ClientSession() as session:
                for port in ports:
                    await processes.ready(session, port)
            await asyncio.sleep(5)  # the group's rebalances settle
            pids = {f"replica{i}": p.pid for i, p in enumerate(started)}
            meter = CpuMeter(
                {**pids, "postgres": _postmaster(st), "broker": st.broker.process.pid},
                frozenset({"postgres"}),
            )
            progress(f"ingest: {replicas} replicas ready; producing {n(count)} events")
            await produce_events(st, count)
            produced = time.monotonic()
            cpu_from = meter.sample()
            done_at_produced = done = await conn.fetchval("SELECT count(*) FROM contacts.contact")
            progress(f"ingest: produced; {n(done)} rows so far")
            while done < count:
                await asyncio.sleep(0.1)
                done = await conn.fetchval("SELECT count(*) FROM contacts.contact")
            finished = time.monotonic()
            cpu_to = meter.sample()
        finally:
            processes.stop(started)
        await conn.close()

    measured = count - done_at_produced
    return [
        _result(
            f"ingest ({replicas} replica{'s' if replicas > 1 else ''})",
            rate(measured, finished - produced),
            rate(count, copy_s),
            {
                "events": count,
                "replicas": replicas,
                "events_measured": measured,
                "ingest_seconds": round(finished - produced, 2),
                "cpu_us_per_event": _per_event(cpu_from, cpu_to, measured),
                "cpu_cores": _cores(cpu_from, cpu_to),
            },
        )
    ]
