"""Held deliveries (issue 21) in the cases around them, through the real broker, PostgreSQL
and an SMTP relay: a held delivery's result whose publication fails while the broker is down,
a campaign paused (whole, or some of its domains) while its mail is held — resumed on the
same replica or, after a rebalance, on another one — two senders' sweeps racing for the same
orphaned held rows, and a held delivery that reaches SENDER_DOMAIN_MAX_WAIT_SECONDS. In
each, nothing is lost and nothing is sent twice.

The mail is held by an operator override that pauses LIMITED (no end): its deliveries are
parked at once with a wait past SENDER_DOMAIN_HOLD_SECONDS, so they are held; deleting the
override lets them go at once (the replica that takes the write applies it)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from libs.common import avro
from libs.common.kafka import Publisher, ensure_topics, make_producer
from libs.common.metrics import sample_value
from libs.common.settings import CommonSettings
from libs.common.topics import Topic
from services.sender import agents
from services.sender.context import CONTEXT, Context
from services.sender.holding import encode_request
from services.sender.models import LedgerKey, Outcome
from services.sender.processor import delivery_result
from tayori.embedded import SmtpSink
from tests.conftest import OPERATOR_TOKEN, Kafka, Service, Stack, eventually, running
from tests.integration.outage import OwnBroker
from tests.integration.relays import TestRelay, kept, serving
from tests.integration.test_sender import control, publish_all, recipients, send_request
from tests.integration.test_sender_domains import FAST, LIMITED
from tests.integration.test_sender_hold import committed, held_rows
from tests.integration.test_sender_outages import results_behind_markers

pytestmark = pytest.mark.integration

#: held at once (a paused domain's wait is what remains of the bound), swept every second.
SENDER = {"smtp_connections": 2, "domain_hold_seconds": 0.5, "hold_sweep_seconds": 1.0}


def to(domain: str, campaign: str, first: int, n: int) -> list[dict[str, Any]]:
    return [send_request(campaign, first + i, f"r{first + i}@{domain}") for i in range(n)]


async def pause_domain(sender: Service, domain: str) -> None:
    await sender.api.ok(
        "PUT",
        f"/v1/domains/{domain}/override",
        {"state": "paused", "reason": "held-delivery test"},
        token=OPERATOR_TOKEN,
    )


async def lift(sender: Service, domain: str) -> None:
    await sender.api.ok("DELETE", f"/v1/domains/{domain}/override", token=OPERATOR_TOKEN)


def context(sender: Service) -> Context:
    return sender.runtime.app[CONTEXT]


async def held_and_committed(
    stack: Stack, kafka: Kafka, prefix: str, database: str, *, requests: int, held: int
) -> None:
    """Until every request's offset is committed with ``held`` of them in held_delivery."""

    async def there() -> bool:
        return (
            await committed(stack, kafka, prefix) >= requests and await held_rows(database) == held
        )

    await eventually(there, timeout=60, interval=0.1)


async def none_held(database: str) -> None:
    async def empty() -> bool:
        return await held_rows(database) == 0

    await eventually(empty, timeout=60)


async def results_of(kafka: Kafka, contacts: set[int]) -> list[dict[str, Any]]:
    """delivery.results from the beginning, once every contact of ``contacts`` has one."""

    def complete(records: list[dict[str, Any]]) -> bool:
        return contacts <= {r["contact_id"] for r in records}

    return await kafka.read(Topic.DELIVERY_RESULTS, until=complete, timeout=90)


def per_contact(results: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    got: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        got[r["contact_id"]].append(r)
    return got


async def barrier(kafka: Kafka, campaign: str, contact: int) -> list[dict[str, Any]]:
    """A request to FAST published now and every result up to its own: a result of a held
    delivery published after that point would be a second one."""
    await publish_all(kafka, [send_request(campaign, contact, f"b{contact}@{FAST}")])
    return await results_of(kafka, {contact})


async def ledger_row(database: str, campaign: str, contact: int) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database)
    try:
        return await conn.fetchrow(
            "SELECT status, outcome, owner FROM sender.send_ledger"
            " WHERE campaign_id = $1 AND step_id = '' AND contact_id = $2",
            campaign,
            contact,
        )
    finally:
        await conn.close()


