"""The scheduler end to end: real scheduler and contacts services, real PostgreSQL, real
Kafka-protocol broker. The sender is played by the test: it reads ``send.requests`` with
the kafka fixture and publishes ``delivery.results`` itself.

Time is injected: each test replaces the running scheduler's clock with a FakeClock and
moves it (past ``scheduled_at``, in and out of the category's window, past the aggregation
period) instead of waiting::

    clock = FakeClock(NOON_TOKYO)
    context_of(scheduler.runtime).clock = clock
    clock.advance(minutes=10)

To see that a tick changed nothing, a test waits for a few release-loop ticks
(``context_of(runtime).ticks``) and then looks.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import uuid
from typing import Any

from libs.common.topics import Topic
from services.scheduler.clock import FakeClock
from services.scheduler.context import context_of
from tests.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, eventually, running
from tests.integration.test_contacts_api import define_fields, ids_of, published
from tests.integration.test_contacts_projections import publish_together

#: 12:00 in Tokyo: inside 08:00-21:00 Asia/Tokyo.
NOON_TOKYO = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)


# Helpers --------------------------------------------------------------------------------------


def fake_clock(scheduler: Any, at: dt.datetime = NOON_TOKYO) -> FakeClock:
    clock = FakeClock(at)
    context_of(scheduler.runtime).clock = clock
    return clock


async def ticks(scheduler: Any, n: int = 3) -> None:
    """Until the release loop has completed ``n`` more ticks (with the clock as it is now)."""
    ctx = context_of(scheduler.runtime)
    target = ctx.ticks + n

    async def done() -> bool:
        return ctx.ticks >= target

    await eventually(done)


async def category(
    scheduler: Any, start: str = "08:00", end: str = "21:00", zone: str = "Asia/Tokyo"
) -> int:
    body = await scheduler.api.ok(
        "POST",
        "/v1/categories",
        {"name": "メルマガ", "window_start": start, "window_end": end, "time_zone": zone},
    )
    return int(body["id"])


async def people(
    contacts: Any, n: int, group: int | None = None, *, first: int = 0, **extra: Any
) -> list[int]:
    """``n`` contacts p<first>..@example.jp (p<i> named 顧客 i, company 会社i), members of
    ``group`` if given."""
    api = contacts.api
    ids: list[int] = []
    for start in range(0, n, 50):
        created = await asyncio.gather(
            *(
                api.ok(
                    "POST",
                    "/v1/contacts",
                    {
                        "email": f"p{i}@example.jp",
                        "name": f"顧客 {i}",
                        "company": f"会社{i}",
                        **extra,
                    },
                )
                for i in range(first + start, first + min(n, start + 50))
            )
        )
        ids.extend(c["id"] for c in created)
    if group is not None:
        await api.ok("POST", f"/v1/groups/{group}/members", {"contact_ids": ids})
    return ids


async def group(contacts: Any, name: str = "メルマガ会員") -> int:
    return int((await contacts.api.ok("POST", "/v1/groups", {"name": name}))["id"])


def campaign_body(category: int, clock: FakeClock, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "11月のお知らせ",
        "category_id": category,
        "target": {"group_id": None},
        "from_address": "news@shop.example.jp",
        "from_name": "ショップ便り",
        "reply_to": "support@shop.example.jp",
        "subject": "<#氏名>様へ 11月のお知らせ",
        "format": "text",
        "body": "<#name>様\n<#company>\n配信停止: <#unsubscribe_url>\n",
        "scheduled_at": (clock.now() + dt.timedelta(minutes=5)).isoformat(),
    }
    body.update(changes)
    return body


async def status_of(scheduler: Any, campaign_id: str, wanted: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any]:
        body = await scheduler.api.ok("GET", f"/v1/campaigns/{campaign_id}")
        assert body["status"] == wanted, body["status"]
        return body

    return await eventually(reached)


async def reserved(scheduler: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Create and reserve a campaign; wait until its list is frozen (scheduled)."""
    campaign = await scheduler.api.ok("POST", "/v1/campaigns", body)
    await scheduler.api.ok("POST", f"/v1/campaigns/{campaign['id']}/reserve")
    return await status_of(scheduler, campaign["id"], "scheduled")


async def send_requests(kafka: Any, campaign_id: str, n: int, **match: Any) -> list[dict[str, Any]]:
    """The first ``n`` send.requests of a campaign (matching ``match``), waiting for them;
    release checkpoints are left out."""

    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            r
            for r in records
            if r["campaign_id"] == campaign_id
            and not r["checkpoint"]
            and all(r[k] == v for k, v in match.items())
        ]

    records = await kafka.read(Topic.SEND_REQUESTS, until=lambda rs: len(mine(rs)) >= n)
    return mine(records)


async def released(kafka: Any, campaign_id: str) -> list[dict[str, Any]]:
    """Every send.request of a campaign on the topic now, release checkpoints left out."""
    return [
        r
        for r in await kafka.read_to_end(Topic.SEND_REQUESTS)
        if r["campaign_id"] == campaign_id and not r["checkpoint"]
    ]


