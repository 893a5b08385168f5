"""The complaint guard in the scheduler (issue 21; services/scheduler/guard.py): a
``campaign.guard`` record holds a campaign's mail to some receiving domains until an operator
resumes them. Real scheduler and contacts services, real PostgreSQL and Kafka-protocol broker;
deliverability and the sender are played by the test (it publishes ``campaign.guard`` and
``delivery.results`` and reads ``send.requests`` and ``campaign.control``)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from typing import Any

from libs.common.topics import Topic
from services.scheduler.clock import FakeClock
from tests.conftest import eventually
from tests.integration.test_contacts_api import published
from tests.integration.test_contacts_projections import publish_together
from tests.integration.test_scheduler import (
    campaign_body,
    category,
    counters,
    fake_clock,
    group,
    people,
    play_sender,
    released,
    reserved,
    result,
    send_requests,
    status_of,
    ticks,
)

DOCOMO = "docomo.ne.jp"
REASON = "complaint_rate 0.0052 > 0.0030 (13/2500 delivered)"


def guard_record(campaign_id: str, domains: list[str], **changes: Any) -> dict[str, Any]:
    """What deliverability publishes when a campaign trips the complaint guard."""
    value = {
        "guard_id": str(uuid.uuid4()),
        "campaign_id": campaign_id,
        "domains": domains,
        "reason": REASON,
        "delivered": 2500,
        "complaints": 13,
        "decided_at": dt.datetime.now(dt.UTC),
    }
    value.update(changes)
    return value


async def publish_guard(kafka: Any, *records: dict[str, Any]) -> None:
    await publish_together(kafka, Topic.CAMPAIGN_GUARD, [(r["campaign_id"], r) for r in records])


async def controls_of(scheduler: Any, kafka: Any, campaign_id: str) -> list[tuple[str, list[str]]]:
    return [
        (c["action"], c["domains"])
        for c in await published(scheduler, kafka, Topic.CAMPAIGN_CONTROL)
        if c["campaign_id"] == campaign_id
    ]


async def guard_of(scheduler: Any, campaign_id: str) -> dict[str, Any]:
    async def tripped() -> dict[str, Any]:
        body = await scheduler.api.ok("GET", f"/v1/campaigns/{campaign_id}")
        assert body["guard"] is not None
        return body

    return await eventually(tripped)


async def sending_campaign(
    scheduler: Any, contacts: Any, others: int, held: list[str]
) -> tuple[FakeClock, str, list[int]]:
    """A campaign reserved for a group of ``others`` people (p0..@example.jp) and one contact
    per address of ``held`` (the domain a test will hold), its send time reached on the
    scheduler's fake clock: the clock, the campaign's id and the ``held`` contacts' ids."""
    clock = fake_clock(scheduler)
    members = await group(contacts)
    await people(contacts, others, members)
    ids = [
        (await contacts.api.ok("POST", "/v1/contacts", {"email": email}))["id"] for email in held
    ]
    await contacts.api.ok("POST", f"/v1/groups/{members}/members", {"contact_ids": ids})
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    clock.advance(minutes=10)
    return clock, campaign["id"], ids


