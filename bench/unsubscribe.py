"""Unsubscribe latency (issue 3): POST /u/{token} → change on suppression.changes and in
contacts' projection, at a steady 500 requests/s, beside the broker round trip.

Both services run as their own processes (`tayori contacts`, `tayori suppression`) on the
embedded PostgreSQL and broker, as in `tayori dev`; this process is the load generator and
the observer: a consumer of suppression.changes, and a LISTEN on a trigger that the bench
puts on contacts.membership. The floor is produce → consume through the same broker at
the same rate with the same consumer fetch wait the services use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.cpu import CpuMeter, loadavg
from bench.processes import ready, start, stop
from bench.report import Result, ms, percentile, progress
from libs.common import avro, db
from libs.common.kafka import ensure_topics
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget
from libs.common.topics import Topic, topic_name
from services.contacts.app import MIGRATIONS as CONTACTS_MIGRATIONS
from services.suppression.app import MIGRATIONS as SUPPRESSION_MIGRATIONS
from tayori.embedded import EmbeddedBroker, EmbeddedPostgres, free_port

RATE = 500
SECONDS = 10
FETCH_WAIT_MS = 10  # KAFKA_FAST_FETCH_MAX_WAIT_MS: what the latency-critical consumers use
KEYS = "k1:bench-unsubscribe-signing-key"
GROUP = 1


async def _seed(dsn: str, contacts: int) -> None:
    # contacts' own search path: its triggers call its functions unqualified, as in the service.
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "contacts"})
    try:
        await conn.execute(
            "INSERT INTO contacts.contact_group (kind, name) VALUES ('group', 'bench')"
        )
        await conn.copy_records_to_table(
            "contact",
            schema_name="contacts",
            columns=["email"],
            records=[(f"u{i}@example.jp",) for i in range(contacts)],
        )
        await conn.execute(
            "INSERT INTO contacts.membership (contact_id, group_id, state, method)"
            " SELECT id, $1, 'deliverable', 'system' FROM contacts.contact",
            GROUP,
        )
        await conn.execute(
            "INSERT INTO suppression.contact (id, email) SELECT id, email FROM contacts.contact"
        )
        await conn.execute(
            "INSERT INTO suppression.membership (contact_id, group_id, state, method)"
            " SELECT id, $1, 'deliverable', 'system' FROM contacts.contact",
            GROUP,
        )
        await conn.execute("""
            CREATE FUNCTION contacts.bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_notify('bench_membership', NEW.contact_id::text); RETURN NEW; END $$;
            CREATE TRIGGER bench_notify AFTER UPDATE ON contacts.membership
            FOR EACH ROW WHEN (NEW.state = 'unsubscribed') EXECUTE FUNCTION contacts.bench_notify();
        """)
    finally:
        await conn.close()


async def _floor(bootstrap: str, prefix: str, count: int) -> list[float]:
    """Produce → consume latency through the broker at RATE, FETCH_WAIT_MS fetch wait."""
    name = f"{prefix}bench.floor"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=0)
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_WAIT_MS,
    )
    await producer.start()
    await consumer.start()
    latencies: list[float] = []
    try:

        async def consume() -> None:
            while len(latencies) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    now = time.perf_counter()
                    latencies.extend(now - float(r.value) for r in records)

        reader = asyncio.ensure_future(consume())
        started = time.perf_counter()
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / RATE - time.perf_counter()))
            await producer.send(name, str(time.perf_counter()).encode())
        await asyncio.wait_for(reader, 60)
    finally:
        await consumer.stop()
        await producer.stop()
    return latencies


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return float(sum(ticks) - idle), float(sum(ticks))


def _loadavg() -> str:
    return loadavg().split()[0]


async def _projection_batches(port: int) -> dict[str, Any]:
    """contacts' suppression.changes batches from its /metrics: how many, how many
    records each, how long the handler took on average."""
    sums: dict[str, float] = {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if 'topic="suppression.changes"' not in line or line.startswith("#"):
            continue
        name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
        if name == "tayori_messages_consumed_total" and 'outcome="ok"' not in line:
            continue
        sums[name] = sums.get(name, 0.0) + value
    batches = sums.get("tayori_consumer_batch_seconds_count", 0.0)
    return {
        "batches": batches,
        "records_per_batch": round(sums.get("tayori_messages_consumed_total", 0.0) / batches, 1)
        if batches
        else 0.0,
        "handler_mean_ms": ms(sums.get("tayori_consumer_batch_seconds_sum", 0.0) / batches)
        if batches
        else 0.0,
    }


async def run(root: Path) -> list[Result]:
    count = RATE * SECONDS
    postgres = EmbeddedPostgres(root / "unsub-pg")
    broker = EmbeddedBroker(free_port(), log_path=root / "unsub-broker.log")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        dsn = await postgres.create_database("tayori")
        await db.migrate(dsn, "contacts", CONTACTS_MIGRATIONS)
        await db.migrate(dsn, "suppression", SUPPRESSION_MIGRATIONS)
        prefix = f"u{uuid.uuid4().hex[:8]}."
        await ensure_topics(broker.bootstrap, prefix)
        await ensure_topics(broker.bootstrap, prefix + "bench.", partitions=1)
        progress(f"unsubscribe: seeding {count} contacts")
        await _seed(dsn, count)
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            **broker.profile(),
            "KAFKA_TOPIC_PREFIX": prefix,
            "KAFKA_SESSION_TIMEOUT_MS": "1000",
            "KAFKA_FAST_FETCH_MAX_WAIT_MS": str(FETCH_WAIT_MS),
            "TAYORI_SIGNING_KEYS": KEYS,
            "TAYORI_ADMIN_TOKEN": "bench",
            "LOG_LEVEL": "warning",
        }
        ports = {"contacts": free_port(), "suppression": free_port()}
        for service, port in ports.items():
            processes.append(start(service, env, port, root / f"unsub-{service}.log"))
        postmaster = (root / "unsub-pg" / "postmaster.pid").read_text().split()[0]
        pids = {
            **{service: p.pid for service, p in zip(ports, processes, strict=True)},
            "postgres": int(postmaster),
            "broker": broker.process.pid,
            "bench": os.getpid(),
        }
        links = UnsubscribeLinks(KEYS, f"http://127.0.0.1:{ports['suppression']}")
        ids = [
            r["id"]
            for r in await (await asyncpg.connect(dsn)).fetch(
                "SELECT id FROM contacts.contact ORDER BY id"
            )
        ]
        urls = {cid: links.url(UnsubscribeTarget(cid, GROUP, "bench")) for cid in ids}

        sent: dict[int, float] = {}
        answered: list[float] = []
        answered_at: dict[int, float] = {}
        on_topic: dict[int, float] = {}
        in_contacts: dict[int, float] = {}

        all_seen = asyncio.Event()

        def seen_in_contacts(*notification: Any) -> None:
            in_contacts.setdefault(int(notification[3]), time.perf_counter())
            if len(in_contacts) >= count:
                all_seen.set()

        listener = await asyncpg.connect(dsn)
        await listener.add_listener("bench_membership", seen_in_contacts)
        consumer = AIOKafkaConsumer(
            topic_name(Topic.SUPPRESSION_CHANGES, prefix),
            bootstrap_servers=broker.bootstrap,
            group_id=None,
            auto_offset_reset="latest",
            fetch_max_wait_ms=10,
        )
        await consumer.start()

        async def watch() -> None:
            while len(on_topic) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    now = time.perf_counter()
                    for record in records:
                        change = avro.decode(
                            Topic.SUPPRESSION_CHANGES, record.value, record.headers
                        )
                        on_topic.setdefault(change["contact_id"], now)

        watcher = asyncio.ensure_future(watch())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
            for port in ports.values():
                await ready(session, port)
            await asyncio.sleep(1.0)

            async def post(contact_id: int) -> None:
                sent[contact_id] = time.perf_counter()
                async with session.post(
                    urls[contact_id], data={"List-Unsubscribe": "One-Click"}
                ) as response:
                    assert response.status == 200, response.status
                answered_at[contact_id] = time.perf_counter()
                answered.append(answered_at[contact_id] - sent[contact_id])

            progress(f"unsubscribe: {count} POSTs at {RATE}/s")
            meter = CpuMeter(pids, frozenset({"postgres"}))
            loadavg_before = _loadavg()
            machine_before, cpu_before = _machine_busy(), meter.sample()
            tasks = []
            started = time.perf_counter()
            for i, contact_id in enumerate(ids):
                await asyncio.sleep(max(0.0, started + i / RATE - time.perf_counter()))
                tasks.append(asyncio.ensure_future(post(contact_id)))
            await asyncio.gather(*tasks)
            achieved = count / (time.perf_counter() - started)
        await asyncio.wait_for(watcher, 120)
        with contextlib.suppress(TimeoutError):  # a shortfall is reported, not hidden
            await asyncio.wait_for(all_seen.wait(), 60)
        cpu_after, machine_after = meter.sample(), _machine_busy()
        projection_batches = await _projection_batches(ports["contacts"])
        await consumer.stop()
        await listener.close()

        progress("unsubscribe: broker round trip floor")
        floor = await _floor(broker.bootstrap, prefix, count)
    finally:
        stop(processes)
        broker.stop()
        postgres.stop()

    topic_lat = [on_topic[c] - sent[c] for c in on_topic if c in sent]
    contacts_lat = [in_contacts[c] - sent[c] for c in in_contacts if c in sent]
    relay_lat = [on_topic[c] - answered_at[c] for c in on_topic if c in answered_at]
    projection_lat = [in_contacts[c] - on_topic[c] for c in in_contacts if c in on_topic]
    data: dict[str, Any] = {
        "requests": count,
        "achieved_rate": round(achieved, 1),
        "http_p50_ms": ms(percentile(answered, 50)),
        "http_p99_ms": ms(percentile(answered, 99)),
        "topic_p50_ms": ms(percentile(topic_lat, 50)),
        "topic_p99_ms": ms(percentile(topic_lat, 99)),
        "contacts_p50_ms": ms(percentile(contacts_lat, 50)),
        "contacts_p99_ms": ms(percentile(contacts_lat, 99)),
        "contacts_seen": len(contacts_lat),
        "floor_p50_ms": ms(percentile(floor, 50)),
        "floor_p99_ms": ms(percentile(floor, 99)),
        # diagnostics: 200 → on the topic (the outbox relay and the broker), and where the
        # CPU went from the first POST until contacts showed the last change.
        "relay_p50_ms": ms(percentile(relay_lat, 50)),
        "relay_p99_ms": ms(percentile(relay_lat, 99)),
        # on the topic (as this process's consumer saw it) → visible in contacts, and
        # contacts' suppression.changes batches (its /metrics)
        "projection_p50_ms": ms(percentile(projection_lat, 50)),
        "projection_p99_ms": ms(percentile(projection_lat, 99)),
        "projection_batches": projection_batches,
        "cpu_us_per_request": {
            name: round((cpu_after[1][name] - cpu_before[1][name]) / count * 1e6) for name in pids
        },
        "machine_busy_pct": round(
            100 * (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1]), 1
        ),
        "loadavg": [loadavg_before, _loadavg()],
    }
    p99 = percentile(contacts_lat, 99)
    return [
        Result(
            "unsubscribe → suppression.changes",
            f"p50 {data['topic_p50_ms']} / p99 {data['topic_p99_ms']} ms "
            f"(HTTP p99 {data['http_p99_ms']} ms, {achieved:.0f} req/s)",
            f"broker p50 {data['floor_p50_ms']} / p99 {data['floor_p99_ms']} ms",
            "p99 < 100 ms",
            percentile(topic_lat, 99) < 0.1,
            data=data,
        ),
        Result(
            "unsubscribe → contacts projection",
            f"p50 {data['contacts_p50_ms']} / p99 {data['contacts_p99_ms']} ms",
            f"broker p50 {data['floor_p50_ms']} / p99 {data['floor_p99_ms']} ms",
            "p99 < 100 ms",
            p99 < 0.1 and len(contacts_lat) == count,
            data=data,
        ),
    ]


if __name__ == "__main__":
    import tempfile

    from bench.report import table

    results = asyncio.run(run(Path(tempfile.mkdtemp(prefix="tayori-bench-"))))
    print(table(results))
    for result in results:
        print(result.data)
