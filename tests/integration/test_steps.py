"""Step mail (F-29) through the real services: contacts (the plan and its members),
suppression (joins, unsubscribes, the blacklist), the scheduler (the schedule, enrolments,
due steps), the sender (can-send at the last moment, its ledger) and the SMTP sink.

Enrolment times are chosen by the test: the joins come as upstream ``Join`` commands on
``suppression.commands`` whose ``issued_at`` is the join time (what suppression records as
the membership's changed_at, and the scheduler as the enrolment time). The scheduler's
clock is a FakeClock moved from one step's moment to the next.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import mailbox
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from libs.common.topics import Topic
from services.scheduler.clock import FakeClock, SystemClock
from tests.conftest import Service, eventually, running
from tests.integration.test_contacts_projections import feedback, publish_together
from tests.integration.test_scheduler import category, fake_clock, people, ticks
from tests.integration.test_scheduler_sender import subject
from tests.integration.test_sender import copy_holds

JST = dt.timezone(dt.timedelta(hours=9))


def jst(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=JST)


STEPS = [
    {"day_offset": 0, "send_time": "10:00", "subject": "<#name>様 ご登録ありがとうございます",
     "format": "text", "body": "<#name>様\n1通目\n配信停止: <#unsubscribe_url>\n"},
    {"day_offset": 1, "send_time": "10:00", "subject": "<#name>様 2通目",
     "format": "text", "body": "<#name>様\n2通目\n配信停止: <#unsubscribe_url>\n"},
    {"day_offset": 3, "send_time": "18:00", "subject": "<#name>様 3通目",
     "format": "html", "body": '<p><#name>様</p><p>3通目</p><a href="<#unsubscribe_url>">停止</a>'},
]  # fmt: skip


def received(sink: Any) -> Counter[tuple[str, str]]:
    """Mails in the sink by (recipient, subject)."""
    box = mailbox.Maildir(str(sink.path))
    return Counter((str(m["X-Tayori-Envelope-To"]), subject(m)) for m in box)


async def join_at(kafka: Any, contact_id: int, email: str, plan: int, at: dt.datetime) -> None:
    """An upstream join of ``plan`` at ``at`` (suppression.commands)."""
    await kafka.send(
        Topic.SUPPRESSION_COMMANDS,
        contact_id,
        {
            "command_id": str(uuid.uuid4()),
            "type": "Join",
            "contact_id": contact_id,
            "email": email,
            "group_id": plan,
            "state": "deliverable",
            "method": "upstream",
            "actor": "upstream",
            "campaign_id": None,
            "issued_at": at,
        },
    )


async def step_stats(scheduler: Any, plan: int) -> list[dict[str, int]]:
    body = await scheduler.api.ok("GET", f"/v1/plans/{plan}")
    keys = ("released", "success", "error", "suppressed")
    return [{k: s[k] for k in keys} for s in body["steps"]]


async def mails_become(sink: Any, scheduler: Any, wanted: Counter[tuple[str, str]]) -> None:
    """The sink holds exactly ``wanted``, and still does after a few more ticks."""

    async def reached() -> bool:
        got = received(sink)
        assert got == wanted, got
        return True

    await eventually(reached)
    await ticks(scheduler, 5)
    assert received(sink) == wanted


@contextlib.asynccontextmanager
async def scheduler_at(
    at: dt.datetime, monkeypatch: pytest.MonkeyPatch, *args: Any, **overrides: Any
) -> AsyncIterator[tuple[Service, FakeClock]]:
    """The scheduler on a FakeClock from its very start: the wall clock may be days past
    the test's steps, and a restarted scheduler's first tick must not see it."""
    with monkeypatch.context() as patched:
        patched.setattr(SystemClock, "now", lambda self: at)
        async with running("scheduler", *args, **overrides) as scheduler:
            yield scheduler, fake_clock(scheduler, at)


async def test_three_step_plan(
    stack, database, prefix, contacts, suppression, sender, smtp_sink, kafka, monkeypatch
):
    # a joins before the day-0 time, b after it, c unsubscribes after step 1, d is blacklisted.
    a, b, c, d = await people(contacts, 4)  # p0..p3@example.jp, named 顧客 0..3
    plan = (await contacts.api.ok("POST", "/v1/plans", {"name": "新規会員フォロー"}))["id"]
    await suppression.api.ok(
        "POST", "/v1/blacklist", {"title": "競合", "match": "exact", "value": "p3@example.jp"}
    )
    joins = {a: jst(26, 9, 0), b: jst(26, 11, 0), c: jst(26, 9, 30), d: jst(26, 9, 0)}
    async with scheduler_at(
        jst(26, 8, 0), monkeypatch, stack, database, prefix, contacts_url=contacts.api.base
    ) as (scheduler, clock):
        cat = await category(scheduler)  # 08:00-21:00 Asia/Tokyo
        body = {"category_id": cat, "from_address": "news@shop.example.jp", "steps": STEPS}
        created = await scheduler.api.ok("PUT", f"/v1/plans/{plan}", body)
        assert [s["day_offset"] for s in created["steps"]] == [0, 1, 3]
        for n, (contact, at) in enumerate(joins.items()):
            await join_at(kafka, contact, f"p{n}@example.jp", plan, at)

        async def enrolled() -> bool:
            items = (await scheduler.api.ok("GET", f"/v1/plans/{plan}/enrolments"))["items"]
            assert {
                i["contact_id"]: dt.datetime.fromisoformat(i["enrolled_at"]) for i in items
            } == joins
            return True

        await eventually(enrolled)
        await copy_holds(sender, "membership_copy", 4)
        await copy_holds(sender, "blacklist_copy", 1)

        # Just before 10:00 nothing goes out; at 10:00 step 1 reaches a and c (b has not
        # joined yet on this clock; d is refused at the last moment).
        clock.set(jst(26, 9, 59))
        await mails_become(smtp_sink, scheduler, Counter())
        clock.set(jst(26, 10, 0))
        first = "様 ご登録ありがとうございます"
        want = Counter(
            {("p0@example.jp", f"顧客 0{first}"): 1, ("p2@example.jp", f"顧客 2{first}"): 1}
        )
        await mails_become(smtp_sink, scheduler, want)

        # c unsubscribes after step 1: its enrolment ends, steps 2 and 3 never reach it.
        await suppression.api.ok("PUT", f"/v1/memberships/{c}/{plan}", {"state": "unsubscribed"})

        async def ended() -> bool:
            path = f"/v1/plans/{plan}/enrolments?contact_id={c}"
            [item] = (await scheduler.api.ok("GET", path))["items"]
            return item["ended_reason"] == "unsubscribed"

        await eventually(ended)

        # b joined at 11:00, after the day-0 time: its step 1 goes out then, at once.
        clock.set(jst(26, 11, 0))
        want[("p1@example.jp", f"顧客 1{first}")] = 1
        await mails_become(smtp_sink, scheduler, want)
        # b's name changes before step 2: merge values are read at send time.
        await contacts.api.ok("PATCH", f"/v1/contacts/{b}", {"name": "新しい名前"})

    # The scheduler restarts between steps: nothing is repeated, nothing skipped.
    async with scheduler_at(
        jst(26, 11, 5), monkeypatch, stack, database, prefix, contacts_url=contacts.api.base
    ) as (scheduler, clock):
        await mails_become(smtp_sink, scheduler, want)
        clock.set(jst(27, 10, 0))
        want[("p0@example.jp", "顧客 0様 2通目")] = 1
        want[("p1@example.jp", "新しい名前様 2通目")] = 1
        await mails_become(smtp_sink, scheduler, want)

        clock.set(jst(29, 17, 59))
        await mails_become(smtp_sink, scheduler, want)
        clock.set(jst(29, 18, 0))
        want[("p0@example.jp", "顧客 0様 3通目")] = 1
        want[("p1@example.jp", "新しい名前様 3通目")] = 1
        await mails_become(smtp_sink, scheduler, want)

        # Per-step statistics: d suppressed at each step, c only released step 1.
        async def counted() -> bool:
            assert await step_stats(scheduler, plan) == [
                {"released": 4, "success": 3, "error": 0, "suppressed": 1},
                {"released": 3, "success": 2, "error": 0, "suppressed": 1},
                {"released": 3, "success": 2, "error": 0, "suppressed": 1},
            ]
            return True

        await eventually(counted)

        # Opens and clicks count per step (a step's id is its campaign id on the topics);
        # only contacts it was released to count.
        step1 = (await scheduler.api.ok("GET", f"/v1/plans/{plan}"))["steps"][0]["id"]
        at = dt.datetime.now(dt.UTC)
        events = [(x, feedback(x, step1, "open", at)) for x in (a, a, b, 999_999)]
        events.append((a, feedback(a, step1, "click", at)))
        await publish_together(kafka, Topic.FEEDBACK_EVENTS, events)

        async def engagement() -> bool:
            [first_step, *_] = (await scheduler.api.ok("GET", f"/v1/plans/{plan}"))["steps"]
            stats = {k: first_step[k] for k in ("opens", "unique_opens", "clicks")}
            assert stats == {"opens": 3, "unique_opens": 2, "clicks": 1}, stats
            return True

        await eventually(engagement)
