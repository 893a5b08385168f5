"""Outages are weather (issue 15): PostgreSQL stopped for 20 s and started again while
unsubscribes, ingest and a campaign run, and the Kafka broker killed and restarted with a
campaign in flight. Every service rides them out: none stops, a 2xx answer was applied
everywhere, nothing ingested is lost or doubled, and every recipient is mailed once.

These tests stop their own PostgreSQL and broker (the module's ``stack``), never the
session's shared ones.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from libs.common.kafka import ensure_topics
from libs.common.topics import Topic
from tests.conftest import Kafka, Service, Stack, eventually, own_stack, running
from tests.integration.test_campaign_pipeline import delivered
from tests.integration.test_contacts_ingest import upserted
from tests.integration.test_scheduler import (
    campaign_body,
    category,
    fake_clock,
    group,
    people,
    reserved,
    status_of,
)
from tests.integration.test_sender import copy_holds
from tests.integration.test_suppression import path_of

#: how long the database stays down (the issue's experiment).
OUTAGE_SECONDS = 20.0
#: one worker runs this module: it starts its own PostgreSQL and broker once.
pytestmark = pytest.mark.xdist_group("outages")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """This module's own PostgreSQL and broker, which its tests stop and start."""
    with own_stack("tayori-outage-") as mine:
        yield mine


@pytest.fixture
async def database(stack: Stack) -> str:
    """A fresh database; the services apply their migrations when they start."""
    return await stack.postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")


async def all_alive(*services: Service) -> None:
    for service in services:
        assert service.runtime._failure is None, service.runtime._failure
        ok, detail = await service.runtime.health()
        assert ok, (service.runtime.settings.service, detail)


class Unsubscriber:
    """Readers pressing one-click unsubscribe links, one after another, each until it is
    answered 200 — the answers during the outage are what a reader would get."""

    def __init__(self, session: aiohttp.ClientSession, base: str, links: list[str]) -> None:
        self.session = session
        self.base = base
        self.pending = list(links)
        self.applied: list[str] = []
        self.statuses: list[int] = []
        self.retry_after: set[str] = set()

    async def run(self) -> None:
        while self.pending:
            link = self.pending[0]
            try:
                async with self.session.post(
                    self.base + path_of(link), data={"List-Unsubscribe": "One-Click"}
                ) as response:
                    self.statuses.append(response.status)
                    if response.status == 503:
                        self.retry_after.add(response.headers.get("Retry-After", ""))
                    if response.status == 200:
                        self.applied.append(self.pending.pop(0))
            except aiohttp.ClientConnectionError:
                self.statuses.append(0)
            await asyncio.sleep(0.3)


async def ingest(kafka: Kafka, emails: list[str]) -> None:
    """An upstream system sending one contact event after another."""
    for email in emails:
        await kafka.send(Topic.CONTACTS_EVENTS, email, upserted(email, name="取込"))
        await asyncio.sleep(0.4)


@pytest.fixture
async def slow_scheduler(
    stack: Stack, database: str, prefix: str, contacts: Service
) -> AsyncIterator[Service]:
    """A scheduler that releases 5 requests a second: its campaign is still sending when
    the outage begins, and after it ends."""
    async with running(
        "scheduler",
        stack,
        database,
        prefix,
        contacts_url=contacts.api.base,
        release_rate=5.0,
        checkpoint_seconds=2.0,
    ) as service:
        yield service


