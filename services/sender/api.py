"""Operator HTTP API of the sender: relay state, one campaign's send ledger and the sends per
day (read-only)."""

from __future__ import annotations

import datetime as dt
import time

from aiohttp import web
from pydantic import Field

from libs.common.http import daily, json_response, requires
from libs.common.http.contract import Answer, Model, Token, contract
from services.sender.context import CONTEXT, Context
from services.sender.ledger import QUERIES

routes = web.RouteTableDef()


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


class Relay(Answer):
    relay: str = Field(examples=["smtp://127.0.0.1:2525"])
    state: str = Field(description="up or backing_off", examples=["up"])
    retry_in_seconds: float = Field(ge=0)
    connections_open: int = Field(ge=0)


class Relays(Answer):
    relays: list[Relay]
    queued_deliveries: int = Field(ge=0)


class CampaignPath(Model):
    campaign_id: Token = Field(description="the campaign's id", examples=["42"])


class Ledger(Answer):
    campaign_id: str
    control: str = Field(description="active, paused or cancelled", examples=["active"])
    by_status: dict[str, int]
    by_outcome: dict[str, int]


class SendDay(Answer):
    date: dt.date = Field(description="a calendar day in the asked time zone")
    sent: int = Field(ge=0, title="配信数")
    errors: int = Field(ge=0, title="エラー", description="temporary, permanent and policy")
    suppressed: int = Field(ge=0, description="stopped at the last moment (F-16)")


class DailySends(Answer):
    tz: str
    days: list[SendDay] = Field(description="oldest first; the last is today")
    totals: dict[str, int]


DAILY_FIGURES = ("sent", "errors", "suppressed")
#: the ledger's rows of a window are counted from its BRIN index, one heap read per row of
#: the window (~0.4 s for 650,000 rows on this machine): the days that are over are kept
#: once counted, so a window after the first reads today's rows only.
PAST_DAYS = web.AppKey("sender_past_days", daily.PastDays)


@routes.get("/v1/relays")
@requires("viewer")
@contract(response=Relays)
async def list_relays(request: web.Request) -> web.Response:
    """Every SMTP relay in failover order: up or backing off, connections open, queue."""
    ctx = _ctx(request)
    now = time.monotonic()
    relays = [
        {
            "relay": relay.name,
            "state": "backing_off" if relay.down_until > now else "up",
            "retry_in_seconds": round(max(0.0, relay.down_until - now), 3),
            "connections_open": relay.open_connections,
        }
        for relay in ctx.relays.relays
    ]
    return json_response({"relays": relays, "queued_deliveries": ctx.relays.queue.qsize()})


@routes.get("/v1/ledger/{campaign_id}")
@requires("viewer")
@contract(path=CampaignPath, response=Ledger)
async def campaign_ledger(request: web.Request, path: CampaignPath) -> web.Response:
    """One campaign's send ledger: rows by status and by outcome, and its control state."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["ledger-summary"], path.campaign_id)
        control = await conn.fetchval(QUERIES["control-state"], path.campaign_id)
    by_status: dict[str, int] = {}
    by_outcome: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + row["n"]
        if row["outcome"] is not None:
            by_outcome[row["outcome"]] = by_outcome.get(row["outcome"], 0) + row["n"]
    return json_response(
        {
            "campaign_id": path.campaign_id,
            "control": control or "active",
            "by_status": by_status,
            "by_outcome": by_outcome,
        }
    )


@routes.get("/v1/stats/daily")
@requires("viewer")
@contract(query=daily.DailyQuery, response=DailySends)
async def daily_stats(request: web.Request, query: daily.DailyQuery) -> web.Response:
    """Campaign and step-mail deliveries per calendar day by outcome (?days=1-92, default 7;
    ?tz, default Asia/Tokyo), oldest first, today last; test sends and system mail are not
    counted. Days older than SENDER_LEDGER_RETENTION_DAYS have been forgotten (zeros)."""
    now = dt.datetime.now(dt.UTC)
    start, dates = daily.window(query.days, query.tz, now)
    past = request.app[PAST_DAYS]
    since = past.since(query.tz, dates, start)
    counted = await _ctx(request).pool.fetch(QUERIES["daily-sends"], since, query.tz)
    rows = past.rows(query.tz, dates, counted, DAILY_FIGURES, now)
    return json_response(daily.answer(rows, query.tz, dates, DAILY_FIGURES))
