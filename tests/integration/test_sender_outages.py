"""The sender through PostgreSQL and broker outages: it waits, comes back by itself, loses
nothing, and sends nothing twice beyond the crash bound (two per connection, ledger.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaError
from aiosmtpd.controller import Controller

from libs.common import avro
from libs.common.kafka import Publisher, ensure_topics, make_producer
from libs.common.metrics import sample_value
from libs.common.settings import CommonSettings
from libs.common.topics import Topic
from tayori.embedded import MaildirHandler, free_port
from tayori.ops import Failure
from tayori.ops import Kafka as OpsKafka
from tests.conftest import Kafka, Stack, eventually, running, within
from tests.integration.outage import OwnBroker, database_away
from tests.integration.test_sender import kept, publish_all, send_request

pytestmark = pytest.mark.integration


class HoldingAll(MaildirHandler):
    """Keeps every message, then holds its answer until ``release`` is set (by another
    thread: aiosmtpd runs in its own); ``held`` are the recipients kept so far."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.release = threading.Event()
        self.held: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        self.held.extend(envelope.rcpt_tos)
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
        return reply


def retries(operation: str) -> float:
    return (
        sample_value(
            "tayori_transient_retries_total", {"service": "sender", "operation": operation}
        )
        or 0
    )


async def _noop() -> None:
    return None


