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
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import asyncpg
from aiokafka import AIOKafkaConsumer

from bench.processes import ready, start, stop
from bench.report import Result, n, progress, rate
from libs.common import avro, db
from libs.common.kafka import ensure_topics
from libs.common.render import CampaignMessage
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


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` fields after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """User + system CPU of a process (every thread); ``tree``: with its live children and
    the children it reaped (PostgreSQL's backends are children of the postmaster)."""
    try:
        fields = _stat(pid)
    except FileNotFoundError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if tree:
        ticks += int(fields[13]) + int(fields[14])
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    child = _stat(int(entry.name))
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if int(child[1]) == pid:
                    ticks += int(child[11]) + int(child[12])
    return ticks / _TICKS


class CpuMeter:
    """CPU seconds of named processes, sampled together."""

    def __init__(self, pids: dict[str, int], trees: frozenset[str] = frozenset()) -> None:
        self.pids = pids
        self.trees = trees

    def sample(self) -> tuple[float, dict[str, float]]:
        return time.perf_counter(), {
            name: cpu_seconds(pid, tree=name in self.trees) for name, pid in self.pids.items()
        }


def cpu_per_message(
    idle: tuple[tuple[float, dict[str, float]], tuple[float, dict[str, float]]],
    start: tuple[float, dict[str, float]],
    end: tuple[float, dict[str, float]],
    first_result: float,
    messages: int,
) -> dict[str, float]:
    """µs of CPU per message of each process between ``start`` and ``end``, less what the
    process burns idle (its rate over ``idle``) until the first result."""
    (idle_from, idle_a), (idle_to, idle_b) = idle
    waited = max(0.0, first_result - start[0])
    out = {}
    for name, used in end[1].items():
        idle_rate = (idle_b[name] - idle_a[name]) / (idle_to - idle_from)
        busy = used - start[1][name] - idle_rate * waited
        out[name] = round(busy / messages * 1e6, 1)
    return out


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


async def _seed(dsn: str, count: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        group = await conn.fetchval(
            "INSERT INTO contacts.contact_group (kind, name) VALUES ('group', 'bench') RETURNING id"
        )
        await conn.copy_records_to_table(
            "contact",
            schema_name="contacts",
            columns=["email", "name"],
            records=[(f"u{i}@example.jp", f"顧客 {i}") for i in range(count)],
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
    scheduler: Api, group: int, watcher: asyncio.Future[None], meter: CpuMeter
) -> tuple[dict[str, Any], float, tuple[float, dict[str, float]]]:
    """Create, reserve and send the campaign: its final state, how long reserving took and
    the CPU sample taken when the reservation was done."""
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
    await asyncio.wait_for(watcher, 900)
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


async def pipeline(root: Path, count: int) -> dict[str, Any]:
    """Send a ``count``-recipient campaign end to end; what was measured."""
    postgres = EmbeddedPostgres(root / "campaign-pg")
    broker = EmbeddedBroker(free_port(), log_path=root / "campaign-broker.log")
    sink_port = free_port()
    sink_log = root / "campaign-sink.log"
    sink = smtp_sink(sink_port, sink_log)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        dsn = await postgres.create_database("tayori")
        for schema, migrations in (
            ("contacts", CONTACTS_MIGRATIONS),
            ("scheduler", SCHEDULER_MIGRATIONS),
            ("sender", SENDER_MIGRATIONS),
        ):
            await db.migrate(dsn, schema, migrations)
        prefix = f"c{uuid.uuid4().hex[:8]}."
        await ensure_topics(broker.bootstrap, prefix)
        progress(f"campaign: loading {count:,} contacts")
        group = await _seed(dsn, count)
        ports = {name: free_port() for name in ("contacts", "scheduler", "sender")}
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "KAFKA_BOOTSTRAP": broker.bootstrap,
            "KAFKA_TOPIC_PREFIX": prefix,
            "KAFKA_SESSION_TIMEOUT_MS": "1000",
            "TAYORI_ADMIN_TOKEN": ADMIN,
            "LOG_LEVEL": "warning",
            "CONTACTS_URL": f"http://127.0.0.1:{ports['contacts']}",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(sink_port),
            "SMTP_CONNECTIONS": str(CONNECTIONS),
            # The benchmark does not wait out the 3-minute minimum lead of F-22.
            "SCHEDULER_MIN_LEAD_SECONDS": "2",
        }
        for name, port in ports.items():
            processes.append(start(name, env, port, root / f"campaign-{name}.log"))

        results = AIOKafkaConsumer(
            topic_name(Topic.DELIVERY_RESULTS, prefix),
            bootstrap_servers=broker.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await results.start()
        outcomes: dict[str, int] = {}
        seen: set[int] = set()
        times: list[float] = []
        pids = {name: process.pid for name, process in zip(ports, processes, strict=True)}
        postmaster = (root / "campaign-pg" / "postmaster.pid").read_text().split()[0]
        pids |= {"postgres": int(postmaster), "broker": broker.process.pid, "sink": sink.pid}
        meter = CpuMeter(pids, frozenset({"postgres"}))
        finished: list[tuple[float, dict[str, float]]] = []

        async def watch() -> None:
            await _count_results(results, count, seen, outcomes, times)
            finished.append(meter.sample())

        watcher = asyncio.ensure_future(watch())
        try:
            async with aiohttp.ClientSession() as session:
                for port in ports.values():
                    await ready(session, port)
                idle_from = meter.sample()
                await asyncio.sleep(IDLE_SECONDS)
                idle = (idle_from, meter.sample())
                state, reserve_seconds, reserved = await _send_campaign(
                    Api(session, ports["scheduler"]), group, watcher, meter
                )
        finally:
            watcher.cancel()
            await results.stop()
    finally:
        stop(processes)
        sink.terminate()
        sink.wait(10)
        broker.stop()
        postgres.stop()
    elapsed = times[-1] - times[0] if len(times) > 1 else float("nan")
    # When each tenth of the results had arrived (s after the first): a slow start or tail
    # shows here.
    tenths = [round(times[len(times) * k // 10 - 1] - times[0], 1) for k in range(1, 11)]
    cpu = cpu_per_message(idle, reserved, finished[0], times[0], count)
    return {
        "cpu_us_per_msg": cpu,
        "tenths_seconds": tenths,
        "recipients": count,
        "outcomes": outcomes,
        "sink_received": sink_count(sink_log),
        "reserve_seconds": round(reserve_seconds, 1),
        "send_seconds": round(elapsed, 1),
        "rate": rate(count, elapsed),
        "final_status": state["status"],
        "counters": {k: state.get(k) for k in ("planned", "success", "error", "unsent")},
    }


async def run(root: Path, recipients: int = RECIPIENTS) -> list[Result]:
    progress(f"campaign: raw aiosmtplib ceiling, {RAW_MESSAGES:,} messages")
    ceiling, raw_received, raw_cpu = await raw_ceiling(root)
    measured = await pipeline(root, recipients)
    ratio = measured["rate"] / ceiling
    data = {
        **measured,
        "rate": round(measured["rate"], 1),
        "ceiling_rate": round(ceiling, 1),
        "ceiling_received": raw_received,
        "ceiling_cpu_us_per_msg": raw_cpu,
        "connections": CONNECTIONS,
    }
    complete = measured["sink_received"] == recipients == measured["outcomes"].get("sent")
    sender_cpu = measured["cpu_us_per_msg"]["sender"]
    return [
        Result(
            f"campaign {recipients:,} → smtp-sink",
            f"{n(measured['rate'])} msgs/s ({measured['sink_received']:,} received),"
            f" sender CPU {sender_cpu:.0f} µs/msg",
            f"raw aiosmtplib {n(ceiling)} msgs/s ({CONNECTIONS} connections),"
            f" CPU {raw_cpu['client']:.0f} µs/msg",
            "≥ 80% and ≥ 2,000/s",
            complete and ratio >= 0.8 and measured["rate"] >= 2000,
            ratio=ratio,
            data=data,
        )
    ]


if __name__ == "__main__":
    import sys
    import tempfile

    from bench.report import table

    count = int(sys.argv[1]) if len(sys.argv) > 1 else RECIPIENTS
    results = asyncio.run(run(Path(tempfile.mkdtemp(prefix="tayori-bench-")), count))
    print(table(results))
    for result in results:
        print(result.data)