async def test_postgresql_stopped_for_20_seconds_under_load(
    stack: Stack,
    kafka: Kafka,
    contacts: Service,
    suppression: Service,
    slow_scheduler: Service,
    sender: Service,
    bounce_processor: Service,
    exporter: Service,
    smtp_sink: Any,
) -> None:
    services = (contacts, suppression, slow_scheduler, sender, bounce_processor, exporter)
    scheduler = slow_scheduler
    clock = fake_clock(scheduler)
    readers = await group(contacts)
    recipients = await people(contacts, 60, readers)
    leavers_group = await group(contacts, "退会する会員")
    leavers = await people(contacts, 25, leavers_group, first=100)
    await copy_holds(sender, "membership_copy", 85)
    links = [
        (
            await suppression.api.ok(
                "GET", f"/v1/unsubscribe-link?contact_id={c}&group_id={leavers_group}"
            )
        )["url"]
        for c in leavers
    ]
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": readers}))
    assert campaign["planned"] == len(recipients)
    clock.advance(minutes=10)
    await status_of(scheduler, campaign["id"], "sending")

    async with aiohttp.ClientSession() as session:
        unsubscriber = Unsubscriber(session, suppression.api.base, links)
        ingested = [f"ingest{i}@example.jp" for i in range(60)]
        load = [
            asyncio.ensure_future(unsubscriber.run()),
            asyncio.ensure_future(ingest(kafka, ingested)),
        ]
        try:
            await asyncio.sleep(2)
            await asyncio.to_thread(stack.postgres.stop_server)
            await asyncio.sleep(OUTAGE_SECONDS / 2)
            # Not ready (naming the database), but alive: nothing to restart.
            for service in services:
                status, body = await service.api.call("GET", "/readyz", token=None)
                assert status == 503 and body["database"].startswith("unreachable"), body
                status, body = await service.api.call("GET", "/healthz", token=None)
                assert status == 200, (service.runtime.settings.service, body)
            await asyncio.sleep(OUTAGE_SECONDS / 2)
            await asyncio.to_thread(stack.postgres.start_server)
            await asyncio.gather(*load)
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)

    # The outage was seen by readers as 503 with Retry-After, never as a server error.
    assert 503 in unsubscriber.statuses, unsubscriber.statuses
    assert 500 not in unsubscriber.statuses, unsubscriber.statuses
    assert unsubscriber.retry_after == {"5"}
    assert len(unsubscriber.applied) == len(links)

    # Every recipient mailed once.
    done = await status_of(scheduler, campaign["id"], "aggregating")
    assert delivered(smtp_sink) == {f"p{i}@example.jp": 1 for i in range(60)}
    assert done["success"] == len(recipients)

    # Every 2xx unsubscribe applied in suppression, contacts and the sender's copy.
    async def unsubscribed_everywhere() -> bool:
        for contact_id in leavers:
            held = await suppression.api.ok("GET", f"/v1/memberships/{contact_id}/{leavers_group}")
            assert held["state"] == "unsubscribed", (contact_id, held)
        query = "SELECT count(*) FROM {} WHERE group_id = $1 AND state = 'unsubscribed'"
        assert await contacts.runtime.pool.fetchval(
            query.format("membership"), leavers_group
        ) == len(leavers)
        assert await sender.runtime.pool.fetchval(
            query.format("membership_copy"), leavers_group
        ) == len(leavers)
        return True

    await eventually(unsubscribed_everywhere)

    # Every ingested event present once.
    async def all_ingested() -> bool:
        counts = await contacts.runtime.pool.fetch(
            "SELECT email, count(*) AS n FROM contact WHERE email = ANY($1) GROUP BY email",
            ingested,
        )
        assert {r["email"]: r["n"] for r in counts} == dict.fromkeys(ingested, 1)
        return True

    await eventually(all_ingested)
    await all_alive(*services)


async def test_broker_killed_and_restarted_with_a_campaign_in_flight(
    stack: Stack,
    prefix: str,
    contacts: Service,
    suppression: Service,
    slow_scheduler: Service,
    sender: Service,
    smtp_sink: Any,
) -> None:
    """The embedded broker keeps nothing across a restart: send requests, results and
    the campaign's content in flight are lost, the topics come back empty (recreated, as
    ``tayori dev`` does). The campaign still completes — no waiting for the 30-minute
    result timeout — and every recipient is mailed exactly once."""
    services = (contacts, suppression, slow_scheduler, sender)
    scheduler = slow_scheduler
    clock = fake_clock(scheduler)
    readers = await group(contacts)
    recipients = await people(contacts, 60, readers)
    await copy_holds(sender, "membership_copy", len(recipients))
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": readers}))
    clock.advance(minutes=10)

    async def some_delivered() -> bool:
        return len(delivered(smtp_sink)) >= 5

    await eventually(some_delivered)
    stack.broker.kill()
    await asyncio.sleep(3)
    await asyncio.to_thread(stack.broker.restart)
    await ensure_topics(stack.broker.bootstrap, prefix, partitions=2)

    done = await status_of(scheduler, campaign["id"], "aggregating")
    assert delivered(smtp_sink) == {f"p{i}@example.jp": 1 for i in range(60)}
    assert done["success"] == len(recipients)
    assert done["released"] <= done["planned"]
    await all_alive(*services)
