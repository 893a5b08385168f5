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

import pytest

from libs.common.topics import Topic
from services.scheduler.clock import FakeClock
from services.scheduler.context import context_of
from tests.conftest import OPERATOR_TOKEN, VIEWER_TOKEN, eventually
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


async def category(scheduler: Any, start: str = "08:00", end: str = "21:00", zone: str = "Asia/Tokyo") -> int:
    body = await scheduler.api.ok(
        "POST",
        "/v1/categories",
        {"name": "メルマガ", "window_start": start, "window_end": end, "time_zone": zone},
    )
    return int(body["id"])


async def people(contacts: Any, n: int, group: int | None = None, **extra: Any) -> list[int]:
    """``n`` contacts p0..p(n-1)@example.jp (named 顧客 i), members of ``group`` if given."""
    api = contacts.api
    ids: list[int] = []
    for start in range(0, n, 50):
        created = await asyncio.gather(
            *(
                api.ok(
                    "POST",
                    "/v1/contacts",
                    {"email": f"p{i}@example.jp", "name": f"顧客 {i}", "company": f"会社{i}", **extra},
                )
                for i in range(start, min(n, start + 50))
            )
        )
        ids.extend(c["id"] for c in created)
    if group is not None:
        await api.ok("POST", f"/v1/groups/{group}/members", {"contact_ids": ids})
    return ids


async def group(contacts: Any, name: str = "メルマガ会員") -> int:
    return int((await contacts.api.ok("POST", "/v1/groups", {"name": name}))["id"])


def campaign_body(category_id: int, clock: FakeClock, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "11月のお知らせ",
        "category_id": category_id,
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
    async def reached() -> dict[str, Any] | None:
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
    """The first ``n`` send.requests of a campaign (matching ``match``), waiting for them."""

    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            r
            for r in records
            if r["campaign_id"] == campaign_id and all(r[k] == v for k, v in match.items())
        ]

    records = await kafka.read(Topic.SEND_REQUESTS, until=lambda rs: len(mine(rs)) >= n)
    return mine(records)


def result(request: dict[str, Any], outcome: str = "sent", result_id: str | None = None) -> dict[str, Any]:
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


async def answer(kafka: Any, results: list[dict[str, Any]]) -> None:
    await publish_together(kafka, Topic.DELIVERY_RESULTS, [(r["contact_id"], r) for r in results])


def counters(body: dict[str, Any]) -> dict[str, int]:
    c = body["counters"]
    return {k: c[k] for k in ("planned", "success", "error", "suppressed", "unsent")}


# Tests ---------------------------------------------------------------------------------------------


async def test_smoke(scheduler):
    clock = fake_clock(scheduler)
    cat = await category(scheduler)
    assert cat > 0
    await ticks(scheduler)
    assert clock.now() == NOON_TOKYO