def result(
    request: dict[str, Any], outcome: str = "sent", result_id: str | None = None
) -> dict[str, Any]:
    """The sender's answer to a send request."""
    return {
        "result_id": result_id or str(uuid.uuid4()),
        "campaign_id": request["campaign_id"],
        "contact_id": request["contact_id"],
        "email": request["email"],
        "outcome": outcome,
        "smtp_code": 250 if outcome == "sent" else 550,
        "enhanced_code": None,
        "diagnostic": None,
        "relay": "127.0.0.1:25",
        "message_id": None,
        "step_id": request["step_id"],
        "suppressed_reason": "unsubscribed" if outcome == "suppressed" else None,
        "occurred_at": dt.datetime.now(dt.UTC),
    }


async def play_sender(kafka: Any, results: list[dict[str, Any]]) -> None:
    await publish_together(kafka, Topic.DELIVERY_RESULTS, [(r["contact_id"], r) for r in results])


def counters(body: dict[str, Any]) -> dict[str, int]:
    return {k: body[k] for k in ("planned", "success", "error", "suppressed", "unsent")}


# Tests ----------------------------------------------------------------------------------------


async def test_categories_and_their_windows(scheduler):
    api = scheduler.api
    tokyo = await category(scheduler)
    night = await category(scheduler, "22:00", "06:00", "Europe/Berlin")
    listed = await api.ok("GET", "/v1/categories")
    assert [
        (c["id"], c["window_start"], c["window_end"], c["time_zone"]) for c in listed["items"]
    ] == [
        (tokyo, "08:00", "21:00", "Asia/Tokyo"),
        (night, "22:00", "06:00", "Europe/Berlin"),
    ]
    bad = [
        ({"window_start": "8:00"}, "window_start"),
        ({"window_end": "24:00"}, "window_end"),
        ({"time_zone": "Mars/Olympus"}, "time_zone"),
        ({"time_zone": "../etc/passwd"}, "time_zone"),
        ({"name": " "}, "name"),
    ]
    base = {"name": "x", "window_start": "08:00", "window_end": "21:00", "time_zone": "UTC"}
    for change, field in bad:
        status, body = await api.call("POST", "/v1/categories", {**base, **change})
        assert (status, body.get("field")) == (400, field), (change, body)
    status, _ = await api.call("POST", "/v1/categories", base, token=VIEWER_TOKEN)
    assert status == 403
    assert (await api.call("GET", "/v1/categories", token=VIEWER_TOKEN))[0] == 200
    changed = await api.ok(
        "PUT", f"/v1/categories/{night}", {**base, "name": "夜間", "window_start": "23:30"}
    )
    assert (changed["name"], changed["window_start"], changed["time_zone"]) == (
        "夜間",
        "23:30",
        "UTC",
    )
    assert (await api.call("PUT", f"/v1/categories/{night}", base, token=OPERATOR_TOKEN))[0] == 403
    assert (await api.call("GET", "/v1/categories/999"))[0] == 404

    clock = fake_clock(scheduler)
    await api.ok(
        "POST",
        "/v1/campaigns",
        campaign_body(tokyo, clock, target={"filter": {"field": "name", "op": "not_empty"}}),
    )
    status, body = await api.call("DELETE", f"/v1/categories/{tokyo}")
    assert status == 409, body
    assert (await api.call("DELETE", f"/v1/categories/{night}"))[0] == 204
    assert (await api.call("GET", f"/v1/categories/{night}"))[0] == 404