async def test_a_stop_while_the_database_is_away_ends_in_time_and_the_restart_resends(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """SIGTERM while PostgreSQL is away and outcomes wait to be recorded: the stop gives up
    on them after a few seconds instead of retrying for ever (the pod's grace period is
    30 s), leaving their rows claimed; the next sender sends those again, with the same
    Message-ID, and every recipient gets a result."""
    handler = HoldingAll(tmp_path / "relay")
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    relay = f"127.0.0.1:{controller.port}"
    connections = 2
    count = 8
    campaign = str(uuid.uuid4())
    await publish_all(kafka, [send_request(campaign, n) for n in range(1, count + 1)])
    try:
        async with running(
            "sender", stack, database, prefix, smtp_relays=relay, smtp_connections=connections
        ) as sender:

            async def holding() -> bool:
                return bool(handler.held)

            await eventually(holding)
            async with database_away(stack, database):
                before = retries("sender:ledger")
                handler.release.set()  # the relay answers; the ledger cannot record it

                async def recording_fails() -> bool:
                    return retries("sender:ledger") > before

                await eventually(recording_fails)
                await within(20, "the sender's stop", sender.runtime.stop())
                sender.runtime.stop = _noop  # stopped already
        async with running("sender", stack, database, prefix, smtp_relays=relay):

            async def answered() -> bool:
                results = await kafka.read_to_end(Topic.DELIVERY_RESULTS)
                return len({r["contact_id"] for r in results}) == count

            await eventually(answered)
    finally:
        handler.release.set()
        controller.stop()
    copies: dict[str, set[str]] = defaultdict(set)
    per_recipient: dict[str, int] = defaultdict(int)
    for mail in kept(handler):
        recipient = str(mail["X-Tayori-Envelope-To"])
        per_recipient[recipient] += 1
        copies[recipient].add(str(mail["Message-ID"]))
    assert set(per_recipient) == {f"c{n}@example.com" for n in range(1, count + 1)}
    assert all(len(ids) == 1 for ids in copies.values()), copies  # a resend is the same mail
    twice = sum(n - 1 for n in per_recipient.values())
    assert twice <= 2 * connections, per_recipient


#: the header of the records a test appends so that the broker serves the ones before them.
MARKER = ("tayori-test-marker", b"1")


async def all_requests_committed(settings: CommonSettings) -> bool:
    """Whether the sender committed every send request there is: it published their results
    and the broker acknowledged them (a batch is committed only after that)."""
    try:
        async with OpsKafka(settings) as ops:
            name = ops.name(Topic.SEND_REQUESTS)
            tps = await ops.partitions(name)
            bounds = await ops.bounds(tps)
            committed = await ops.committed(ops.group_id("sender.requests"), tps)
    except (KafkaError, Failure):
        return False
    return all(committed[tp] == end for tp, (_, end) in bounds.items())


async def sender_state(settings: CommonSettings, pool: Any) -> str:
    """What the sender did, for a failure message: its ledger rows per campaign and status,
    and its group's committed offset against the end of each send.requests partition (a
    committed offset at the end with a campaign's rows missing: requests skipped)."""
    rows = await pool.fetch(
        "SELECT campaign_id, status, count(*) AS n FROM send_ledger GROUP BY 1, 2 ORDER BY 1, 2"
    )
    ledger = [(r["campaign_id"][:8], r["status"], r["n"]) for r in rows]
    try:
        async with OpsKafka(settings) as ops:
            tps = await ops.partitions(ops.name(Topic.SEND_REQUESTS))
            bounds = await ops.bounds(tps)
            committed = await ops.committed(ops.group_id("sender.requests"), tps)
    except (KafkaError, Failure) as exc:
        return f"ledger {ledger}; send.requests offsets unknown ({exc!r})"
    offsets = {tp.partition: (committed[tp], end) for tp, (_, end) in bounds.items()}
    return f"ledger {ledger}; send.requests (committed, end) {offsets}"


async def results_behind_markers(
    kafka: Kafka,
    producer: Any,
    *,
    until: set[int],
    published: Callable[[], Awaitable[bool]],
) -> list[dict[str, Any]]:
    """``delivery.results`` from the beginning (markers left out) once a result of every
    contact in ``until`` is among them.

    Tansu after a restart can acknowledge a partition's records and report them in its end
    offset, yet serve them only once another record follows them; nothing follows the last
    results of a test, so a reader waiting for them (or for that end offset) could wait for
    ever (1 run in 6). Once the sender has ``published`` all it will, a marker record is
    appended to every partition every half second: whatever the sender's results are, a later
    record follows them. Not before: Tansu can give two records produced at once to one
    partition the same offset, serving one to a reader and the other to the next."""
    name = kafka.publisher.name(Topic.DELIVERY_RESULTS)

    async def mark() -> None:
        await eventually(published, interval=0.5)
        while True:
            # Every partition the topic has (a client may have had it created, with the
            # broker's default count, before the test created it again).
            # A first produce after the restart may be refused (UnknownError): next round.
            with contextlib.suppress(KafkaError):
                for partition in sorted(await producer.partitions_for(name)):
                    await producer.send_and_wait(name, b"", partition=partition, headers=[MARKER])
            await asyncio.sleep(0.5)

    def results(records: list[Any]) -> list[dict[str, Any]]:
        return [
            avro.decode(Topic.DELIVERY_RESULTS, r.value, r.headers)
            for r in records
            if MARKER not in (r.headers or ())
        ]

    last: list[Any] = []

    def complete(records: list[Any]) -> bool:
        last[:] = records
        return until <= {r["contact_id"] for r in results(records)}

    marker = asyncio.create_task(mark())
    try:
        records = await kafka.read(Topic.DELIVERY_RESULTS, until=complete, raw=True)
    except AssertionError:
        # What was read, per partition: (offset, contact or "marker").
        read: dict[int, list[tuple[int, Any]]] = defaultdict(list)
        for r in last:
            marked = MARKER in (r.headers or ())
            contact = "marker" if marked else results([r])[0]["contact_id"]
            read[r.partition].append((r.offset, contact))
        seen = {c for rows in read.values() for _, c in rows if c != "marker"}
        # Whether a new reader from the beginning finds them.
        again: list[Any] = []

        def missing_found(records: list[Any]) -> bool:
            again[:] = records
            return until - seen <= {r["contact_id"] for r in results(records)}

        with contextlib.suppress(AssertionError):
            await kafka.read(Topic.DELIVERY_RESULTS, until=missing_found, raw=True, timeout=10)
        found = [
            (r.partition, r.offset, c)
            for r in again
            if MARKER not in (r.headers or ())
            and (c := results([r])[0]["contact_id"]) in until - seen
        ]
        raise AssertionError(
            f"results of {sorted(until - seen)} never read; read {dict(read)};"
            f" a new reader found {found}"
        ) from None
    finally:
        marker.cancel()
        await asyncio.gather(marker, return_exceptions=True)
    return results(records)


async def test_results_whose_publication_fails_in_a_broker_restart_are_published_again(
    stack: Stack, database: str, prefix: str, tmp_path: Path
) -> None:
    """The broker restarts (and comes back empty, its topics created again) while a batch's
    mails are out and their results are to be published: the sender rides it out, publishes
    them on the new broker, goes on with the next requests, and sends no mail twice.

    (Tansu after a restart: the first produce to a partition is acknowledged but only
    fetchable once a later record follows it, and that later record's first produce
    fails with UnknownError, which the sender retries. The second campaign's results
    are those later records.)"""
    own = OwnBroker(stack, tmp_path / "broker.log")
    await ensure_topics(own.bootstrap, prefix, partitions=2)
    settings = CommonSettings(kafka_bootstrap=own.bootstrap, topic_prefix=prefix, service="test")
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    kafka = Kafka(own.stack, prefix, Publisher(settings, producer))
    handler = HoldingAll(tmp_path / "relay")
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    relay = f"127.0.0.1:{controller.port}"
    count = 6
    campaign = str(uuid.uuid4())
    await publish_all(kafka, [send_request(campaign, n) for n in range(1, count + 1)])
    await producer.stop()
    try:
        async with running(
            "sender",
            own.stack,
            database,
            prefix,
            kafka_bootstrap=own.bootstrap,
            smtp_relays=relay,
        ) as sender:

            async def holding() -> bool:
                return bool(handler.held)

            await eventually(holding)
            own.stop()
            handler.release.set()  # outcomes are recorded; their results cannot go out

            async def recorded() -> bool:
                done = await sender.runtime.pool.fetchval(
                    "SELECT count(*) FROM send_ledger WHERE status = 'done'"
                )
                return bool(done == count)

            await eventually(recorded)
            await own.start_again(prefix)
            producer = make_producer(settings, linger_ms=0)
            await producer.start()
            kafka.publisher = Publisher(settings, producer)
            later = str(uuid.uuid4())
            await publish_all(kafka, [send_request(later, n) for n in range(101, 101 + count)])
            wanted = {*range(1, count + 1), *range(101, 101 + count)}
            try:
                results = await results_behind_markers(
                    kafka,
                    producer,
                    until=wanted,
                    published=lambda: all_requests_committed(settings),
                )
            except AssertionError as exc:
                state = await sender_state(settings, sender.runtime.pool)
                raise AssertionError(f"{exc}; {state}") from None
            assert {r["contact_id"] for r in results} == wanted
            healthy, detail = await sender.runtime.health()
            assert healthy, detail
    finally:
        await producer.stop()
        handler.release.set()
        controller.stop()
        own.stop()
    per_recipient: dict[str, int] = defaultdict(int)
    for mail in kept(handler):
        per_recipient[str(mail["X-Tayori-Envelope-To"])] += 1
    assert per_recipient == {f"c{n}@example.com": 1 for n in wanted}
