"""Logs that follow a request (issue 19 item 8), on real service processes whose output is
kept in files, as an operator reads it:

- one unsubscribe with a caller's ``traceparent``: its trace id is on suppression's access
  line and its own line, in the ``traceparent`` header of the suppression.changes record it
  published, and on the line of contacts' consumer that applied that record — one grep;
- a service started while PostgreSQL is unreachable writes one JSON line per attempt
  (every line of its output is JSON), and starts once the database is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from libs.common import avro, trace
from libs.common.mail.unsubscribe import UnsubscribeLinks, UnsubscribeTarget
from libs.common.topics import Topic
from tayori.embedded import free_port
from tests.conftest import ADMIN_TOKEN, Stack, eventually, service_environ

ROOT = Path(__file__).resolve().parents[2]
KEYS = "t1:trace-test-signing-secret"
CALLER_TRACE = "5d0c9e3a8f6b4a21b7e4c3d2a1f0e9d8"
CALLER = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"
ONE_CLICK = "List-Unsubscribe=One-Click"


class Process:
    """``tayori <service>`` as a process of its own, its output (stdout and stderr) in a file."""

    def __init__(self, name: str, log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        self.port = int(env["HTTP_PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tayori", name],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def lines(self) -> list[dict[str, Any]]:
        """Every line it wrote, each parsed as JSON (a line that is not fails the test)."""
        parsed = []
        for number, line in enumerate(self.log.read_text().splitlines(), 1):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{self.log.name}:{number} is not JSON: {line!r}") from None
        return parsed

    async def ready(self, session: aiohttp.ClientSession) -> None:
        async def answers() -> bool:
            assert self.proc.poll() is None, (
                f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )
            try:
                async with session.get(f"{self.base}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(answers, timeout=120)

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return await asyncio.to_thread(self.proc.wait)


def service_env(stack: Stack, database: str, prefix: str, **extra: str) -> dict[str, str]:
    return service_environ(
        stack, database, prefix, **{"TAYORI_SIGNING_KEYS": KEYS, "LOG_LEVEL": "debug", **extra}
    )


@contextlib.asynccontextmanager
async def processes(*started: Process) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for process in started:
            await process.stop()


def traced(lines: list[dict[str, Any]], trace_id: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("trace_id") == trace_id]


async def test_one_unsubscribe_is_followed_across_services_by_its_trace_id(
    stack: Stack, database: str, prefix: str, kafka: Any, tmp_path: Path
) -> None:
    suppression = Process(
        "suppression", tmp_path / "suppression.log", service_env(stack, database, prefix)
    )
    contacts = Process("contacts", tmp_path / "contacts.log", service_env(stack, database, prefix))
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with processes(suppression, contacts), aiohttp.ClientSession(headers=auth) as session:
        await suppression.ready(session)
        await contacts.ready(session)

        async def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
            async with session.post(base + path, json=body) as response:
                assert response.status in (200, 201, 202), await response.text()
                return await response.json()

        group = (await post(contacts.base, "/v1/groups", {"name": "追跡 / trace"}))["id"]
        reader = (await post(contacts.base, "/v1/contacts", {"email": "tsuiseki@example.jp"}))["id"]
        url = f"{contacts.base}/v1/groups/{group}/members"
        async with session.post(url, json={"contact_ids": [reader]}) as response:
            assert response.status in (200, 201, 202), await response.text()
            adding = response.headers["traceparent"]

        async def joined() -> bool:
            url = f"{suppression.base}/v1/memberships/{reader}/{group}"
            async with session.get(url) as response:
                return response.status == 200

        await eventually(joined)

        token = UnsubscribeLinks(KEYS, "https://mail.example.jp").token(
            UnsubscribeTarget(reader, group, "camp-trace")
        )
        async with aiohttp.ClientSession() as public:
            async with public.post(
                f"{suppression.base}/u/{token}",
                data=ONE_CLICK,
                headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "traceparent": CALLER,
                },
            ) as response:
                assert response.status == 200
                answered = response.headers["traceparent"]
                request_id = response.headers["X-Request-Id"]
        assert trace.trace_id(answered) == CALLER_TRACE
        assert request_id == CALLER_TRACE  # no X-Request-Id given: the trace id names it

        # the record suppression published carries the trace in its Kafka header; the join
        # before it, the trace of contacts' request that added the member
        def unsubscribed(records: list[Any]) -> bool:
            return CALLER_TRACE in {_trace_id(r) for r in records}

        records = await kafka.read(Topic.SUPPRESSION_CHANGES, until=unsubscribed, raw=True)
        states = [
            (avro.decode(Topic.SUPPRESSION_CHANGES, r.value, r.headers)["state"], _trace_id(r))
            for r in records
            if r.key == str(reader).encode()
        ]
        assert states == [("deliverable", trace.trace_id(adding)), ("unsubscribed", CALLER_TRACE)]

        # contacts' consumer that applied it logged under the same trace id
        async def applied() -> list[dict[str, Any]]:
            return [
                line
                for line in traced(contacts.lines(), CALLER_TRACE)
                if line["event"] == "records_handling"
                and line["topic"] == Topic.SUPPRESSION_CHANGES.value
            ]

        (line,) = await eventually(applied)
        assert line["service"] == "contacts" and CALLER_TRACE in line["trace_ids"]

        # suppression: the access line and the view's own line, in the same trace
        lines = traced(suppression.lines(), CALLER_TRACE)
        access = [line for line in lines if line["event"] == "http_request"]
        assert access == [
            {
                **access[0],
                "method": "POST",
                "route": "/u/{token}",
                "status": 200,
                "request_id": CALLER_TRACE,
                "service": "suppression",
                "level": "info",
            }
        ]
        assert access[0]["duration_ms"] >= 0
        assert "unsubscribe_request" in {line["event"] for line in lines}

        # one grep over both logs finds the request in each, and nothing logs the token
        both = suppression.log.read_text() + contacts.log.read_text()
        found = {json.loads(line)["service"] for line in both.splitlines() if CALLER_TRACE in line}
        assert found == {"suppression", "contacts"}
        assert token not in both
    assert all(line["level"] != "error" for line in suppression.lines() + contacts.lines())


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def postgres_on_tcp(stack: Stack, port: int) -> AsyncIterator[None]:
    """The embedded PostgreSQL (a Unix socket) reachable on 127.0.0.1:``port`` from now on."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(stack.postgres.dsn()).query)
    socket_path = f"{query['host'][0]}/.s.PGSQL.{query.get('port', ['5432'])[0]}"
    pumps: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
        for pump in (_forward(reader, up_writer), _forward(up_reader, writer)):
            task = asyncio.ensure_future(pump)
            pumps.add(task)
            task.add_done_callback(pumps.discard)

    server = await asyncio.start_server(connected, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for task in list(pumps):
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await server.wait_closed()


async def test_a_service_started_with_postgres_unreachable_logs_a_line_per_attempt_and_starts(
    stack: Stack, database: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    parts = urllib.parse.urlsplit(database)
    user = urllib.parse.parse_qs(parts.query).get("user", [parts.username or "postgres"])[0]
    name = parts.path.lstrip("/")
    over_tcp = f"postgresql://{user}@127.0.0.1:{port}/{name}"
    env = service_env(stack, over_tcp, prefix, LOG_LEVEL="info")
    suppression = Process("suppression", tmp_path / "suppression.log", env)
    async with processes(suppression), aiohttp.ClientSession() as session:

        async def attempts() -> list[dict[str, Any]]:
            assert suppression.proc.poll() is None, suppression.log.read_text()
            return [
                line
                for line in suppression.lines()
                if line["event"] == "transient_error_retry"
                and line["operation"] == "connect:database"
            ]

        await eventually(lambda: _at_least(attempts, 3), timeout=120)
        async with postgres_on_tcp(stack, port):
            await suppression.ready(session)
            assert await suppression.stop() == 0
    lines = suppression.lines()  # every line JSON, or this fails
    waited = [line for line in lines if line["event"] == "transient_error_retry"]
    assert len(waited) >= 3
    for line in waited:
        assert line["level"] == "warning" and line["service"] == "suppression"
        assert "Connection refused" in line["error"] or "ConnectionRefused" in line["error"]
        assert line["delay"] >= 0
    events = [line["event"] for line in lines]
    assert events.index("service_started") > events.index("transient_error_retry")
    assert "service_stopped" in events
    assert not [line for line in lines if line["level"] == "error"]
    assert "Traceback" not in suppression.log.read_text()


def _trace_id(record: Any) -> str | None:
    carried = trace.of_headers(record.headers)
    return None if carried is None else trace.trace_id(carried)


async def _at_least(lines: Any, count: int) -> bool:
    return len(await lines()) >= count


CAMPAIGN_TRACE = "0af7651916cd43dd8448eb211c80319c"


async def test_a_campaign_is_followed_from_its_reserve_request_to_the_results(
    scheduler: Any, contacts: Any, sender: Any, smtp_sink: Any, kafka: Any
) -> None:
    """The reserve request's trace rides on every record the campaign causes: the snapshot
    request, contacts' recipients, the released send requests and their content, the
    senders' results and progress answers."""
    from tests.integration.test_scheduler import (
        campaign_body,
        category,
        fake_clock,
        group,
        people,
        status_of,
    )

    clock = fake_clock(scheduler)
    members = await group(contacts)
    await people(contacts, 12, members)
    body = campaign_body(await category(scheduler), clock, target={"group_id": members})
    campaign = await scheduler.api.ok("POST", "/v1/campaigns", body)
    await scheduler.api.ok(
        "POST",
        f"/v1/campaigns/{campaign['id']}/reserve",
        headers={"traceparent": f"00-{CAMPAIGN_TRACE}-00f067aa0ba902b7-01"},
    )
    await status_of(scheduler, campaign["id"], "scheduled")
    clock.advance(minutes=10)
    await status_of(scheduler, campaign["id"], "aggregating")
    assert len(smtp_sink.messages()) == 12

    for topic, at_least in (
        (Topic.SNAPSHOT_REQUESTS, 1),
        (Topic.CAMPAIGN_RECIPIENTS, 1),
        (Topic.CAMPAIGN_CONTENT, 1),
        (Topic.SEND_REQUESTS, 12),
        (Topic.SEND_PROGRESS, 0),
        (Topic.DELIVERY_RESULTS, 12),
    ):
        records = await kafka.read_to_end(topic.value)
        ours = [
            r
            for r in records
            if avro.decode(topic, r.value, r.headers).get("campaign_id") == campaign["id"]
        ]
        assert len(ours) >= at_least, topic
        assert all(_trace_id(r) == CAMPAIGN_TRACE for r in ours), topic
