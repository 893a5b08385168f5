"""Campaign send rate (issue 4): a 100,000-recipient campaign through scheduler → Kafka →
sender → Postfix ``smtp-sink``, beside raw aiosmtplib sending pre-built bytes to the same
kind of sink with the same number of connections, in the same run.

contacts, scheduler and sender run as their own processes (`tayori <service>`) on the
embedded PostgreSQL (default durability) and broker, as in `tayori dev`. The contacts are
loaded with COPY; the campaign is created, reserved (contacts streams the frozen list to the
scheduler) and released through the real APIs. The figure is recipients / (last
``delivery.results`` record − first), counted by a consumer in this process and checked
against the count ``smtp-sink`` itself reports.

The ceiling gets the same machine share: the raw client runs while the broker and
PostgreSQL sit idle, so it is an upper bound our pipeline (which also consumes, writes its
ledger and publishes results) can only approach.

Beside the rates, CPU per message of every process (user + system time from ``/proc``),
which other work on a shared machine skews much less than msgs/s: the sender's next to the
raw client's (its bench process's ``process_time``) for the same sink. The window is from
the end of the reservation to the last result, less each process's idle rate (measured for
``IDLE_SECONDS`` before the campaign) times the wait until the first result.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.cpu import CpuMeter, Sample, cpu_per_message, cpu_seconds, idle_percent
from bench.processes import ready, start, stop
from bench.report import Result, n, progress, rate
from libs.common import avro, db
from libs.common.kafka import ensure_topics
from libs.common.mail.content import BY_REFERENCE, content_id
from libs.common.mail.render import CampaignMessage
from libs.common.topics import Topic, topic_name
from services.contacts.app import MIGRATIONS as CONTACTS_MIGRATIONS
from services.scheduler.app import MIGRATIONS as SCHEDULER_MIGRATIONS
from services.sender.app import MIGRATIONS as SENDER_MIGRATIONS
from tayori.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, wait_for_port

RECIPIENTS = 100_000
RAW_MESSAGES = 30_000
#: seconds the stack is watched doing nothing, for each process's idle CPU rate.
IDLE_SECONDS = 3.0
#: SMTP connections: the sender's pool and the raw client alike.
CONNECTIONS = 32
ADMIN = "bench-admin-token"
FROM = "news@tayori.example.jp"
SUBJECT = "<#name>様 11月のおすすめ情報"
#: ~5 KB of HTML (with its text part), the message size of shared/LIMITS.md.
BODY = (
    "<html><body><p><#name>様</p>"
    + "<p>いつもご愛顧いただきありがとうございます。今月のおすすめをお届けします。</p>" * 30
    + '<p><a href="<#unsubscribe_url>">配信停止</a></p></body></html>'
)


def smtp_sink(port: int, log: Path) -> subprocess.Popen[bytes]:
    """Postfix's ``smtp-sink`` on loopback; ``-c`` counts messages into ``log``."""
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(binary):
        raise SystemExit("campaign benchmark: needs smtp-sink (Debian package postfix)")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, "-c", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for_port("127.0.0.1", port, timeout=10, proc=process)
    return process


def sink_count(log: Path) -> int:
    """Messages the sink counted (its ``-c`` counter's last value)."""
    found = re.findall(rb"mesg=(\d+)", log.read_bytes())
    return int(found[-1]) if found else 0


def sample_message() -> bytes:
    message = CampaignMessage(
        campaign_id=str(uuid.uuid4()), from_address=FROM, subject=SUBJECT, format="html", body=BODY
    )
    return message.render(
        {"name": "山田 花子", "unsubscribe_url": "https://mail.example.com/u/" + "x" * 120},
        to="u1@example.jp",
        contact_id=1,
    )