async def test_a_held_domain_waits_until_an_operator_resumes_it(scheduler, contacts, kafka):
    """Two receiving domains; the guard holds docomo.ne.jp after its three requests went out
    without a result: the sender is told to pause that domain, its rows are not released
    again (not by the result timeout either) and the campaign stays sending, showing why.
    A resume by a named person sends them again (attempt 2) and the campaign finishes."""
    api = scheduler.api
    clock, cid, docomo = await sending_campaign(
        scheduler, contacts, 3, [f"d{i}@DoCoMo.ne.jp" for i in range(3)]
    )
    first = await send_requests(kafka, cid, 6)
    await play_sender(kafka, [result(r) for r in first if r["contact_id"] not in docomo])

    async def counted() -> bool:
        return (await api.ok("GET", f"/v1/campaigns/{cid}"))["success"] == 3

    await eventually(counted)
    assert (await api.ok("GET", f"/v1/campaigns/{cid}"))["guard"] is None

    tripped = guard_record(cid, [DOCOMO])
    await publish_guard(kafka, tripped, tripped)  # a redelivered copy has no second effect

    async def paused() -> bool:
        return await controls_of(scheduler, kafka, cid) == [("pause", [DOCOMO])]

    await eventually(paused)
    body = await guard_of(scheduler, cid)
    guard = body["guard"]
    assert (guard["held"], guard["resumed"], guard["held_recipients"]) == ([DOCOMO], [], 3)
    assert (guard["reason"], guard["delivered"], guard["complaints"]) == (REASON, 2500, 13)
    assert guard["resumed_by"] is None
    listed = (await api.ok("GET", "/v1/campaigns"))["items"]
    assert [c["guard"]["held"] for c in listed if c["id"] == cid] == [[DOCOMO]]

    # Past the result timeout (twice, so every release would be used up): nothing to the
    # held domain goes out again, and the campaign is neither given up nor sent.
    for _ in range(2):
        clock.advance(hours=2)
        await ticks(scheduler, 5)
    held = await api.ok("GET", f"/v1/campaigns/{cid}")
    assert (held["status"], held["pending"], held["guard"]["held_recipients"]) == ("sending", 3, 3)
    assert Counter(r["attempt"] for r in await released(kafka, cid)) == {1: 6}

    # The operator resumes the domain; their name is kept.
    status, problem = await api.call(
        "POST", f"/v1/campaigns/{cid}/guard/resume", {"domains": ["ezweb.ne.jp"]}
    )
    assert status == 409, problem
    resumed = await api.ok(
        "POST",
        f"/v1/campaigns/{cid}/guard/resume",
        {"domains": ["DOCOMO.ne.jp"]},
        headers={"X-Tayori-Requested-By": "hanako%40shop.example.jp"},
    )
    assert (resumed["guard"]["held"], resumed["guard"]["resumed"]) == ([], [DOCOMO])
    assert resumed["guard"]["resumed_by"] == "hanako@shop.example.jp"
    again = await send_requests(kafka, cid, 3, attempt=2)
    assert sorted(r["contact_id"] for r in again) == sorted(docomo)

    async def resumed_on_topic() -> bool:
        return await controls_of(scheduler, kafka, cid) == [
            ("pause", [DOCOMO]),
            ("resume", [DOCOMO]),
        ]

    await eventually(resumed_on_topic)
    # Nothing is held any more: a resume of everything has nothing to do.
    assert (await api.call("POST", f"/v1/campaigns/{cid}/guard/resume"))[0] == 409

    await play_sender(kafka, [result(r) for r in again])
    done = await status_of(scheduler, cid, "aggregating")
    assert counters(done) == {"planned": 6, "success": 6, "error": 0, "suppressed": 0, "unsent": 0}
    assert (done["released"], done["re_released"]) == (6, 3)
    assert done["guard"]["resumed"] == [DOCOMO] and done["guard"]["held_recipients"] == 0

    # The latest record names the resumed domain again (the whole set, grown): only the new
    # domain is held, and a finished campaign is not paused any more.
    await publish_guard(kafka, guard_record(cid, [DOCOMO, "gmail.com"], delivered=3000))

    async def grown() -> dict[str, Any]:
        body = await api.ok("GET", f"/v1/campaigns/{cid}")
        assert body["guard"]["held"] == ["gmail.com"] and body["guard"]["delivered"] == 3000
        return body

    await eventually(grown)
    await ticks(scheduler)
    assert [a for a, _ in await controls_of(scheduler, kafka, cid)] == ["pause", "resume"]