async def test_campaign_validation(scheduler, contacts):
    await define_fields(contacts.api)
    api = scheduler.api
    clock = fake_clock(scheduler)
    cat = await category(scheduler)
    everyone = {"filter": {"field": "name", "op": "not_empty"}}

    def body(**changes: Any) -> dict[str, Any]:
        return campaign_body(cat, clock, **{"target": everyone, **changes})

    good = await api.ok(
        "POST",
        "/v1/campaigns",
        body(
            subject="<#会社名> <#name>様",
            body="<#plan> <#custom.seats> <#配信停止URL> <#coupon_url>",
            format="html",
            coupon_url="https://shop.example.jp/c/<#contact_id>",
            dedupe="by_email",
        ),
    )
    assert good["status"] == "draft" and good["planned"] == 0
    # An HTML campaign previews with its text part and the coupon rendered per recipient.
    preview = await api.ok("GET", f"/v1/campaigns/{good['id']}/preview", token=VIEWER_TOKEN)
    assert preview["subject"] == "株式会社サンプル 山田 太郎様"
    assert preview["html"].endswith("https://shop.example.jp/c/0")
    assert preview["text"] == preview["html"]  # no markup in this body
    assert "multipart/alternative" in preview["mime"]
    at = clock.now()
    cases = [
        (body(body="こんにちは <#nickname>"), "body", "<#nickname>"),
        (body(subject="<#Name> さん"), "subject", "<#Name>"),
        (body(body="<#クーポンURL>"), "body", "coupon"),
        (
            body(scheduled_at=(at + dt.timedelta(minutes=2)).isoformat()),
            "scheduled_at",
            "3 minutes",
        ),
        (body(scheduled_at=(at - dt.timedelta(days=1)).isoformat()), "scheduled_at", "3 minutes"),
        (body(scheduled_at="2026-12-01T10:00:00"), "scheduled_at", "offset"),
        (body(scheduled_at=None), "scheduled_at", "required"),
        (body(subject=""), "subject", "empty"),
        (body(subject="two\nlines"), "subject", "one line"),
        (body(body="   "), "body", "empty"),
        (body(from_address="news at shop"), "from_address", "email address"),
        (body(from_address="a@b@c.jp"), "from_address", "email address"),
        (body(reply_to="support@"), "reply_to", "email address"),
        (body(format="pdf"), "format", "text or html"),
        (body(dedupe="sometimes"), "dedupe", "by_email"),
        (body(category_id=9999), "category_id", "does not exist"),
        (body(target={}), "target", "group_id"),
        (
            body(target={"filter": {"field": "shoe_size", "op": "eq", "value": 1}}),
            "target.filter",
            "",
        ),
    ]
    for payload, field, words in cases:
        status, answer = await api.call("POST", "/v1/campaigns", payload)
        assert status == 400 and answer.get("field") == field, (field, status, answer)
        assert words in answer["error"], answer
    status, _ = await api.call("POST", "/v1/campaigns", body(), token=VIEWER_TOKEN)
    assert status == 403
    by_operator = await api.ok("POST", "/v1/campaigns", body(name="二通目"), token=OPERATOR_TOKEN)

    page = await api.ok("GET", "/v1/campaigns?limit=1", token=VIEWER_TOKEN)
    assert [c["id"] for c in page["items"]] == [by_operator["id"]]
    rest = await api.ok("GET", f"/v1/campaigns?limit=1&cursor={page['next_cursor']}")
    assert [c["id"] for c in rest["items"]] == [good["id"]] and rest["next_cursor"] is None
    assert (await api.call("GET", f"/v1/campaigns/{uuid.uuid4()}"))[0] == 404
    assert (await api.call("GET", "/v1/campaigns/not-a-uuid"))[0] == 404

    # Test sends: at most 20 valid addresses.
    many = ", ".join(f"t{i}@example.jp" for i in range(21))
    for addresses, words in (
        (many, "at most 20"),
        ("a@example.jp, nobody", "email address"),
        ("", "at least"),
    ):
        status, answer = await api.call(
            "POST", f"/v1/campaigns/{good['id']}/test-send", {"addresses": addresses}
        )
        assert status == 400 and answer["field"] == "addresses" and words in answer["error"], answer


