"""Held deliveries (issue 21) through the real broker, PostgreSQL and an SMTP relay that
caps one domain's rate: the batch of a slow domain's mail commits while that mail waits in
held_delivery, the other domain's mail is not held behind it, and nothing is lost or sent
twice — across a stop, too, when the next sender adopts the held rows."""

from __future__ import annotations

import itertools
import signal
import subprocess
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from libs.common import avro
from libs.common.topics import Topic, topic_name
from services.sender.holding import encode_request
from services.sender.models import LedgerKey, Outcome
from services.sender.processor import delivery_result
from services.sender.smtp import UNRECORDED_PER_CONNECTION
from tayori.embedded import SmtpSink
from tests.conftest import Kafka, Stack, eventually, running
from tests.integration import test_sender_crash as crash
from tests.integration.relays import kept, serving
from tests.integration.test_sender import publish_all, recipients, send_request
from tests.integration.test_sender_domains import FAST, LIMITED, RateCappingRelay

pytestmark = pytest.mark.integration

#: what the sender is told: a short pause after three refusals, a low AIMD floor, and a
#: hold threshold of half a second (so that waiting out a pause holds too).
SENDER = {
    "smtp_connections": 4,
    "domain_pause_after": 3,
    "domain_pause_seconds": 2.0,
    "domain_aimd_floor": 1.0,
    "domain_aimd_increase": 0.5,
    "domain_hold_seconds": 0.5,
    "hold_sweep_seconds": 1.0,
}


def interleaved(campaign: str, limited: int, fast: int) -> list[dict[str, Any]]:
    """Requests to LIMITED and FAST alternating, one contact id each (one ledger key)."""
    a = [send_request(campaign, n, f"l{n}@{LIMITED}") for n in range(1, limited + 1)]
    b = [send_request(campaign, 1000 + n, f"f{n}@{FAST}") for n in range(1, fast + 1)]
    return [r for pair in itertools.zip_longest(a, b) for r in pair if r is not None]


async def held_rows(database: str) -> int:
    conn = await asyncpg.connect(database)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM sender.held_delivery"))
    finally:
        await conn.close()


async def committed(stack: Stack, kafka: Kafka, prefix: str) -> int:
    """Offsets the sender's send.requests group committed, over every partition."""
    name = topic_name(Topic.SEND_REQUESTS, prefix)
    partitions = [
        TopicPartition(name, p) for p in sorted(await kafka.publisher.producer.partitions_for(name))
    ]
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.broker.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(
            f"{prefix}sender.requests", partitions=partitions
        )
    finally:
        await admin.close()
    return sum(max(0, offsets[tp].offset) for tp in partitions if tp in offsets)


def copies(messages: list[Message]) -> Counter[tuple[str, str]]:
    """Messages the relay kept, by (recipient, Message-ID)."""
    return Counter((str(m["X-Tayori-Envelope-To"]), str(m["Message-ID"])) for m in messages)


def arrived(handler: RateCappingRelay, domain: str) -> int:
    return sum(1 for _, kind, a in handler.events if kind == "kept" and a.endswith("@" + domain))


async def answered(kafka: Kafka, n: int) -> dict[int, set[str]]:
    """Result ids by contact, once ``n`` contacts have one."""
    by_contact: dict[int, set[str]] = defaultdict(set)

    async def all_there() -> bool:
        for result in await kafka.read_to_end(Topic.DELIVERY_RESULTS):
            assert result["outcome"] == "sent", result
            by_contact[result["contact_id"]].add(result["result_id"])
        return len(by_contact) >= n

    await eventually(all_there, timeout=180, interval=0.5)
    return by_contact


def assert_each_once(handler: RateCappingRelay, requests: list[dict[str, Any]]) -> None:
    """Every recipient got exactly one message (one Message-ID, one copy)."""
    got = copies(kept(handler))
    by_recipient: dict[str, list[str]] = defaultdict(list)
    for (to, message_id), n in got.items():
        by_recipient[to].extend([message_id] * n)
    assert set(by_recipient) == {r["email"] for r in requests}
    assert {to: ids for to, ids in by_recipient.items() if len(ids) != 1} == {}


