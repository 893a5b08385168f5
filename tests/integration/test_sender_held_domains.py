"""campaign.control v2 at the sender, through the real broker, PostgreSQL and SMTP: a pause
with ``domains`` holds the campaign's mail to those receiving domains only (issue 21's
complaint guard), a resume with them lets it go, and the held set outlives a restart."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from libs.common.metrics import sample_value
from libs.common.topics import Topic
from services.sender.context import CONTEXT
from tayori.embedded import SmtpSink
from tests.conftest import Kafka, Service, Stack, eventually, running
from tests.integration.relays import kept, serving
from tests.integration.test_sender import (
    HoldingHandler,
    barrier,
    control,
    one_connection,
    publish_all,
    recipients,
    results,
    send_request,
)

pytestmark = pytest.mark.integration

HELD, OPEN = "held.example", "open.example"


def by_domains(campaign_id: str, action: str, domains: list[str]) -> dict[str, Any]:
    return {**control(campaign_id, action), "domains": domains}


def dropped() -> float:
    return sample_value("tayori_sender_requests_dropped_total", {"state": "domain_paused"}) or 0.0


async def held_domains(sender: Service, campaign_id: str, expected: list[str]) -> None:
    """Wait until the sender's ledger view shows ``expected`` held for the campaign."""

    async def shown() -> bool:
        ledger = await sender.api.ok("GET", f"/v1/ledger/{campaign_id}")
        return bool(ledger["held_domains"] == expected)

    await eventually(shown)


async def handled(sender: Service, command: dict[str, Any]) -> None:
    """Wait until the sender's control consumer has committed ``command``."""

    async def done() -> bool:
        return bool(
            await sender.runtime.pool.fetchval(
                "SELECT 1 FROM processed_event WHERE event_id = $1", command["command_id"]
            )
        )

    await eventually(done)


async def test_a_pause_with_domains_holds_only_those_domains_until_resumed(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, by_domains(campaign, "pause", [HELD]))
    await held_domains(sender, campaign, [HELD])
    before = dropped()
    to_held = [send_request(campaign, 100 + i, f"h{i}@{HELD}") for i in range(5)]
    to_open = [send_request(campaign, 200 + i, f"o{i}@{OPEN}") for i in range(5)]
    await publish_all(kafka, [r for pair in zip(to_held, to_open, strict=True) for r in pair])

    async def all_decided() -> bool:
        return dropped() - before == len(to_held)

    got = await results(kafka, len(to_open))
    await eventually(all_decided)  # every request to HELD was dropped, with no result
    assert sorted(r["email"] for r in got) == sorted(r["email"] for r in to_open)
    assert {r["outcome"] for r in got} == {"sent"}
    assert recipients(smtp_sink.messages()) == {r["email"]: 1 for r in to_open}
    assert await kafka.read_to_end(Topic.DELIVERY_RESULTS) == got  # none for HELD
    ledger = await sender.api.ok("GET", f"/v1/ledger/{campaign}")
    assert (ledger["control"], ledger["held_domains"]) == ("active", [HELD])

    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, by_domains(campaign, "resume", [HELD]))
    await held_domains(sender, campaign, [])
    # The scheduler re-releases what got no result.
    await publish_all(
        kafka, [{**r, "request_id": str(uuid.uuid4()), "attempt": 2} for r in to_held]
    )
    got = await results(kafka, len(to_open) + len(to_held))
    assert {r["email"]: r["outcome"] for r in got} == {
        r["email"]: "sent" for r in to_held + to_open
    }
    assert recipients(smtp_sink.messages()) == {r["email"]: 1 for r in to_held + to_open}


