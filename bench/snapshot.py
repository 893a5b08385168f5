"""Snapshot (SPEC §9): a group target of N contacts streamed on campaign.recipients.

N contacts are loaded by COPY, all in group 1 (~5% unsubscribed, ~2% banned, so ~93% are
recipients). A ``snapshot.requests`` record asks for group 1; the figure is recipients/s
from publishing the request until the end marker reaches a consumer in another process
(:mod:`bench.watch`, aiokafka ``getmany``).

Ceilings, measured in the same run after the service stopped:

- raw produce: the same number of records of the same size (real recipient records,
  encoded beforehand) through an aiokafka producer with the service's producer settings,
  keyed alike (one partition), to a fresh topic;
- cursor read: the service's target SQL through a server-side cursor (prefetch 2000) in a
  REPEATABLE READ transaction, rows only.

A record cannot go out faster than both, so the goal is a share of the slower one. The
Python cost per record (building the record and Avro-encoding it) and the produce rate
through aiokafka's batch API (``create_batch`` / ``send_batch``) are measured as well, to
show where the time goes and what a faster producer path would give.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.report import Result, n, progress, rate
from bench.stack import Database, Stack, field_definitions, stack
from libs.common import avro
from libs.common.kafka import Publisher, make_producer
from libs.common.topics import Topic, topic_name
from services.contacts import targets
from services.contacts.app import build

GOAL_RATIO = 0.5
GROUP_ID = 1


async def _target(conn: Any) -> tuple[str, list[Any]]:
    return await targets.target_query(
        conn,
        await field_definitions(conn),
        group_id=GROUP_ID,
        target_filter=None,
        saved_filter_id=None,
    )


async def cursor_rate(st: Stack) -> tuple[int, float]:
    conn = await st.connect()
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            sql, params = await _target(conn)
            started = time.monotonic()
            rows = 0
            async for _ in targets.iterate_target(conn, sql, params):
                rows += 1
            return rows, time.monotonic() - started
    finally:
        await conn.close()


async def encode_rate(st: Stack, request: dict[str, Any], sample: int) -> tuple[list[bytes], float]:
    """Build + encode ``sample`` recipient records as the service does; (payloads, seconds)."""
    conn = await st.connect()
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            sql, params = await _target(conn)
            rows = await conn.fetch(f"{sql} LIMIT {sample}", *params)
    finally:
        await conn.close()
    started = time.monotonic()
    payloads = [
        avro.encode(Topic.CAMPAIGN_RECIPIENTS, targets.recipient_record(request, i, row))[0]
        for i, row in enumerate(rows, start=1)
    ]
    return payloads, time.monotonic() - started


async def produce_rate(st: Stack, payloads: list[bytes], count: int, *, batches: bool) -> float:
    """Seconds to produce ``count`` pre-encoded records (cycling ``payloads``) and get acks,
    to a fresh topic: one ``send`` per record, or (``batches``) aiokafka's batch API."""
    name = topic_name(f"bench.produce-{'batch' if batches else 'send'}", st.prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=st.broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 4, 1)])
    finally:
        await admin.close()
    producer = make_producer(st.settings(service="bench"))
    await producer.start()
    headers = [(avro.VERSION_HEADER, b"1")]
    records = itertools.islice(itertools.cycle(payloads), count)
    try:
        started = time.monotonic()
        pending = []
        if batches:
            batch = producer.create_batch()
            for payload in records:
                if (
                    batch.append(key=b"campaign", value=payload, timestamp=None, headers=headers)
                    is None
                ):
                    pending.append(await producer.send_batch(batch, name, partition=0))
                    batch = producer.create_batch()
                    batch.append(key=b"campaign", value=payload, timestamp=None, headers=headers)
            pending.append(await producer.send_batch(batch, name, partition=0))
        else:
            for payload in records:
                pending.append(await producer.send(name, payload, key=b"campaign", headers=headers))
                if len(pending) >= 10_000:
                    await asyncio.gather(*pending)
                    pending.clear()
        await asyncio.gather(*pending)
        return time.monotonic() - started
    finally:
        await producer.stop()