async def test_reserve_release_count_and_finish(scheduler, contacts, kafka):
    """The whole life of a campaign: the frozen list equals the search, every recipient is
    released with its content and merge values, results move the counters and the status."""
    clock = fake_clock(scheduler)
    api = scheduler.api
    members = await group(contacts)
    ids = await people(contacts, 6, members)
    outsider = (await people(contacts, 1, first=100))[0]  # not a member: never a recipient
    await contacts.api.ok("PATCH", f"/v1/contacts/{ids[5]}", {"company": "=HYPERLINK(1)"})
    cat = await category(scheduler)
    target_filter = {"field": "email", "op": "ne", "value": "p2@example.jp"}
    body = campaign_body(cat, clock, target={"group_id": members, "filter": target_filter})
    campaign = await reserved(scheduler, body)
    cid = campaign["id"]
    expected = await ids_of(
        contacts.api,
        {"all": [{"membership": {"group_id": members, "state": "deliverable"}}, target_filter]},
    )
    assert sorted(expected) == sorted(i for i in ids if i != ids[2]) and outsider not in expected
    assert counters(campaign) == {
        "planned": 5,
        "success": 0,
        "error": 0,
        "suppressed": 0,
        "unsent": 0,
    }
    # Not given up: waiting to be sent.
    assert (campaign["pending"], campaign["released"], campaign["re_released"]) == (5, 0, 0)
    [snapshot] = [
        r
        for r in await published(scheduler, kafka, Topic.SNAPSHOT_REQUESTS)
        if r["campaign_id"] == cid
    ]
    assert (snapshot["group_id"], snapshot["include_unsubscribed"]) == (members, False)

    # Reserving twice is refused; the frozen list is there to download.
    status, answer = await api.call("POST", f"/v1/campaigns/{cid}/reserve")
    assert status == 409, answer
    status, text = await api.call("GET", f"/v1/campaigns/{cid}/recipients.csv", token=VIEWER_TOKEN)
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0])[:5] == ["seq", "contact_id", "email", "group_id", "membership_state"]
    assert [int(r["contact_id"]) for r in rows] == expected
    assert [r["seq"] for r in rows] == [str(i) for i in range(5)]
    assert {r["membership_state"] for r in rows} == {"deliverable"}
    # people() creates contacts concurrently: the list is in id order, not creation order.
    n = ids.index(expected[0])  # the first recipient is 顧客 n, p<n>@example.jp
    by_id = {int(r["contact_id"]): r for r in rows}
    assert rows[0]["name"] == f"顧客 {n}" and by_id[ids[5]]["company"] == "'=HYPERLINK(1)"

    # Preview: the first recipient, rendered as the sender will.
    preview = await api.ok("GET", f"/v1/campaigns/{cid}/preview")
    assert preview["subject"] == f"顧客 {n}様へ 11月のお知らせ"
    assert preview["text"] == f"顧客 {n}様\n会社{n}\n配信停止: http://127.0.0.1:8082/u/preview\n"
    assert preview["html"] is None
    assert preview["from"] == "news@shop.example.jp" and preview["to"] == f"p{n}@example.jp"
    assert "Subject: =?UTF-8?B?" in preview["mime"]
    other = await api.ok("GET", f"/v1/campaigns/{cid}/preview?contact_id={ids[3]}")
    assert other["subject"].startswith("顧客 3様")
    assert (await api.call("GET", f"/v1/campaigns/{cid}/preview?contact_id={outsider}"))[0] == 404

    # Not yet time: nothing is released.
    await ticks(scheduler)
    assert (await api.ok("GET", f"/v1/campaigns/{cid}"))["status"] == "scheduled"
    clock.advance(minutes=6)
    requests = await send_requests(kafka, cid, 5)
    assert sorted(r["contact_id"] for r in requests) == sorted(expected)
    first = next(r for r in requests if r["contact_id"] == ids[0])
    # The content goes out once, on campaign.content; each request names it (v4).
    assert {r["content_id"] for r in requests} == {first["content_id"]}
    assert first["content"]["body"] == "" and first["content_id"].startswith("c1-")
    # Once, or again beside a release checkpoint (due at once: the clock moved 6 minutes),
    # always the same record under the same key of the compacted topic.
    contents = [
        c
        for c in await kafka.read_to_end(Topic.CAMPAIGN_CONTENT)
        if c["content_id"] == first["content_id"]
    ]
    content = contents[0]
    assert all(c["content"] == content["content"] for c in contents)
    assert content["campaign_id"] == cid
    assert content["content"] == {
        "from_address": "news@shop.example.jp",
        "from_name": "ショップ便り",
        "reply_to": "support@shop.example.jp",
        "subject": "<#氏名>様へ 11月のお知らせ",
        "format": "text",
        "body": body["body"],
        "coupon_url": None,
        "track_opens": True,
        "track_clicks": True,
    }
    assert first["merge_values"]["name"] == "顧客 0" and first["merge_values"]["company"] == "会社0"
    assert (first["email"], first["group_id"], first["attempt"], first["test"]) == (
        "p0@example.jp",
        members,
        1,
        False,
    )
    assert first["step_id"] is None and len({r["request_id"] for r in requests}) == 5
    sending = await status_of(scheduler, cid, "sending")
    status, answer = await api.call("POST", f"/v1/campaigns/{cid}/cancel")
    assert status == 409, answer

    # Results: a duplicate result id counts once; a second result of a recipient changes nothing.
    by_contact = {r["contact_id"]: r for r in requests}
    once = result(by_contact[expected[0]])
    results = [
        once,
        dict(once),
        result(by_contact[expected[0]], "permanent_error"),
        result(by_contact[expected[1]], "permanent_error"),
        result(by_contact[expected[2]], "suppressed"),
        result(by_contact[expected[3]], "sent"),
    ]
    await play_sender(kafka, results)

    async def counted() -> bool:
        body = await api.ok("GET", f"/v1/campaigns/{cid}")
        return counters(body) == {
            "planned": 5,
            "success": 2,
            "error": 1,
            "suppressed": 1,
            "unsent": 0,
        } and (body["pending"], body["released"]) == (1, 5)

    await eventually(counted)
    assert sending["started_at"] is not None
    await play_sender(kafka, [result(by_contact[expected[4]], "temporary_error")])
    await status_of(scheduler, cid, "aggregating")
    clock.advance(hours=1, seconds=1)
    done = await status_of(scheduler, cid, "aggregated")
    assert counters(done) == {"planned": 5, "success": 2, "error": 2, "suppressed": 1, "unsent": 0}
    assert [h["status"] for h in done["history"]] == [
        "draft",
        "reserving",
        "scheduled",
        "sending",
        "sent",
        "aggregating",
        "aggregated",
    ]
    # Nothing was released twice.
    assert len(await released(kafka, cid)) == 5