async def raw_ceiling(root: Path) -> tuple[float, int, dict[str, float]]:
    """msgs/s of aiosmtplib sending one pre-built message over CONNECTIONS connections, and
    CPU µs per message of that client (this process) and of the sink."""
    port = free_port()
    log = root / "raw-sink.log"
    sink = smtp_sink(port, log)
    data = sample_message()
    try:

        async def worker(count: int) -> None:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
            await client.connect()
            for i in range(count):
                await client.sendmail(FROM, [f"u{i}@example.jp"], data)
            await client.quit()

        sink_cpu = cpu_seconds(sink.pid)
        cpu = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(RAW_MESSAGES // CONNECTIONS) for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        sink_cpu = cpu_seconds(sink.pid) - sink_cpu
    finally:
        sink.terminate()
        sink.wait(10)
    sent = RAW_MESSAGES // CONNECTIONS * CONNECTIONS
    used = {"client": round(cpu / sent * 1e6, 1), "sink": round(sink_cpu / sent * 1e6, 1)}
    return rate(sent, elapsed), sink_count(log), used


def _one_domain(i: int) -> str:
    return f"u{i}@example.jp"


async def _seed(dsn: str, count: int, address: Callable[[int], str] = _one_domain) -> int:
    """``count`` deliverable contacts in one group, the i-th at ``address(i)``."""
    # contacts' search path, as its own connections have it: its triggers name its
    # functions without the schema (membership_flags_changed → refresh_membership_flags).
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "contacts"})
    try:
        group = await conn.fetchval(
            "INSERT INTO contacts.contact_group (kind, name) VALUES ('group', 'bench') RETURNING id"
        )
        await conn.copy_records_to_table(
            "contact",
            schema_name="contacts",
            columns=["email", "name"],
            records=[(address(i), f"顧客 {i}") for i in range(count)],
        )
        await conn.execute(
            "INSERT INTO contacts.membership (contact_id, group_id, state, method)"
            " SELECT id, $1, 'deliverable', 'system' FROM contacts.contact",
            group,
        )
        return int(group)
    finally:
        await conn.close()