async def run(root: Path, db: Database, loaded: dict[str, Any]) -> list[Result]:
    """Run on ``db``, loaded by :func:`bench.load.load`, with a broker of its own."""
    contacts = loaded["contacts"]
    async with stack(root, "snapshot", db) as st:
        request_id, campaign_id = str(uuid.uuid4()), str(uuid.uuid4())
        request: dict[str, Any] = {
            "request_id": request_id,
            "campaign_id": campaign_id,
            "group_id": GROUP_ID,
            "filter_json": None,
            "saved_filter_id": None,
            "include_unsubscribed": False,
            "dedupe": "none",
            "requested_at": dt.datetime.now(dt.UTC),
        }
        watcher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.watch",
            st.broker.bootstrap,
            topic_name(Topic.CAMPAIGN_RECIPIENTS, st.prefix),
            request_id,
            stdout=asyncio.subprocess.PIPE,
        )
        assert watcher.stdout is not None
        runtime = build(st.settings())
        await runtime.start()
        await runtime.wait_for_consumers()
        try:
            if (await watcher.stdout.readline()).strip() != b"ready":
                raise RuntimeError("the recipients watcher did not start")
            settings = st.settings(service="bench")
            producer = make_producer(settings, linger_ms=0)
            await producer.start()
            try:
                progress("snapshot: request published; streaming")
                started = time.monotonic()
                await Publisher(settings, producer).send_and_wait(
                    Topic.SNAPSHOT_REQUESTS, campaign_id, request
                )
            finally:
                await producer.stop()
            try:
                line = await asyncio.wait_for(
                    watcher.stdout.readline(), timeout=120 + contacts / 2000
                )
            except TimeoutError:
                healthy, detail = await runtime.health()
                raise RuntimeError(
                    f"no end marker; service healthy={healthy} {detail}, "
                    f"failure={runtime._failure!r}"
                ) from None
            end = json.loads(line)
        finally:
            await runtime.stop()
            if watcher.returncode is None:
                watcher.kill()
            await watcher.wait()
        recipients = int(end["total"])
        if end["error"] or end["records"] != recipients + 1:
            raise RuntimeError(f"snapshot ended badly: {end}")
        seconds = end["end_at"] - started
        progress(f"snapshot: {n(recipients)} recipients in {seconds:.1f}s; ceilings")

        read_rows, read_s = await cursor_rate(st)
        payloads, encode_s = await encode_rate(st, request, min(100_000, recipients))
        produce_s = await produce_rate(st, payloads, recipients, batches=False)
        batch_s = await produce_rate(st, payloads, recipients, batches=True)

    per_s = rate(recipients, seconds)
    produce_per_s = rate(recipients, produce_s)
    read_per_s = rate(read_rows, read_s)
    ceiling = min(produce_per_s, read_per_s)
    ratio = per_s / ceiling
    return [
        Result(
            name="snapshot",
            figure=f"{n(per_s)} recipients/s",
            ceiling=f"produce {n(produce_per_s)}/s, cursor {n(read_per_s)} rows/s",
            goal=f">= {GOAL_RATIO:.0%} of the slower",
            passed=ratio >= GOAL_RATIO,
            ratio=ratio,
            data={
                "recipients": recipients,
                "recipients_per_s": round(per_s),
                "snapshot_seconds": round(seconds, 2),
                "first_recipient_after_s": round(end["first_at"] - started, 3),
                "produce_records_per_s": round(produce_per_s),
                "produce_batch_api_records_per_s": round(rate(recipients, batch_s)),
                "cursor_rows_per_s": round(read_per_s),
                "build_and_encode_per_s": round(rate(len(payloads), encode_s)),
                "record_bytes_avg": round(sum(map(len, payloads)) / len(payloads)),
                **loaded,
            },
        )
    ]