async def test_empty_target_fails_and_cancel(scheduler, contacts, kafka):
    clock = fake_clock(scheduler)
    api = scheduler.api
    members = await group(contacts)
    await people(contacts, 2)  # not members
    cat = await category(scheduler)
    campaign = await api.ok(
        "POST", "/v1/campaigns", campaign_body(cat, clock, target={"group_id": members})
    )
    await api.ok("POST", f"/v1/campaigns/{campaign['id']}/reserve", token=OPERATOR_TOKEN)
    failed = await status_of(scheduler, campaign["id"], "failed")
    assert failed["status_label"] == "配信失敗" and "no recipients" in failed["status_reason"]
    assert counters(failed)["planned"] == 0
    assert (await api.call("POST", f"/v1/campaigns/{campaign['id']}/cancel"))[0] == 409

    # A snapshot the contacts service refuses (a saved filter that does not exist) fails too.
    broken = await api.ok(
        "POST", "/v1/campaigns", campaign_body(cat, clock, target={"group_id": members + 1000})
    )
    await api.ok("POST", f"/v1/campaigns/{broken['id']}/reserve")
    failed = await status_of(scheduler, broken["id"], "failed")
    assert "snapshot failed" in failed["status_reason"]

    # Cancel before sending: draft and scheduled; campaign.control says so.
    draft = await api.ok(
        "POST", "/v1/campaigns", campaign_body(cat, clock, target={"group_id": members})
    )
    status, _ = await api.call("POST", f"/v1/campaigns/{draft['id']}/reserve", token=VIEWER_TOKEN)
    assert status == 403
    cancelled = await api.ok("POST", f"/v1/campaigns/{draft['id']}/cancel", token=OPERATOR_TOKEN)
    assert cancelled["status"] == "cancelled"
    assert (await api.call("POST", f"/v1/campaigns/{draft['id']}/reserve"))[0] == 409
    assert (await api.call("GET", f"/v1/campaigns/{draft['id']}/recipients.csv"))[0] == 409
    controls = await published(scheduler, kafka, Topic.CAMPAIGN_CONTROL)
    assert [(c["campaign_id"], c["action"]) for c in controls] == [(draft["id"], "cancel")]


async def test_window_pauses_and_resumes(scheduler, contacts, kafka):
    """Outside the window nothing starts; a window closing mid-campaign pauses it; when it
    opens again the rows without a result go out again with attempt 2."""
    # 21:30 in Tokyo: the 08:00-21:00 window is closed.
    clock = fake_clock(scheduler, dt.datetime(2026, 11, 26, 12, 30, tzinfo=dt.UTC))
    api = scheduler.api
    members = await group(contacts)
    ids = await people(contacts, 4, members)
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    cid = campaign["id"]
    clock.advance(minutes=10)
    await ticks(scheduler)
    assert (await api.ok("GET", f"/v1/campaigns/{cid}"))["status"] == "scheduled"
    assert await released(kafka, cid) == []

    # 08:00 the next morning: sending starts.
    clock.set(dt.datetime(2026, 11, 26, 23, 0, tzinfo=dt.UTC))
    requests = await send_requests(kafka, cid, 4)
    await status_of(scheduler, cid, "sending")
    by_contact = {r["contact_id"]: r for r in requests}
    await play_sender(kafka, [result(by_contact[ids[0]]), result(by_contact[ids[1]])])

    async def counted(n: int) -> Any:
        async def check() -> bool:
            body = await api.ok("GET", f"/v1/campaigns/{cid}")
            return body["success"] == n

        await eventually(check)

    await counted(2)
    # 21:00 sharp: the window closes (end is exclusive); the campaign waits, paused.
    clock.set(dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC))

    async def paused() -> bool:
        body = await api.ok("GET", f"/v1/campaigns/{cid}")
        return body["paused"] and body["status"] == "sending"

    await eventually(paused)
    await ticks(scheduler)
    controls = await published(scheduler, kafka, Topic.CAMPAIGN_CONTROL)
    assert [c["action"] for c in controls] == ["pause"]
    assert "08:00-21:00 Asia/Tokyo" in controls[0]["reason"]
    assert len(await released(kafka, cid)) == 4

    # The next morning: resume, and the two rows without a result are released again.
    clock.set(dt.datetime(2026, 11, 27, 23, 30, tzinfo=dt.UTC))
    again = await send_requests(kafka, cid, 2, attempt=2)
    assert sorted(r["contact_id"] for r in again) == sorted(ids[2:])

    async def resumed() -> bool:
        # The requests are acknowledged before the transaction holding "resume" commits.
        controls = await published(scheduler, kafka, Topic.CAMPAIGN_CONTROL)
        return [c["action"] for c in controls] == ["pause", "resume"]

    await eventually(resumed)
    await play_sender(kafka, [result(r) for r in again])
    sent = await status_of(scheduler, cid, "aggregating")
    assert counters(sent) == {"planned": 4, "success": 4, "error": 0, "suppressed": 0, "unsent": 0}
    assert not sent["paused"]
    # Released once each, never more than planned; the two without a result went again.
    assert (sent["released"], sent["re_released"], sent["pending"]) == (4, 2, 0)