async def test_guard_records_and_resumes_that_change_nothing(scheduler, contacts, kafka):
    """A finished campaign's record is kept for display only; a record no campaign could use
    is dead-lettered; one for a campaign this scheduler does not have is dropped; a resume
    is validated, and answers 404 / 409 where nothing is held."""
    clock = fake_clock(scheduler)
    api = scheduler.api
    members = await group(contacts)
    cat = await category(scheduler)
    draft = await api.ok(
        "POST", "/v1/campaigns", campaign_body(cat, clock, target={"group_id": members})
    )
    cid = draft["id"]
    assert (await api.call("POST", f"/v1/campaigns/{cid}/guard/resume", {}))[0] == 409
    await api.ok("POST", f"/v1/campaigns/{cid}/cancel")

    bad = guard_record("not-a-uuid", [DOCOMO])
    await publish_guard(
        kafka, bad, guard_record(str(uuid.uuid4()), [DOCOMO]), guard_record(cid, [DOCOMO])
    )
    body = await guard_of(scheduler, cid)
    assert body["guard"]["held"] == [DOCOMO] and body["status"] == "cancelled"

    async def dead_lettered() -> bool:
        return len(await kafka.read_to_end(Topic.CAMPAIGN_GUARD.dlq)) == 1

    await eventually(dead_lettered)

    for payload, field in (
        ({"domains": []}, "domains"),
        ({"domains": ["a@docomo.ne.jp"]}, "domains.0"),
        ({"domains": DOCOMO}, "domains"),
        ({"domain": [DOCOMO]}, "domain"),
    ):
        status, problem = await api.call("POST", f"/v1/campaigns/{cid}/guard/resume", payload)
        assert status == 400, (payload, problem)
        assert problem["field"] == field, (payload, problem)
    unknown = f"/v1/campaigns/{uuid.uuid4()}/guard/resume"
    assert (await api.call("POST", unknown))[0] == 404
    resumed = await api.ok("POST", f"/v1/campaigns/{cid}/guard/resume")
    assert (resumed["guard"]["held"], resumed["guard"]["resumed"]) == ([], [DOCOMO])
    # A cancelled campaign is neither paused nor resumed on the topic.
    assert [a for a, _ in await controls_of(scheduler, kafka, cid)] == ["cancel"]


async def test_an_operator_gives_a_held_domain_up_and_the_campaign_finishes(
    scheduler, contacts, kafka
):
    """配信中止: the held domain's recipients without a result are counted suppressed (no
    mail, nothing released again), the sender is not told to resume, the campaign finishes,
    and a later record naming the domain again does not hold it."""
    api = scheduler.api
    _, cid, docomo = await sending_campaign(
        scheduler, contacts, 2, [f"g{i}@docomo.ne.jp" for i in range(2)]
    )
    first = await send_requests(kafka, cid, 4)
    await publish_guard(kafka, guard_record(cid, [DOCOMO]))

    async def paused() -> bool:
        return await controls_of(scheduler, kafka, cid) == [("pause", [DOCOMO])]

    await eventually(paused)
    await play_sender(kafka, [result(r) for r in first if r["contact_id"] not in docomo])

    async def counted() -> bool:
        return (await api.ok("GET", f"/v1/campaigns/{cid}"))["success"] == 2

    await eventually(counted)
    await ticks(scheduler, 3)
    assert (await api.ok("GET", f"/v1/campaigns/{cid}"))["status"] == "sending"

    assert (await api.call("POST", f"/v1/campaigns/{cid}/guard/drop", {"domains": ["x.jp"]}))[
        0
    ] == 409
    dropped = await api.ok(
        "POST",
        f"/v1/campaigns/{cid}/guard/drop",
        headers={"X-Tayori-Requested-By": "taro"},
    )
    guard = dropped["guard"]
    assert (guard["held"], guard["resumed"], guard["dropped"]) == ([], [], [DOCOMO])
    assert guard["resumed_by"] == "taro"
    assert dropped["suppressed"] == 2

    done = await status_of(scheduler, cid, "aggregating")
    assert counters(done) == {"planned": 4, "success": 2, "error": 0, "suppressed": 2, "unsent": 0}
    assert Counter(r["attempt"] for r in await released(kafka, cid)) == {1: 4}
    # A later record naming the dropped domain again holds nothing; nothing was resumed.
    await publish_guard(kafka, guard_record(cid, [DOCOMO, "gmail.com"], delivered=3000))

    async def grown() -> bool:
        body = await api.ok("GET", f"/v1/campaigns/{cid}")
        return body["guard"]["held"] == ["gmail.com"]

    await eventually(grown)
    assert [a for a, _ in await controls_of(scheduler, kafka, cid)] == ["pause"]