async def test_per_domain_the_later_command_wins_and_a_halted_campaign_holds_nothing(
    sender: Service, kafka: Kafka
) -> None:
    campaign = str(uuid.uuid4())
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, by_domains(campaign, "pause", [HELD]))
    stale = by_domains(campaign, "resume", [HELD])
    stale["issued_at"] -= timedelta(minutes=1)  # decided before the pause: it loses
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, stale)
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, by_domains(campaign, "pause", [OPEN]))
    await held_domains(sender, campaign, [HELD, OPEN])
    await handled(sender, stale)
    await held_domains(sender, campaign, [HELD, OPEN])

    halted = str(uuid.uuid4())
    await kafka.send(Topic.CAMPAIGN_CONTROL, halted, control(halted, "halt"))
    late = by_domains(halted, "pause", [HELD])
    await kafka.send(Topic.CAMPAIGN_CONTROL, halted, late)
    await handled(sender, late)
    ledger = await sender.api.ok("GET", f"/v1/ledger/{halted}")
    assert (ledger["control"], ledger["held_domains"]) == ("halted", [])


async def test_the_held_domains_outlive_a_restart_and_a_whole_campaign_resume(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """Persisted (migration 0007): a restarted sender still holds the domain. A pause and
    resume of the whole campaign (its sending window) leave the held domains held: they
    have another cause, the complaint guard, and only a resume naming them lifts them."""
    campaign = str(uuid.uuid4())
    relays = f"127.0.0.1:{smtp_sink.port}"
    async with running("sender", stack, database, prefix, smtp_relays=relays) as sender:
        await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, by_domains(campaign, "pause", [HELD]))
        await held_domains(sender, campaign, [HELD])
        await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "pause"))
        resume = control(campaign, "resume")
        await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, resume)
        await handled(sender, resume)
    async with running("sender", stack, database, prefix, smtp_relays=relays) as sender:
        ctx = sender.runtime.app[CONTEXT]

        async def loaded() -> bool:
            return ctx.held.get(campaign) == frozenset({HELD})

        await eventually(loaded)
        assert campaign not in ctx.stopped
        ledger = await sender.api.ok("GET", f"/v1/ledger/{campaign}")
        assert (ledger["control"], ledger["held_domains"]) == ("active", [HELD])
        before = dropped()
        await publish_all(
            kafka,
            [send_request(campaign, 301, f"a@{HELD}"), send_request(campaign, 302, f"b@{OPEN}")],
        )
        got = await results(kafka, 1)

        async def decided() -> bool:
            return dropped() - before == 1

        await eventually(decided)
    assert [(r["email"], r["outcome"]) for r in got] == [(f"b@{OPEN}", "sent")]
    assert recipients(smtp_sink.messages()) == {f"b@{OPEN}": 1}


async def test_deliveries_already_queued_to_a_domain_just_held_are_abandoned(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """The pause with domains comes while the campaign's mail is queued in the sender, one
    of them with its MAIL, RCPT and DATA on the wire behind another message's end of data
    (whichever the relay holds first): a message to the held domain whose end of data was
    not out yet is not sent; the one to the other domain is."""
    handler = HoldingHandler(tmp_path / "holding")
    campaign = str(uuid.uuid4())
    addresses = [f"a@{OPEN}", f"b@{HELD}", f"c@{HELD}"]
    # One contact, a step each: one partition, in this order, on one connection.
    requests = [send_request(campaign, 93, a, step_id=f"s{i}") for i, a in enumerate(addresses)]
    await publish_all(kafka, requests)
    with serving(handler) as controller:
        try:
            async with one_connection(
                stack, database, prefix, f"127.0.0.1:{controller.port}"
            ) as sender:
                ctx = sender.runtime.app[CONTEXT]

                async def holding() -> list[str]:
                    return handler.held

                (first,) = await eventually(holding)
                await kafka.send(
                    Topic.CAMPAIGN_CONTROL, campaign, by_domains(campaign, "pause", [HELD])
                )

                async def applied() -> bool:
                    return ctx.held.get(campaign) == frozenset({HELD})

                await eventually(applied)
                handler.release.set()
                # handled after the three; before it, a result for what was not held
                got = await barrier(kafka, 93, len({first, f"a@{OPEN}"}))
        finally:
            handler.release.set()
    delivered = {first, f"a@{OPEN}", "c93@example.com"}  # the barrier's
    assert {r["email"] for r in got} == delivered
    assert len(got) == len(delivered)
    assert recipients(kept(handler)) == dict.fromkeys(delivered, 1)
    assert {f"b@{HELD}", f"c@{HELD}"} - delivered  # at least one of them was held back