async def test_rows_without_a_result_go_out_again_then_are_given_up(scheduler, contacts, kafka):
    """A request that never gets a result (dead-lettered, lost) is released again after
    SCHEDULER_RESULT_TIMEOUT_SECONDS, up to SCHEDULER_MAX_RELEASES releases; then the
    campaign is sent without it, counted unsent, and a late result still counts."""
    clock = fake_clock(scheduler)
    api = scheduler.api
    members = await group(contacts)
    ids = await people(contacts, 3, members)
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    cid = campaign["id"]
    clock.advance(minutes=6)
    first = {r["contact_id"]: r for r in await send_requests(kafka, cid, 3)}
    await play_sender(kafka, [result(first[ids[0]])])

    async def counted() -> bool:  # before the clock moves: else it would be overdue too
        return counters(await api.ok("GET", f"/v1/campaigns/{cid}"))["success"] == 1

    await eventually(counted)

    for attempt in (2, 3):
        await ticks(scheduler)
        clock.advance(minutes=29)  # not yet overdue: nothing goes out again
        await ticks(scheduler)
        assert [r for r in await released(kafka, cid) if r["attempt"] == attempt] == []
        clock.advance(minutes=2)
        again = await send_requests(kafka, cid, 2, attempt=attempt)
        assert sorted(r["contact_id"] for r in again) == sorted(ids[1:])

    await ticks(scheduler)
    clock.advance(minutes=31)  # the third release's timeout: nothing is worth waiting for
    sent = await status_of(scheduler, cid, "aggregating")
    assert counters(sent) == {"planned": 3, "success": 1, "error": 0, "suppressed": 0, "unsent": 2}
    assert (sent["released"], sent["re_released"], sent["pending"]) == (3, 4, 0)
    given_up = [h for h in sent["history"] if h["status"] == "sent"]
    assert "2 recipient(s) without a result after 3 releases" in given_up[0]["reason"]
    assert len(await released(kafka, cid)) == 7  # 3 + 2 + 2, no fourth

    await play_sender(kafka, [result(first[ids[1]])])  # a late answer still counts

    async def late() -> bool:
        body = await api.ok("GET", f"/v1/campaigns/{cid}")
        return counters(body)["success"] == 2 and counters(body)["unsent"] == 1

    await eventually(late)


async def test_error_rate_halts_the_campaign(scheduler, contacts, kafka):
    """15% permanent errors over 200 attempts: halted, campaign.control halt, nothing more
    released, and a halted campaign never resumes."""
    clock = fake_clock(scheduler)
    ctx = context_of(scheduler.runtime)
    ctx.release_rate = 100.0  # slow enough that the halt comes mid-campaign
    api = scheduler.api
    members = await group(contacts)
    await people(contacts, 300, members)
    cat = await category(scheduler)
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    cid = campaign["id"]
    clock.advance(minutes=10)
    requests = await send_requests(kafka, cid, 200)
    # The rest goes out slowly now (the rate is by the wall clock), so that the halt comes
    # before it, however slow the machine is at counting the 200 results.
    ctx.release_rate = 1.0
    results = [
        result(r, "permanent_error" if i % 20 < 3 else "sent") for i, r in enumerate(requests[:200])
    ]
    await play_sender(kafka, results)
    halted = await status_of(scheduler, cid, "halted")
    ctx.release_rate = 100.0  # a halted campaign releases nothing, at any rate
    assert counters(halted)["error"] == 30 and counters(halted)["success"] == 170
    assert "15.0% > 10%" in halted["status_reason"]
    controls = await published(scheduler, kafka, Topic.CAMPAIGN_CONTROL)
    assert [(c["campaign_id"], c["action"]) for c in controls] == [(cid, "halt")]
    first_releases = halted["released"]
    assert first_releases < 300 and halted["re_released"] == 0
    clock.advance(hours=2)
    await ticks(scheduler, 5)
    after = await api.ok("GET", f"/v1/campaigns/{cid}")
    assert (after["status"], after["released"]) == ("halted", first_releases)
    sent = await released(kafka, cid)
    assert len(sent) == first_releases
    assert (await api.call("POST", f"/v1/campaigns/{cid}/cancel"))[0] == 409