async def test_a_slow_domains_mail_is_held_and_its_batch_commits_without_it(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """LIMITED takes 5 RCPTs a second (421 4.7.0 beyond); FAST everything. 150 requests to
    each, interleaved, published before the sender starts (one batch or a few). FAST's mail
    all arrives and the batch's offsets are committed while some of LIMITED's mail is still
    held; in the end every message arrived once with one ``sent`` result, and the held
    table is empty."""
    handler = RateCappingRelay(tmp_path / "relay", per_second=5, pipelining=True)
    requests = interleaved(str(uuid.uuid4()), 150, 150)
    await publish_all(kafka, requests)
    with serving(handler) as controller:
        async with running(
            "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{controller.port}", **SENDER
        ):

            async def fast_done_and_committed() -> bool:
                return arrived(handler, FAST) >= 150 and await committed(
                    stack, kafka, prefix
                ) >= len(requests)

            await eventually(fast_done_and_committed, timeout=120, interval=0.1)
            # The whole batch is committed, and LIMITED's mail still waits, held.
            held_then = await held_rows(database)
            limited_then = arrived(handler, LIMITED)
            assert held_then > 0
            assert limited_then < 150
            by_contact = await answered(kafka, len(requests))

            async def none_held() -> bool:
                return await held_rows(database) == 0

            await eventually(none_held, timeout=30)
    assert set(by_contact) == {r["contact_id"] for r in requests}
    assert {n: ids for n, ids in by_contact.items() if len(ids) != 1} == {}
    assert_each_once(handler, requests)
    assert arrived(handler, FAST) == 150


async def test_held_rows_left_by_a_stopped_sender_are_adopted_and_sent_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """A sender stops while LIMITED's mail is held (its batch committed): the rows stay. The
    next sender takes them over (their owner is gone) from their stored records and sends
    each once; every request ends with one result id and one message."""
    handler = RateCappingRelay(tmp_path / "relay", per_second=3, pipelining=True)
    requests = interleaved(str(uuid.uuid4()), 60, 30)
    await publish_all(kafka, requests)
    with serving(handler) as controller:
        relay = f"127.0.0.1:{controller.port}"
        async with running("sender", stack, database, prefix, smtp_relays=relay, **SENDER):

            async def committed_with_rows_held() -> bool:
                return (
                    await committed(stack, kafka, prefix) >= len(requests)
                    and await held_rows(database) >= 20
                )

            await eventually(committed_with_rows_held, timeout=120, interval=0.1)
        left = await held_rows(database)
        sent_before = arrived(handler, LIMITED)
        assert left > 0
        assert sent_before < 60
        # Nothing of the committed batch comes back: the held rows are the only way on.
        async with running("sender", stack, database, prefix, smtp_relays=relay, **SENDER):
            by_contact = await answered(kafka, len(requests))

            async def none_held() -> bool:
                return await held_rows(database) == 0

            await eventually(none_held, timeout=30)
    assert set(by_contact) == {r["contact_id"] for r in requests}
    assert {n: ids for n, ids in by_contact.items() if len(ids) != 1} == {}
    assert_each_once(handler, requests)


async def test_the_claim_skips_held_rows_and_the_sweep_takes_over_those_of_gone_senders(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """Held rows as other senders left them (ledger rows and held rows written here):

    * c1, unfinished, its owner alive (a lock this test holds): its request comes again and
      is neither sent nor waited for — the batch's offsets are committed — until its owner
      is gone; then the sweep adopts it and it is sent once;
    * c2, done by a sender that is gone: the sweep publishes its stored result again (same
      result_id) and sends nothing;
    * c3, unfinished, its sender gone: the sweep adopts it from its stored record and sends
      it once."""
    campaign = str(uuid.uuid4())
    live_owner, gone_owner = 903, 904
    requests = {n: send_request(campaign, n) for n in (1, 2, 3)}
    stored = {
        n: encode_request(avro.decode(Topic.SEND_REQUESTS, *avro.encode(Topic.SEND_REQUESTS, r)))
        for n, r in requests.items()
    }
    done = delivery_result(
        LedgerKey(campaign, "", 2),
        "c2@example.com",
        Outcome("sent", 250, "2.0.0", "250 OK", "relay:25", "<m2@example.com>"),
        datetime.now(UTC),
    )
    lock = await asyncpg.connect(database)
    try:
        await lock.execute("SELECT pg_advisory_lock($1)", live_owner)
        async with running(
            "sender",
            stack,
            database,
            prefix,
            smtp_relays=f"127.0.0.1:{smtp_sink.port}",
            hold_sweep_seconds=0.5,
        ) as sender:
            pool = sender.runtime.pool
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO send_ledger"
                    " (campaign_id, contact_id, kind, status, email, owner, outcome, result)"
                    " VALUES ($1, 1, 'campaign', 'claimed', 'c1@example.com', $2, NULL, NULL),"
                    "        ($1, 2, 'campaign', 'done', 'c2@example.com', $3, 'sent', $4),"
                    "        ($1, 3, 'campaign', 'claimed', 'c3@example.com', $3, NULL, NULL)",
                    campaign,
                    live_owner,
                    gone_owner,
                    done,
                )
                await conn.executemany(
                    "INSERT INTO held_delivery (campaign_id, step_id, contact_id, domain,"
                    " value, headers) VALUES ($1, '', $2, 'example.com', $3, $4::text::jsonb)",
                    [(campaign, n, value, headers) for n, (value, headers) in stored.items()],
                )
            await publish_all(kafka, [requests[1]])
            # c1's request is passed over: its batch commits while its owner lives.

            async def passed() -> bool:
                return await committed(stack, kafka, prefix) >= 1

            await eventually(passed)
            got = await answered(kafka, 2)
            assert set(got) == {2, 3}
            assert got[2] == {done["result_id"]}
            assert recipients(smtp_sink.messages()) == {"c3@example.com": 1}
            assert await held_rows(database) == 1  # c1's, still its live owner's
            # Its owner goes: the sweep adopts c1 and sends it once.
            await lock.close()
            got = await answered(kafka, 3)

            async def none_held() -> bool:
                return await held_rows(database) == 0

            await eventually(none_held)
    finally:
        await lock.close()
    assert {n: len(ids) for n, ids in got.items()} == {1: 1, 2: 1, 3: 1}
    assert recipients(smtp_sink.messages()) == {"c1@example.com": 1, "c3@example.com": 1}


def start_sender(
    stack: Stack, database: str, prefix: str, relay: str, log: Path
) -> subprocess.Popen[bytes]:
    """The sender as its own process (test_sender_crash.start_sender), paced as SENDER."""
    return crash.start_sender(
        stack,
        database,
        prefix,
        relay,
        log,
        SMTP_CONNECTIONS=str(SENDER["smtp_connections"]),
        SENDER_DOMAIN_PAUSE_AFTER=str(SENDER["domain_pause_after"]),
        SENDER_DOMAIN_PAUSE_SECONDS=str(SENDER["domain_pause_seconds"]),
        SENDER_DOMAIN_AIMD_FLOOR=str(SENDER["domain_aimd_floor"]),
        SENDER_DOMAIN_AIMD_INCREASE=str(SENDER["domain_aimd_increase"]),
        SENDER_DOMAIN_HOLD_SECONDS=str(SENDER["domain_hold_seconds"]),
        SENDER_HOLD_SWEEP_SECONDS=str(SENDER["hold_sweep_seconds"]),
    )


async def test_held_rows_of_a_killed_sender_are_adopted_and_nothing_is_lost(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """SIGKILL while LIMITED's mail is held and FAST's is flowing: the next sender adopts
    the held rows (their owner's lock died with it) and resends what the batch left
    unfinished; every recipient ends with one Message-ID and every request with one
    result id. A raw second copy only under the ledger's crash rule (an end of data out
    when the kill came: same Message-ID, a few per connection)."""
    handler = RateCappingRelay(tmp_path / "relay", per_second=3, pipelining=True)
    requests = interleaved(str(uuid.uuid4()), 60, 60)
    await publish_all(kafka, requests)
    log = tmp_path / "sender.log"
    with serving(handler) as controller:
        relay = f"127.0.0.1:{controller.port}"
        process = start_sender(stack, database, prefix, relay, log)
        try:

            async def committed_with_rows_held() -> bool:
                assert process.poll() is None, log.read_text()
                return (
                    await committed(stack, kafka, prefix) >= len(requests)
                    and await held_rows(database) >= 20
                )

            await eventually(committed_with_rows_held, timeout=120, interval=0.1)
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            assert arrived(handler, LIMITED) < 60
            process = start_sender(stack, database, prefix, relay, log)
            by_contact = await answered(kafka, len(requests))

            async def none_held() -> bool:
                return await held_rows(database) == 0

            await eventually(none_held, timeout=30)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    assert set(by_contact) == {r["contact_id"] for r in requests}
    assert {n: ids for n, ids in by_contact.items() if len(ids) != 1} == {}
    got = copies(kept(handler))
    ids: dict[str, set[str]] = defaultdict(set)
    for to, message_id in got:
        ids[to].add(message_id)
    assert set(ids) == {r["email"] for r in requests}
    assert {to: i for to, i in ids.items() if len(i) != 1} == {}
    resent = {key: n for key, n in got.items() if n > 1}
    assert len(resent) <= SENDER["smtp_connections"] * UNRECORDED_PER_CONNECTION, resent
