"""Requests and results a broker lost are sent (or asked for) again within a few checkpoint
intervals; a backlog never is (services/scheduler/checkpoints.py).

Real contacts, scheduler and sender, the embedded broker and PostgreSQL, an SMTP sink. A
broker that lost records is played by moving a consumer group's committed offsets past them
before its consumer runs: the records are there, but the consumer never sees them — what a
sender (or the scheduler's results consumer) sees after a broker restart lost them. Mail is
counted per recipient in the sink's Maildir: exactly one each, whatever was lost.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from libs.common import avro
from libs.common.topics import Topic, topic_name
from services.scheduler.context import context_of
from tests.conftest import eventually, running
from tests.integration.test_campaign_pipeline import delivered
from tests.integration.test_scheduler import (
    NOON_TOKYO,
    campaign_body,
    category,
    counters,
    group,
    people,
    reserved,
    status_of,
)
from tests.integration.test_steps import scheduler_at

#: checkpoints every half second (SCHEDULER_CHECKPOINT_SECONDS; 60 by default).
CHECKPOINTS = {"checkpoint_seconds": 0.5}


async def lose(kafka: Any, group: str, topic: Topic) -> list[dict[str, Any]]:
    """Move ``group``'s committed offsets past every record on ``topic`` now, as a broker
    that lost them would leave its consumer (which must not be running): joins the group as
    its only member, reads what the group has not consumed yet and commits past it; returns
    those skipped records."""
    name = topic_name(topic, kafka.prefix)
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=kafka.stack.broker.bootstrap,
        group_id=f"{kafka.prefix}{group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=1000,
        heartbeat_interval_ms=200,
    )
    await consumer.start()
    skipped: list[dict[str, Any]] = []
    try:
        partitions = await kafka.publisher.producer.partitions_for(name)

        async def assigned() -> bool:
            # Joining may wait for a member that just left (a stopped scheduler) to go.
            await consumer.getmany(timeout_ms=100)
            return {tp.partition for tp in consumer.assignment()} == partitions

        await eventually(assigned)
        everything = sorted(consumer.assignment())
        for tp in everything:
            consumer.seek(tp, (await consumer.committed(tp)) or 0)

        async def at_the_end() -> bool:
            # The high watermark of a fetch (ListOffsets may stop short on this broker).
            batches = await consumer.getmany(*everything, timeout_ms=200)
            for records in batches.values():
                skipped.extend(avro.decode(topic, r.value, r.headers) for r in records)
            ends = [consumer.highwater(tp) for tp in everything]
            positions = [await consumer.position(tp) for tp in everything]
            return None not in ends and positions == ends

        await eventually(at_the_end)
        await consumer.commit({tp: await consumer.position(tp) for tp in everything})
    finally:
        await consumer.stop()
    return skipped


def everyone_once(n: int) -> Counter[str]:
    return Counter({f"p{i}@example.jp": 1 for i in range(n)})


async def released_at_least(scheduler: Any, campaign_id: str, n: int) -> None:
    async def out() -> bool:
        body = await scheduler.api.ok("GET", f"/v1/campaigns/{campaign_id}")
        return body["released"] >= n

    await eventually(out)


async def test_requests_the_broker_lost_go_out_again_once(
    stack, database, prefix, contacts, smtp_sink, kafka, monkeypatch
):
    """The sender misses the first requests of a paced campaign (released while it was away,
    then lost); it handles the rest, answers the checkpoints after them, and the scheduler
    releases exactly the lost ones again: everyone gets one mail, the campaign completes."""
    members = await group(contacts)
    await people(contacts, 30, members)
    async with scheduler_at(
        NOON_TOKYO,
        monkeypatch,
        stack,
        database,
        prefix,
        contacts_url=contacts.api.base,
        **CHECKPOINTS,
    ) as (scheduler, clock):
        context_of(scheduler.runtime).release_rate = 10.0  # paced: ~3 s for everyone
        cat = await category(scheduler)
        campaign = await reserved(
            scheduler, campaign_body(cat, clock, target={"group_id": members})
        )
        cid = campaign["id"]
        clock.advance(minutes=10)
        await released_at_least(scheduler, cid, 8)
        skipped = await lose(kafka, "sender.requests", Topic.SEND_REQUESTS)
        lost = {r["contact_id"] for r in skipped if r["campaign_id"] == cid and not r["checkpoint"]}
        assert len(lost) >= 8

        async with running(
            "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{smtp_sink.port}"
        ):
            done = await status_of(scheduler, cid, "aggregating")
            assert delivered(smtp_sink) == everyone_once(30)

    assert counters(done) == {
        "planned": 30,
        "success": 30,
        "error": 0,
        "suppressed": 0,
        "unsent": 0,
    }
    # Released once each (never more than planned); again exactly the lost ones.
    assert (done["released"], done["re_released"], done["pending"]) == (30, len(lost), 0)
    assert not [h for h in done["history"] if "without a result" in (h["reason"] or "")]


async def test_results_the_broker_lost_are_asked_for_again_without_a_second_mail(
    stack, database, prefix, contacts, smtp_sink, kafka, monkeypatch
):
    """Every result of a campaign is lost before the scheduler counts it: checkpoints find the
    rows the sender passed, their requests go out again, and the sender's ledger answers
    them with the results it recorded (same result_id) — no recipient gets a second mail."""
    members = await group(contacts)
    await people(contacts, 20, members)
    overrides = {"contacts_url": contacts.api.base, **CHECKPOINTS}
    async with scheduler_at(NOON_TOKYO, monkeypatch, stack, database, prefix, **overrides) as (
        scheduler,
        clock,
    ):
        cat = await category(scheduler)
        campaign = await reserved(
            scheduler, campaign_body(cat, clock, target={"group_id": members})
        )
        cid = campaign["id"]
        clock.advance(minutes=10)
        await released_at_least(scheduler, cid, 20)
        now = clock.now()
    # The scheduler is away while the sender delivers everything and reports it.
    async with running(
        "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{smtp_sink.port}"
    ):

        def twenty(records: list[dict[str, Any]]) -> bool:
            return len({r["contact_id"] for r in records if r["campaign_id"] == cid}) >= 20

        first = await kafka.read(Topic.DELIVERY_RESULTS, until=twenty)
        assert delivered(smtp_sink) == everyone_once(20)
        skipped = await lose(kafka, "scheduler.results", Topic.DELIVERY_RESULTS)
        assert len({r["result_id"] for r in skipped if r["campaign_id"] == cid}) == 20

        async with scheduler_at(now, monkeypatch, stack, database, prefix, **overrides) as (
            scheduler,
            _,
        ):
            done = await status_of(scheduler, cid, "aggregating")

        def each_twice(records: list[dict[str, Any]]) -> bool:
            ids = Counter(r["result_id"] for r in records if r["campaign_id"] == cid)
            return len(ids) >= 20 and min(ids.values()) >= 2

        both = await kafka.read(Topic.DELIVERY_RESULTS, until=each_twice)

    assert delivered(smtp_sink) == everyone_once(20)
    assert counters(done) == {
        "planned": 20,
        "success": 20,
        "error": 0,
        "suppressed": 0,
        "unsent": 0,
    }
    assert (done["released"], done["re_released"]) == (20, 20)
    # The results came again from the ledger, as recorded: the same ids and outcomes.
    recorded = {(r["result_id"], r["outcome"]) for r in first if r["campaign_id"] == cid}
    assert {(r["result_id"], r["outcome"]) for r in both if r["campaign_id"] == cid} == recorded


async def test_a_paced_backlog_is_never_released_again(
    stack, database, prefix, contacts, smtp_sink, kafka, monkeypatch
):
    """The sender (5 mails a second, 4 requests a fetch) falls far behind a release of 10 a
    second: requests wait in send.requests for seconds, checkpoints are answered and
    confirmed between them, and not one request goes out twice."""
    members = await group(contacts)
    await people(contacts, 40, members)
    async with (
        scheduler_at(
            NOON_TOKYO,
            monkeypatch,
            stack,
            database,
            prefix,
            contacts_url=contacts.api.base,
            **CHECKPOINTS,
        ) as (scheduler, clock),
        running(
            "sender",
            stack,
            database,
            prefix,
            smtp_relays=f"127.0.0.1:{smtp_sink.port}",
            smtp_rate_limit=5.0,
            send_batch=4,
        ),
    ):
        context_of(scheduler.runtime).release_rate = 10.0
        cat = await category(scheduler)
        campaign = await reserved(
            scheduler, campaign_body(cat, clock, target={"group_id": members})
        )
        cid = campaign["id"]
        clock.advance(minutes=10)
        backlog = 0
        confirmed_with_backlog = False

        async def finished() -> dict[str, Any] | None:
            nonlocal backlog, confirmed_with_backlog
            body = await scheduler.api.ok("GET", f"/v1/campaigns/{cid}")
            if body["re_released"]:
                pytest.fail(f"released again: {body['re_released']} ({body['released']} first)")
            waiting = body["released"] - (body["success"] + body["error"] + body["suppressed"])
            backlog = max(backlog, waiting)
            confirmed = await scheduler.runtime.pool.fetchval(
                "SELECT confirmed_mark FROM campaign WHERE id = $1::uuid", cid
            )
            confirmed_with_backlog |= confirmed > 0 and waiting >= 5
            return body if body["status"] == "aggregating" else None

        done = await eventually(finished, timeout=120)

    assert delivered(smtp_sink) == everyone_once(40)
    assert (done["released"], done["re_released"], done["success"]) == (40, 0, 40)
    # It was a backlog, and checkpoints were confirmed while requests still waited.
    assert backlog >= 10 and confirmed_with_backlog
    answers = await kafka.read_to_end(Topic.SEND_PROGRESS)
    assert len({a["checkpoint_id"] for a in answers if a["campaign_id"] == cid}) >= 2