async def test_test_send_is_marked_and_never_counted(scheduler, contacts, kafka):
    clock = fake_clock(scheduler)
    api = scheduler.api
    members = await group(contacts)
    ids = await people(contacts, 2, members)
    cat = await category(scheduler)
    campaign = await api.ok(
        "POST", "/v1/campaigns", campaign_body(cat, clock, target={"group_id": members})
    )
    cid = campaign["id"]
    sample = await api.ok(
        "POST",
        f"/v1/campaigns/{cid}/test-send",
        {"addresses": "qa@example.jp, boss@example.jp"},
        token=OPERATOR_TOKEN,
    )
    assert sample["requests"] == 2 and sample["contact_id"] == 0
    chosen = await api.ok(
        "POST",
        f"/v1/campaigns/{cid}/test-send",
        {"addresses": "qa@example.jp", "contact_id": ids[1]},
    )
    requests = await send_requests(kafka, cid, 3, test=True)
    by_address = {(r["email"], r["contact_id"]): r for r in requests}
    qa = by_address[("qa@example.jp", 0)]
    assert qa["content"]["subject"] == "[TEST] <#氏名>様へ 11月のお知らせ"
    assert qa["step_id"] == f"test:{sample['test_id']}:0"
    assert by_address[("boss@example.jp", 0)]["step_id"] == f"test:{sample['test_id']}:1"
    assert qa["merge_values"]["name"] == "山田 太郎"
    mine = by_address[("qa@example.jp", ids[1])]
    assert (
        mine["merge_values"]["name"] == "顧客 1"
        and mine["step_id"] == f"test:{chosen['test_id']}:0"
    )
    assert mine["merge_values"]["contact_id"] == str(ids[1])
    assert (
        await api.call(
            "POST",
            f"/v1/campaigns/{cid}/test-send",
            {"addresses": "a@example.jp", "contact_id": 10**9},
        )
    )[0] == 404

    # The preview before reservation uses sample values; a chosen contact's come from contacts.
    preview = await api.ok("GET", f"/v1/campaigns/{cid}/preview")
    assert preview["subject"] == "山田 太郎様へ 11月のお知らせ"
    chosen_preview = await api.ok("GET", f"/v1/campaigns/{cid}/preview?contact_id={ids[0]}")
    assert chosen_preview["to"] == "p0@example.jp" and "会社0" in chosen_preview["text"]

    # Results of test sends are never counted, even when they name a recipient.
    campaign = await reserved(scheduler, campaign_body(cat, clock, target={"group_id": members}))
    test_result = {**result(mine), "campaign_id": campaign["id"], "contact_id": ids[1]}
    real = result({**mine, "step_id": None, "campaign_id": campaign["id"], "contact_id": ids[0]})
    await play_sender(kafka, [test_result, real])

    async def counted() -> dict[str, int]:
        body = counters(await api.ok("GET", f"/v1/campaigns/{campaign['id']}"))
        return body if body["success"] > 0 else {}

    assert (await eventually(counted))["success"] == 1


async def test_two_replicas_never_release_the_same_recipient(
    scheduler, contacts, kafka, stack, database, prefix
):
    """A second scheduler on the same database and topics: the campaign lock makes them
    take turns, so every recipient is released exactly once."""
    members = await group(contacts)
    await people(contacts, 120, members)
    async with running(
        "scheduler", stack, database, prefix, contacts_url=contacts.api.base
    ) as second:
        clocks = [fake_clock(scheduler), fake_clock(second)]
        for replica in (scheduler, second):
            context_of(replica.runtime).release_rate = 100.0  # ~20 per tick each
        cat = await category(scheduler)
        campaign = await reserved(
            scheduler, campaign_body(cat, clocks[0], target={"group_id": members})
        )
        for clock in clocks:
            clock.advance(minutes=10)
        requests = await send_requests(kafka, campaign["id"], 120)
        await ticks(scheduler)
        await ticks(second)
        # Both took turns: each made a release bucket, which happens under the lock.
        for replica in (scheduler, second):
            assert campaign["id"] in context_of(replica.runtime).buckets
    again = await released(kafka, campaign["id"])
    assert len(again) == len({r["contact_id"] for r in requests}) == 120
    assert {r["attempt"] for r in again} == {1}