# 1. The result of a held delivery whose publication fails -------------------------------------


async def test_a_held_deliverys_result_that_cannot_be_published_is_published_later_once(
    stack: Stack, database: str, prefix: str, tmp_path: Path
) -> None:
    """LIMITED's mail is held; the broker goes (and comes back empty, as the embedded one
    does); while it is down LIMITED is let go: its mail is sent and recorded, but its
    results cannot be published (the producer gives up on them). Their held rows stay
    (this process no longer looks after them). Once the broker is back, the sweep
    publishes the stored results: each held recipient has one message and one result."""
    own = OwnBroker(stack, tmp_path / "broker.log")
    await ensure_topics(own.bootstrap, prefix, partitions=2)
    settings = CommonSettings(kafka_bootstrap=own.bootstrap, topic_prefix=prefix, service="test")
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    kafka = Kafka(own.stack, prefix, Publisher(settings, producer))
    handler = TestRelay(tmp_path / "relay")
    campaign = str(uuid.uuid4())
    held = to(LIMITED, campaign, 1, 3)
    requests = held + to(FAST, campaign, 100, 2)
    try:
        with serving(handler) as controller:
            async with running(
                "sender",
                own.stack,
                database,
                prefix,
                kafka_bootstrap=own.bootstrap,
                smtp_relays=f"127.0.0.1:{controller.port}",
                **SENDER,
            ) as sender:
                await pause_domain(sender, LIMITED)
                await publish_all(kafka, requests)
                await held_and_committed(
                    own.stack, kafka, prefix, database, requests=len(requests), held=len(held)
                )
                republished = sample_value("tayori_sender_held_total", {"kind": "republished"})
                await producer.stop()
                own.stop()
                await lift(sender, LIMITED)
                holder = context(sender).holder

                async def sent_and_given_up() -> bool:
                    # Sent and recorded; its result's publication failed (aiokafka's request
                    # timeout): no longer this process's, the rows stay for the sweep.
                    arrived = recipients(kept(handler))
                    return all(arrived[r["email"]] for r in held) and not holder.live

                await eventually(sent_and_given_up, timeout=120, interval=0.5)
                assert await held_rows(database) == len(held)
                for r in held:
                    row = await ledger_row(database, campaign, r["contact_id"])
                    assert row is not None and (row["status"], row["outcome"]) == ("done", "sent")
                await own.start_again(prefix)
                producer = make_producer(settings, linger_ms=0)
                await producer.start()
                kafka.publisher = Publisher(settings, producer)

                async def all_published() -> bool:
                    return await held_rows(database) == 0

                got = await results_behind_markers(
                    kafka,
                    producer,
                    until={r["contact_id"] for r in held},
                    published=all_published,
                )
                after = sample_value("tayori_sender_held_total", {"kind": "republished"})
    finally:
        await producer.stop()
        own.stop()
    by_contact = per_contact(got)
    # The new broker has only what was published after its start: the held ones' results.
    assert {n: len(rs) for n, rs in by_contact.items()} == {r["contact_id"]: 1 for r in held}
    assert all(rs[0]["outcome"] == "sent" for rs in by_contact.values())
    assert (after or 0) - (republished or 0) == len(held)
    assert recipients(kept(handler)) == {r["email"]: 1 for r in requests}


# 2. A campaign paused while its mail is held --------------------------------------------------