class Api:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def __call__(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(
            method, self.base + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as response:
            answer = await response.json()
            if response.status >= 300:
                raise RuntimeError(f"{method} {path} → {response.status}: {answer}")
            return answer


async def _send_campaign(
    scheduler: Api,
    group: int,
    watcher: asyncio.Future[None],
    meter: CpuMeter,
    timeout: float = 900.0,
) -> tuple[dict[str, Any], float, Sample]:
    """Create, reserve and send the campaign: its final state, how long reserving took and
    the CPU sample taken when the reservation was done. ``timeout``: seconds the results
    may take after the reservation."""
    category = await scheduler(
        "POST",
        "/v1/categories",
        {
            "name": "bench",
            "window_start": "00:00",
            "window_end": "00:00",  # start == end: all day
            "time_zone": "Asia/Tokyo",
        },
    )
    campaign = await scheduler(
        "POST",
        "/v1/campaigns",
        {
            "name": "bench",
            "category_id": category["id"],
            "target": {"group_id": group},
            "from_address": FROM,
            "subject": SUBJECT,
            "format": "html",
            "body": BODY,
            "scheduled_at": (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)).isoformat(),
        },
    )
    path = f"/v1/campaigns/{campaign['id']}"
    reserved_at = time.perf_counter()
    await scheduler("POST", path + "/reserve")
    # Another process's state: polling its API is the only way to see it.
    while (state := await scheduler("GET", path))["status"] in ("draft", "reserving"):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    reserve_seconds = time.perf_counter() - reserved_at
    reserved = meter.sample()
    progress(f"campaign: {state['status']} after {reserve_seconds:.1f}s, sending")
    await asyncio.wait_for(watcher, timeout)
    while (state := await scheduler("GET", path))["status"] == "sending":  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    return state, reserve_seconds, reserved


async def _count_results(
    results: AIOKafkaConsumer,
    count: int,
    seen: set[int],
    outcomes: dict[str, int],
    times: list[float],
) -> None:
    """Read ``delivery.results`` until ``count`` recipients have one: each recipient's first
    result counted by outcome, with the time it arrived."""
    while len(seen) < count:
        for records in (await results.getmany(timeout_ms=500)).values():
            now = time.perf_counter()
            for record in records:
                result = avro.decode(Topic.DELIVERY_RESULTS, record.value, record.headers)
                if result["contact_id"] in seen:
                    continue
                seen.add(result["contact_id"])
                outcomes[result["outcome"]] = outcomes.get(result["outcome"], 0) + 1
                times.append(now)


@dataclass
class _Stack:
    """A fresh PostgreSQL, broker and ``smtp-sink`` for one measurement, and how to reach
    them: the services' environment, the processes to meter, a reader of the results."""

    root: Path
    name: str
    dsn: str
    env: dict[str, str]
    pids: dict[str, int]
    sink_log: Path
    results: AIOKafkaConsumer
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def start(
        self, ports: dict[str, int], count: int
    ) -> tuple[_Results, asyncio.Future[None], tuple[Sample, Sample]]:
        """Start ``tayori <name>`` for each name, serving HTTP on its port, and wait until
        each is ready; their idle CPU; then a watcher of ``count`` results."""
        for name, port in ports.items():
            process = start(name, self.env, port, self.root / f"{self.name}-{name}.log")
            self.processes.append(process)
            self.pids[name] = process.pid
        async with aiohttp.ClientSession() as session:
            for port in ports.values():
                await ready(session, port)
        arrived = _Results(count, CpuMeter(self.pids, frozenset({"postgres"})))
        idle = await _idle(arrived.meter)
        return arrived, asyncio.ensure_future(arrived.watch(self.results)), idle


@asynccontextmanager
async def _stack(
    root: Path,
    name: str,
    schemas: dict[str, Path],
    sink_factory: Callable[[int, Path], subprocess.Popen[bytes]] = smtp_sink,
) -> AsyncIterator[_Stack]:
    """Everything a measurement runs on, new (files under ``root`` named after ``name``),
    with ``schemas`` migrated; stopped after. ``sink_factory(port, log)`` starts the SMTP
    server the sender relays to (smtp-sink; bench/domains.py's relay); it is stopped with
    SIGTERM."""
    postgres = EmbeddedPostgres(root / f"{name}-pg")
    broker = EmbeddedBroker(free_port(), log_path=root / f"{name}-broker.log")
    sink_port = free_port()
    sink_log = root / f"{name}-sink.log"
    sink = sink_factory(sink_port, sink_log)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        dsn = await postgres.create_database("tayori")
        for schema, migrations in schemas.items():
            await db.migrate(dsn, schema, migrations)
        prefix = f"c{uuid.uuid4().hex[:8]}."
        await ensure_topics(broker.bootstrap, prefix)
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            **broker.profile(),
            "KAFKA_TOPIC_PREFIX": prefix,
            "KAFKA_SESSION_TIMEOUT_MS": "1000",
            "TAYORI_ADMIN_TOKEN": ADMIN,
            "LOG_LEVEL": "warning",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink_port),
            "SMTP_CONNECTIONS": str(CONNECTIONS),
        }
        postmaster = (root / f"{name}-pg" / "postmaster.pid").read_text().split()[0]
        results = AIOKafkaConsumer(
            topic_name(Topic.DELIVERY_RESULTS, prefix),
            bootstrap_servers=broker.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await results.start()
        try:
            pids = {"postgres": int(postmaster), "broker": broker.process.pid, "sink": sink.pid}
            yield _Stack(root, name, dsn, env, pids, sink_log, results, processes)
        finally:
            await results.stop()
    finally:
        stop(processes)
        sink.terminate()
        sink.wait(10)
        broker.stop()
        postgres.stop()


@dataclass
class _Results:
    """``delivery.results`` as they arrive: outcomes, arrival times, a CPU sample at the end."""

    count: int
    meter: CpuMeter
    outcomes: dict[str, int] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    finished: list[Sample] = field(default_factory=list)

    async def watch(self, results: AIOKafkaConsumer) -> None:
        await _count_results(results, self.count, set(), self.outcomes, self.times)
        self.finished.append(self.meter.sample())

    def figures(
        self,
        idle: tuple[Sample, Sample],
        start: Sample,
        sink_log: Path,
    ) -> dict[str, Any]:
        times = self.times
        elapsed = times[-1] - times[0] if len(times) > 1 else float("nan")
        return {
            "rate": rate(self.count, elapsed),
            "cpu_us_per_msg": cpu_per_message(idle, start, self.finished[0], times[0], self.count),
            # When each tenth of the results had arrived (s after the first): a slow start or
            # tail shows here.
            "tenths_seconds": [
                round(times[len(times) * k // 10 - 1] - times[0], 1) for k in range(1, 11)
            ],
            # Each process's CPU while the stack idled (% of a core): polls, heartbeats and
            # ticks that go on while sending too, and are in the µs per message above.
            "idle_cpu_percent": idle_percent(idle),
            "recipients": self.count,
            "outcomes": self.outcomes,
            "sink_received": sink_count(sink_log),
            "send_seconds": round(elapsed, 1),
        }


async def _idle(meter: CpuMeter) -> tuple[Sample, Sample]:
    """Two CPU samples ``IDLE_SECONDS`` apart while nothing is sent."""
    idle_from = meter.sample()
    await asyncio.sleep(IDLE_SECONDS)
    return idle_from, meter.sample()


async def pipeline(root: Path, count: int) -> dict[str, Any]:
    """Send a ``count``-recipient campaign end to end; what was measured."""
    schemas = {
        "contacts": CONTACTS_MIGRATIONS,
        "scheduler": SCHEDULER_MIGRATIONS,
        "sender": SENDER_MIGRATIONS,
    }
    async with _stack(root, "campaign", schemas) as stack:
        progress(f"campaign: loading {count:,} contacts")
        group = await _seed(stack.dsn, count)
        ports = {name: free_port() for name in ("contacts", "scheduler", "sender")}
        stack.env["CONTACTS_URL"] = f"http://127.0.0.1:{ports['contacts']}"
        # The benchmark does not wait out the 3-minute minimum lead of F-22.
        stack.env["SCHEDULER_MIN_LEAD_SECONDS"] = "2"
        arrived, watcher, idle = await stack.start(ports, count)
        try:
            async with aiohttp.ClientSession() as session:
                state, reserve_seconds, reserved = await _send_campaign(
                    Api(session, ports["scheduler"]), group, watcher, arrived.meter
                )
        finally:
            watcher.cancel()
        figures = arrived.figures(idle, reserved, stack.sink_log)
    return {
        **figures,
        "reserve_seconds": round(reserve_seconds, 1),
        "final_status": state["status"],
        "counters": {k: state.get(k) for k in ("planned", "success", "error", "unsent")},
    }


def _requests(count: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The campaign.content record and ``count`` send.requests naming it, as the scheduler
    writes them for the benchmark's campaign (one group, merge values as contacts gives)."""
    campaign_id = str(uuid.uuid4())
    content = {
        "from_address": FROM,
        "from_name": None,
        "reply_to": None,
        "subject": SUBJECT,
        "format": "html",
        "body": BODY,
        "coupon_url": None,
        "track_opens": True,
        "track_clicks": True,
    }
    named = content_id(campaign_id, content)
    now = dt.datetime.now(dt.UTC)
    record = {"content_id": named, "campaign_id": campaign_id, "content": content}
    requests = [
        {
            "request_id": str(uuid.uuid4()),
            "campaign_id": campaign_id,
            "step_id": None,
            "contact_id": i + 1,
            "email": f"u{i}@example.jp",
            "group_id": 1,
            "include_unsubscribed": False,
            "merge_values": {"name": f"顧客 {i}"},
            "content": BY_REFERENCE,
            "content_id": named,
            "attempt": 1,
            "released_at": now,
            "test": False,
        }
        for i in range(count)
    ]
    return {**record, "published_at": now}, requests


async def sender_alone(root: Path, count: int) -> dict[str, Any]:
    """The sender by itself: ``count`` send.requests of the benchmark's campaign written
    while it idles, delivered to a fresh smtp-sink, with no scheduler or contacts on the
    cores. Its msgs/s and CPU µs per message depend much less on what else runs."""
    async with _stack(root, "sender-alone", {"sender": SENDER_MIGRATIONS}) as stack:
        content, requests = _requests(count)
        producer = AIOKafkaProducer(
            bootstrap_servers=stack.env["KAFKA_BOOTSTRAP"],
            enable_idempotence=False,
            linger_ms=5,
        )
        await producer.start()
        try:
            prefix = stack.env["KAFKA_TOPIC_PREFIX"]

            async def produce(topic: Topic, key: str | int, value: bytes, headers: Any) -> Any:
                name = topic_name(topic, prefix)
                return await producer.send(name, value, key=str(key).encode(), headers=headers)

            data, headers = avro.encode(Topic.CAMPAIGN_CONTENT, content)
            await (await produce(Topic.CAMPAIGN_CONTENT, content["content_id"], data, headers))
            # Encoded before the clock starts: the sender's figures are not the bench's work.
            encoded = [(r["contact_id"], *avro.encode(Topic.SEND_REQUESTS, r)) for r in requests]
            arrived, watcher, idle = await stack.start({"sender": free_port()}, count)
            try:
                started = arrived.meter.sample()
                progress(f"campaign: {count:,} send requests straight to the sender")
                sent = [await produce(Topic.SEND_REQUESTS, *record) for record in encoded]
                await asyncio.gather(*sent)
                await asyncio.wait_for(watcher, 900)
            finally:
                watcher.cancel()
        finally:
            await producer.stop()
        return arrived.figures(idle, started, stack.sink_log)


async def run(root: Path, recipients: int = RECIPIENTS) -> list[Result]:
    progress(f"campaign: raw aiosmtplib ceiling, {RAW_MESSAGES:,} messages")
    ceiling, raw_received, raw_cpu = await raw_ceiling(root)
    ceiling_data = {
        "ceiling_rate": round(ceiling, 1),
        "ceiling_received": raw_received,
        "ceiling_cpu_us_per_msg": raw_cpu,
        "connections": CONNECTIONS,
    }
    ceiling_text = (
        f"raw aiosmtplib {n(ceiling)} msgs/s ({CONNECTIONS} connections),"
        f" CPU {raw_cpu['client']:.0f} µs/msg"
    )
    results = []
    for name, measure in (
        (f"campaign {recipients:,} → smtp-sink", pipeline),
        (f"sender alone, {recipients:,} requests → smtp-sink", sender_alone),
    ):
        measured = await measure(root, recipients)
        ratio = measured["rate"] / ceiling
        complete = measured["sink_received"] == recipients == measured["outcomes"].get("sent")
        sender_cpu = measured["cpu_us_per_msg"]["sender"]
        results.append(
            Result(
                name,
                f"{n(measured['rate'])} msgs/s ({measured['sink_received']:,} received),"
                f" sender CPU {sender_cpu:.0f} µs/msg",
                ceiling_text,
                "≥ 80% and ≥ 2,000/s",
                complete and ratio >= 0.8 and measured["rate"] >= 2000,
                ratio=ratio,
                data={**measured, "rate": round(measured["rate"], 1), **ceiling_data},
            )
        )
    return results


if __name__ == "__main__":
    import sys
    import tempfile

    from bench.report import table

    count = int(sys.argv[1]) if len(sys.argv) > 1 else RECIPIENTS
    results = asyncio.run(run(Path(tempfile.mkdtemp(prefix="tayori-bench-")), count))
    print(table(results))
    for result in results:
        print(result.data)