async def test_a_release_loop_stuck_on_a_hung_call_fails_healthz(scheduler, monkeypatch):
    """/healthz is "the loops are making progress": the release loop beats once a tick, and
    a tick that never returns (a hung dependency) makes the service unhealthy."""
    from libs.common import service
    from services.scheduler import release

    status, body = await scheduler.api.call("GET", "/healthz", token=None)
    assert (status, body["stalled"]) == (200, [])

    async def hung(ctx: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(release, "tick", hung)
    monkeypatch.setattr(service, "STALL_SECONDS", 0.5)

    async def failing() -> bool:
        status, body = await scheduler.api.call("GET", "/healthz", token=None)
        return status == 503 and "release" in body["stalled"]  # (idle consumers may be too)

    await eventually(failing)


# Contracts (issue 17): inputs that once answered 500 are 400 problems naming the value ---------


def problem(status: int, body: Any, pointer: str | None = None) -> None:
    """A 400 problem (RFC 9457) whose first failing value is at ``pointer``."""
    assert status == 400, body
    assert body["status"] == 400 and body["title"] == "Bad Request", body
    if pointer is not None:
        assert body["errors"][0]["pointer"] == pointer, body


async def test_inputs_that_once_answered_500_are_problems(scheduler, contacts):
    api = scheduler.api
    clock = fake_clock(scheduler)
    cat = await category(scheduler)
    base = {"name": "x", "window_start": "08:00", "window_end": "21:00", "time_zone": "UTC"}
    deep = "[" * 5000 + "]" * 5000
    json_header = {"Content-Type": "application/json"}
    for method, path in (
        ("POST", "/v1/categories"),
        ("PUT", f"/v1/categories/{cat}"),
        ("POST", "/v1/campaigns"),
        ("PUT", "/v1/plans/1"),
    ):
        status, body = await api.call(method, path, data=deep, headers=json_header)
        problem(status, body)

    # Ids beyond 64 bits, in a path, a query and a cursor; a malformed cursor.
    status, body = await api.call("GET", "/v1/categories/99999999999999999999")
    problem(status, body, "/id")
    assert body["errors"][0]["location"] == "path"
    for query in ("cursor=99999999999999999999", "cursor=abc", "limit=0", "status=lost"):
        status, body = await api.call("GET", f"/v1/campaigns?{query}")
        problem(status, body)
    status, body = await api.call("GET", "/v1/plans/99999999999999999999/enrolments")
    problem(status, body, "/id")
    status, body = await api.call("GET", "/v1/plans/1/enrolments?contact_id=99999999999999999999")
    problem(status, body, "/contact_id")

    # NUL in a JSON string; a time zone that is a directory; names without limit.
    status, body = await api.call("POST", "/v1/categories", {**base, "name": "a\u0000b"})
    problem(status, body, "/name")
    status, body = await api.call("POST", "/v1/categories", {**base, "time_zone": "Asia"})
    problem(status, body, "/time_zone")
    assert body["field"] == "time_zone" and body["errors"][0]["label"] == "タイムゾーン"
    status, body = await api.call("POST", "/v1/categories", {**base, "name": "x" * 20_000})
    problem(status, body, "/name")
    status, body = await api.call("POST", "/v1/categories", {**base, "description": 5})
    problem(status, body, "/description")
    everyone = {"filter": {"field": "name", "op": "not_empty"}}
    for change, pointer in (
        ({"name": "a\u0000b"}, "/name"),
        ({"name": "x" * 20_000}, "/name"),
        ({"subject": "a\u0000b"}, "/subject"),
        ({"body": "a\u0000b"}, "/body"),
        ({"description": 5}, "/description"),
        ({"category_id": 99999999999999999999}, "/category_id"),
        ({"category_id": "1"}, "/category_id"),
        ({"target": {"group_id": 99999999999999999999}}, "/target/group_id"),
        ({"scheduled_at": "0001-01-01T00:00:00+14:00"}, "/scheduled_at"),
    ):
        payload = campaign_body(cat, clock, **{"target": everyone, **change})
        status, body = await api.call("POST", "/v1/campaigns", payload)
        problem(status, body, pointer)

    # A plan's schedule takes no name (the plan's name is contacts'), nor a huge step list.
    plan = (await contacts.api.ok("POST", "/v1/plans", {"name": "フォロー"}))["id"]
    step = {"day_offset": 0, "send_time": "09:00", "subject": "s", "body": "b"}
    schedule = {"category_id": cat, "from_address": "news@example.jp", "steps": [step]}
    status, body = await api.call("PUT", f"/v1/plans/{plan}", {**schedule, "name": "x" * 20_000})
    problem(status, body, "/name")
    status, body = await api.call("PUT", f"/v1/plans/{plan}", {**schedule, "steps": [step] * 101})
    problem(status, body, "/steps")
    status, body = await api.call(
        "PUT", f"/v1/plans/{plan}", {**schedule, "steps": [{**step, "description": 5}]}
    )
    problem(status, body, "/steps/0/description")

    # Unknown query keys are refused, not ignored.
    status, body = await api.call("GET", "/v1/categories?colour=red")
    problem(status, body, "/colour")
    status, body = await api.call("POST", "/v1/categories?dry_run=1", base)
    problem(status, body, "/dry_run")
    assert body["errors"][0]["location"] == "query"

    # What clients sent before still works: a contact id as digits, an empty one.
    campaign = await api.ok("POST", "/v1/campaigns", campaign_body(cat, clock, target=everyone))
    sent = await api.ok(
        "POST",
        f"/v1/campaigns/{campaign['id']}/test-send",
        {"addresses": ["qa@example.jp"], "contact_id": ""},
    )
    assert sent["contact_id"] == 0
    preview = await api.ok("GET", f"/v1/campaigns/{campaign['id']}/preview?contact_id=")
    assert preview["contact_id"] == 0
    status, body = await api.call(
        "POST",
        f"/v1/campaigns/{campaign['id']}/test-send",
        {"addresses": "qa@example.jp", "contact_id": "99999999999999999999"},
    )
    problem(status, body)