@pytest.mark.parametrize("domains", [None, [LIMITED]], ids=["whole_campaign", "its_domain"])
async def test_held_mail_of_a_paused_campaign_is_not_sent_and_resume_sends_it_once(
    stack: Stack,
    database: str,
    prefix: str,
    kafka: Kafka,
    smtp_sink: SmtpSink,
    domains: list[str] | None,
) -> None:
    """Campaign A's and campaign B's mail to LIMITED is held; A is paused (the whole of it,
    or its mail to LIMITED); then LIMITED is let go. B's held mail goes, A's does not: its
    held rows go with no result (the scheduler releases it again after the resume, as for
    a request dropped at the claim). A resume, then the re-release, sends each of A's once."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    a_held, b_held = to(LIMITED, a, 1, 3), to(LIMITED, b, 50, 2)
    a_fast = to(FAST, a, 100, 2)
    requests = a_held + a_fast + b_held
    async with running(
        "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{smtp_sink.port}", **SENDER
    ) as sender:
        await pause_domain(sender, LIMITED)
        await publish_all(kafka, requests)
        await held_and_committed(
            stack, kafka, prefix, database, requests=len(requests), held=len(a_held + b_held)
        )
        pause = (
            control(a, "pause") if domains is None else {**control(a, "pause"), "domains": domains}
        )
        await kafka.send(Topic.CAMPAIGN_CONTROL, a, pause)
        ctx = context(sender)

        async def paused() -> bool:
            return ctx.stopped.get(a) == "paused" if domains is None else a in ctx.held

        await eventually(paused)
        await lift(sender, LIMITED)
        # B's held mail goes; A's is abandoned, its rows deleted with no result.
        got = await results_of(kafka, {r["contact_id"] for r in a_fast + b_held})
        await none_held(database)
        assert recipients(smtp_sink.messages()) == {r["email"]: 1 for r in a_fast + b_held}
        for r in a_held:
            # Unfinished and let go (in the held rows' transaction): nobody's.
            row = await ledger_row(database, a, r["contact_id"])
            assert row is not None and (row["status"], row["owner"]) == ("claimed", None)
        resume = control(a, "resume")
        if domains is not None:
            resume["domains"] = domains
        await kafka.send(Topic.CAMPAIGN_CONTROL, a, resume)

        async def resumed() -> bool:
            return a not in ctx.stopped and a not in ctx.held

        await eventually(resumed)
        # The scheduler's re-release after the resume.
        await publish_all(kafka, [{**r, "request_id": str(uuid.uuid4())} for r in a_held])
        got = await results_of(kafka, {r["contact_id"] for r in requests})
        got += await barrier(kafka, b, 900)
    by_contact = per_contact(got)
    assert {n: len({r["result_id"] for r in rs}) for n, rs in by_contact.items()} == {
        n: 1 for n in {r["contact_id"] for r in requests} | {900}
    }
    assert all(rs[0]["outcome"] == "sent" for rs in by_contact.values())
    assert recipients(smtp_sink.messages()) == {
        **{r["email"]: 1 for r in requests},
        f"b900@{FAST}": 1,
    }


async def test_held_mail_of_a_campaign_paused_and_resumed_while_its_domain_waits_goes_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """The other order: the campaign is paused and resumed while LIMITED still keeps its
    held mail waiting. The re-release after the resume finds the rows held and is passed
    over (its batch commits); once LIMITED is let go the held mail goes, each once."""
    campaign = str(uuid.uuid4())
    held = to(LIMITED, campaign, 1, 3)
    async with running(
        "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{smtp_sink.port}", **SENDER
    ) as sender:
        await pause_domain(sender, LIMITED)
        await publish_all(kafka, held)
        await held_and_committed(stack, kafka, prefix, database, requests=len(held), held=3)
        ctx = context(sender)
        await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "pause"))

        async def paused() -> bool:
            return ctx.stopped.get(campaign) == "paused"

        await eventually(paused)
        await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "resume"))

        async def resumed() -> bool:
            return campaign not in ctx.stopped

        await eventually(resumed)
        await publish_all(kafka, [{**r, "request_id": str(uuid.uuid4())} for r in held])
        # Passed over: committed while the rows are still held.
        await held_and_committed(
            stack, kafka, prefix, database, requests=2 * len(held), held=len(held)
        )
        assert recipients(smtp_sink.messages()) == {}
        await lift(sender, LIMITED)
        got = await results_of(kafka, {r["contact_id"] for r in held})
        await none_held(database)
        got += await barrier(kafka, campaign, 900)
    by_contact = per_contact(got)
    assert {n: len({r["result_id"] for r in rs}) for n, rs in by_contact.items()} == {
        n: 1 for n in {r["contact_id"] for r in held} | {900}
    }
    assert all(rs[0]["outcome"] == "sent" for rs in by_contact.values())
    assert recipients(smtp_sink.messages()) == {
        **{r["email"]: 1 for r in held},
        f"b900@{FAST}": 1,
    }


async def test_held_mail_of_a_paused_campaign_resumed_on_another_replica_is_sent_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """As above, but the re-release after the resume reaches another replica while the
    first one, which held and then abandoned the mail, still runs (a rebalance moved the
    partition; the first one's owner lock is held here once it stopped consuming). The
    abandoned rows are nobody's: the other replica sends each once instead of waiting for
    an owner that will never finish them."""
    campaign = str(uuid.uuid4())
    held = to(LIMITED, campaign, 1, 3)
    relay = f"127.0.0.1:{smtp_sink.port}"
    lock = await asyncpg.connect(database)
    try:
        async with running("sender", stack, database, prefix, smtp_relays=relay, **SENDER) as one:
            await pause_domain(one, LIMITED)
            await publish_all(kafka, held)
            await held_and_committed(
                stack, kafka, prefix, database, requests=len(held), held=len(held)
            )
            await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "pause"))
            ctx = context(one)

            async def paused() -> bool:
                return ctx.stopped.get(campaign) == "paused"

            await eventually(paused)
            await lift(one, LIMITED)
            await none_held(database)
            owner = ctx.owner.key
        # The first replica lives on (its owner lock), without the partition.
        await lock.execute("SELECT pg_advisory_lock($1)", owner)
        async with running("sender", stack, database, prefix, smtp_relays=relay, **SENDER) as two:
            await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "resume"))

            async def resumed() -> bool:
                return campaign not in context(two).stopped

            await eventually(resumed)
            await publish_all(kafka, [{**r, "request_id": str(uuid.uuid4())} for r in held])
            got = await results_of(kafka, {r["contact_id"] for r in held})
            got += await barrier(kafka, campaign, 900)
    finally:
        await lock.close()
    by_contact = per_contact(got)
    assert {n: len({r["result_id"] for r in rs}) for n, rs in by_contact.items()} == {
        n: 1 for n in {r["contact_id"] for r in held} | {900}
    }
    assert all(rs[0]["outcome"] == "sent" for rs in by_contact.values())
    assert recipients(smtp_sink.messages()) == {
        **{r["email"]: 1 for r in held},
        f"b900@{FAST}": 1,
    }


# 3. Two sweeps racing for the same orphaned held rows ----------------------------------------


async def test_two_senders_sweeping_the_same_orphaned_rows_at_once_send_each_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """Held rows left by a sender that is gone (ledger and held rows written here): 30
    unfinished, 2 done. Two running senders sweep at the same moment: each unfinished row
    is adopted by one of them and sent once; each done row's stored result is published
    (the same result_id, whoever publishes it) and nothing of it is sent."""
    campaign = str(uuid.uuid4())
    gone_owner = 905
    unfinished = [send_request(campaign, n, f"u{n}@example.com") for n in range(1, 31)]
    done = [send_request(campaign, n, f"d{n}@example.com") for n in (41, 42)]
    stored = {
        r["contact_id"]: encode_request(
            avro.decode(Topic.SEND_REQUESTS, *avro.encode(Topic.SEND_REQUESTS, r))
        )
        for r in unfinished + done
    }
    results_done = {
        r["contact_id"]: delivery_result(
            LedgerKey(campaign, "", r["contact_id"]),
            r["email"],
            Outcome("sent", 250, "2.0.0", "250 OK", "relay:25", f"<m{r['contact_id']}@x>"),
            datetime.now(UTC),
        )
        for r in done
    }
    relay = f"127.0.0.1:{smtp_sink.port}"
    # No sweep but the one at start (before the rows exist) and the two of this test.
    quiet = {"hold_sweep_seconds": 3600.0}
    async with (
        running("sender", stack, database, prefix, smtp_relays=relay, **quiet) as one,
        running("sender", stack, database, prefix, smtp_relays=relay, **quiet) as two,
    ):
        first, second = context(one), context(two)
        await first.owner.wait_held(1.0)
        await second.owner.wait_held(1.0)
        async with first.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO send_ledger (campaign_id, contact_id, kind, status, email, owner,"
                " outcome, result) VALUES ($1, $2, 'campaign', $3, $4, $5, $6, $7)",
                [
                    (campaign, r["contact_id"], "claimed", r["email"], gone_owner, None, None)
                    for r in unfinished
                ]
                + [
                    (
                        campaign,
                        r["contact_id"],
                        "done",
                        r["email"],
                        gone_owner,
                        "sent",
                        results_done[r["contact_id"]],
                    )
                    for r in done
                ],
            )
            await conn.executemany(
                "INSERT INTO held_delivery (campaign_id, step_id, contact_id, domain,"
                " value, headers) VALUES ($1, '', $2, 'example.com', $3, $4::text::jsonb)",
                [(campaign, n, value, headers) for n, (value, headers) in stored.items()],
            )
        await asyncio.gather(agents.sweep_held(first), agents.sweep_held(second))
        everyone = {r["contact_id"] for r in unfinished + done}
        got = await results_of(kafka, everyone)
        await none_held(database)
        owners: Counter[int] = Counter()
        for r in unfinished:
            row = await ledger_row(database, campaign, r["contact_id"])
            assert row is not None and (row["status"], row["outcome"]) == ("done", "sent")
            owners[row["owner"]] += 1
        got += await barrier(kafka, campaign, 900)
    assert set(owners) <= {first.owner.key, second.owner.key}
    assert sum(owners.values()) == len(unfinished)
    by_contact = per_contact(got)
    assert set(by_contact) == everyone | {900}
    ids = {n: {r["result_id"] for r in rs} for n, rs in by_contact.items()}
    assert {n: i for n, i in ids.items() if len(i) != 1} == {}
    assert all(ids[n] == {results_done[n]["result_id"]} for n in results_done)
    assert recipients(smtp_sink.messages()) == {
        **{r["email"]: 1 for r in unfinished},
        f"b900@{FAST}": 1,
    }


# 4. A held delivery that reaches SENDER_DOMAIN_MAX_WAIT_SECONDS -----------------------------

#: long enough for the test to see the rows held and the batch committed first.
MAX_WAIT = 5.0


async def test_a_held_delivery_past_the_wait_bound_is_recorded_not_sent_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """LIMITED stays paused; its mail is held, then, once it has waited
    SENDER_DOMAIN_MAX_WAIT_SECONDS, recorded as temporary_error ("not sent: … would wait
    more than 5 s") — one result each, nothing sent, the held rows gone — while FAST's
    mail is sent."""
    campaign = str(uuid.uuid4())
    held = to(LIMITED, campaign, 1, 3)
    fast = to(FAST, campaign, 100, 2)
    requests = held + fast
    async with running(
        "sender",
        stack,
        database,
        prefix,
        smtp_relays=f"127.0.0.1:{smtp_sink.port}",
        domain_max_wait_seconds=MAX_WAIT,
        **SENDER,
    ) as sender:
        await pause_domain(sender, LIMITED)
        await publish_all(kafka, requests)
        await held_and_committed(
            stack, kafka, prefix, database, requests=len(requests), held=len(held)
        )
        got = await results_of(kafka, {r["contact_id"] for r in requests})
        await none_held(database)
        got += await barrier(kafka, campaign, 900)
        for r in held:
            row = await ledger_row(database, campaign, r["contact_id"])
            assert row is not None and (row["status"], row["outcome"]) == (
                "done",
                "temporary_error",
            )
    by_contact = per_contact(got)
    assert {n: len({r["result_id"] for r in rs}) for n, rs in by_contact.items()} == {
        n: 1 for n in {r["contact_id"] for r in requests} | {900}
    }
    for r in held:
        (result,) = {x["result_id"]: x for x in by_contact[r["contact_id"]]}.values()
        assert result["outcome"] == "temporary_error"
        assert result["diagnostic"] == (
            f"not sent: {LIMITED} paused: would wait more than {MAX_WAIT:g} s"
        ), result
    assert all(by_contact[r["contact_id"]][0]["outcome"] == "sent" for r in fast)
    assert recipients(smtp_sink.messages()) == {
        **{r["email"]: 1 for r in fast},
        f"b900@{FAST}": 1,
    }
