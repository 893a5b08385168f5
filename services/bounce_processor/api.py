"""HTTP views of the bounce processor: public tracking (F-34) and operator reads (a
campaign's engagement, a contact's delivery status and bounce history, bounces and
complaints per day).

Public:

- ``GET /t/o/{token}``: the open pixel. Always 200 with the 1×1 GIF and no-cache headers,
  also for a token we did not issue (then nothing is recorded): a broken image in a mail
  client tells nobody anything useful, and a different answer would let a scanner tell
  good tokens from bad ones.
- ``GET /t/c/{token}``: 302 to the destination signed inside the token
  (:meth:`TrackingLinks.read_click`) — only ever a URL that was in the mail we sent; any
  other token is 404 (a plain "Not found"), never a redirect.

A valid hit is committed (a group commit with the hits of concurrent requests) before the
answer, and published on ``feedback.events`` through the outbox. If the database cannot
take it, the reader still gets the pixel or the redirect: their mail client is not the
place to report our outage (the hit is lost, and logged).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from aiohttp import web
from pydantic import Field

from libs.common.errors import TransientError
from libs.common.http import daily, json_response, keyset, public, requires
from libs.common.http.contract import DIGITS, Answer, Id, Model, Token, contract
from libs.common.logging import get_logger
from libs.common.mail.states import DeliveryStatus
from libs.common.mail.tokens import BadToken
from libs.common.mail.tracking import PIXEL_GIF, TrackingTarget
from libs.common.metrics import TRACKING_HITS
from services.bounce_processor.context import CONTEXT, Context
from services.bounce_processor.store import QUERIES, Hit

log = get_logger(__name__)
routes = web.RouteTableDef()

#: User-Agent kept with a hit (it travels on feedback.events).
USER_AGENT_LIMIT = 256
NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, private",
    "Pragma": "no-cache",
    "Expires": "0",
}


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


class TrackingPath(Model):
    # Any text: a token we did not issue keeps the answer of a bad token (the pixel, or
    # 404), never a 400 that would tell a scanner something.
    token: str = Field(description="the signed token of the link", examples=["x"])


class CampaignPath(Model):
    campaign_id: Token = Field(description="the campaign's id", examples=["42"])


class Engagement(Answer):
    campaign_id: str
    opens: int = Field(ge=0)
    clicks: int = Field(ge=0)
    unique_opens: int = Field(ge=0)
    unique_clicks: int = Field(ge=0)


class ContactPath(Model):
    contact_id: Id = Field(title="顧客ID", examples=[1])


class Bounce(Answer):
    campaign_id: str
    classification: str = Field(examples=["invalid_address"])
    source: str = Field(description="dsn, arf, heuristic or smtp", examples=["dsn"])
    diagnostic: str | None
    occurred_at: dt.datetime


class Delivery(Answer):
    contact_id: int
    delivery_status: str = Field(title="配信ステータス", examples=["ok"])
    soft_streak: int = Field(ge=0)
    updated_at: dt.datetime | None
    bounces: list[Bounce]


class BouncesQuery(Model):
    limit: Annotated[int, Field(ge=1, le=200), DIGITS] = Field(50, title="件数")
    cursor: keyset.Cursor | None = None


class BouncePage(Answer):
    contact_id: int
    items: list[Bounce] = Field(description="newest first")
    next_cursor: str | None


class BounceDay(Answer):
    date: dt.date = Field(description="a calendar day in the asked time zone")
    bounces: int = Field(ge=0, title="バウンス数", description="hard + soft")
    hard: int = Field(ge=0, description="invalid_address and error (F-30)")
    soft: int = Field(ge=0, description="temporary_error")
    policy: int = Field(ge=0, description="5.7.x blocks: campaign errors, not bounces")
    complaints: int = Field(ge=0, title="苦情", description="spam reports (ARF, ESP)")
    opens: int = Field(ge=0, title="開封", description="readers opening a campaign first")
    clicks: int = Field(ge=0, title="クリック", description="readers clicking a campaign first")


class DailyBounces(Answer):
    tz: str
    days: list[BounceDay] = Field(description="oldest first; the last is today")
    totals: dict[str, int]


class RejectedQuery(Model):
    limit: Annotated[int, Field(ge=1, le=1000), DIGITS] = Field(100, title="件数")


class RejectedMail(Answer):
    id: int
    received_at: dt.datetime
    mail_from: str | None
    rcpt_to: str
    size: int
    reason: str | None
    processed_at: dt.datetime | None


class RejectedList(Answer):
    items: list[RejectedMail]


async def _record(request: web.Request, kind: str, target: TrackingTarget) -> None:
    agent = request.headers.get("User-Agent")
    hit = Hit(
        kind=kind,
        campaign_id=target.campaign_id,
        contact_id=target.contact_id,
        occurred_at=dt.datetime.now(dt.UTC),
        url=target.url,
        user_agent=agent[:USER_AGENT_LIMIT] if agent else None,
    )
    try:
        await _ctx(request).hit_writer.write(hit)
    except TransientError as exc:
        TRACKING_HITS.labels(kind, "not_stored").inc()
        log.warning("tracking_hit_not_stored", kind=kind, error=str(exc))
        return
    TRACKING_HITS.labels(kind, "recorded").inc()


@routes.get("/t/o/{token}")
@public
@contract(path=TrackingPath, media={"image/gif": "a 1×1 transparent GIF, for any token"})
async def open_pixel(request: web.Request, path: TrackingPath) -> web.Response:
    """Open pixel (public): a 1×1 GIF, always; records an open for a valid token."""
    try:
        target = _ctx(request).links.read_open(path.token)
    except BadToken:
        TRACKING_HITS.labels("open", "bad_token").inc()
    else:
        await _record(request, "open", target)
    return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_CACHE)


@routes.get("/t/c/{token}")
@public
@contract(path=TrackingPath, status=302, pages={404: "text/plain"})
async def click(request: web.Request, path: TrackingPath) -> web.Response:
    """Click redirect (public): 302 to the signed destination (Location); 404 for any other
    token."""
    try:
        target = _ctx(request).links.read_click(path.token)
    except BadToken:
        TRACKING_HITS.labels("click", "bad_token").inc()
        return web.Response(status=404, text="Not found\n", headers=NO_CACHE)
    await _record(request, "click", target)
    assert target.url is not None  # read_click refuses a token without one
    return web.Response(status=302, headers={"Location": target.url, **NO_CACHE})


@routes.get("/v1/campaigns/{campaign_id}/engagement")
@requires("viewer")
@contract(path=CampaignPath, response=Engagement)
async def campaign_engagement(request: web.Request, path: CampaignPath) -> web.Response:
    """Opens, clicks, unique opens and unique clicks of one campaign (F-34)."""
    campaign_id = path.campaign_id
    rows = await _ctx(request).pool.fetch(QUERIES["campaign-engagement"], campaign_id)
    by_kind = {r["kind"]: r for r in rows}

    def figure(kind: str, column: str) -> int:
        return int(by_kind[kind][column]) if kind in by_kind else 0

    return json_response(
        {
            "campaign_id": campaign_id,
            "opens": figure("open", "hits"),
            "clicks": figure("click", "hits"),
            "unique_opens": figure("open", "people"),
            "unique_clicks": figure("click", "people"),
        }
    )


@routes.get("/v1/contacts/{contact_id}/delivery")
@requires("viewer")
@contract(path=ContactPath, response=Delivery)
async def contact_delivery(request: web.Request, path: ContactPath) -> web.Response:
    """A contact's delivery status, consecutive soft bounces and latest bounces (F-31, F-32);
    a contact never sent to is ``unconfirmed``."""
    contact_id = path.contact_id
    async with _ctx(request).pool.acquire() as conn:
        state = await conn.fetchrow(QUERIES["contact-state"], contact_id)
        bounces = await conn.fetch(QUERIES["contact-bounces"], contact_id)
    return json_response(
        {
            "contact_id": contact_id,
            "delivery_status": state["delivery_status"]
            if state
            else DeliveryStatus.UNCONFIRMED.value,
            "soft_streak": state["soft_streak"] if state else 0,
            "updated_at": state["updated_at"] if state else None,
            "bounces": [dict(b) for b in bounces],
        }
    )


@routes.get("/v1/contacts/{contact_id}/bounces")
@requires("viewer")
@contract(path=ContactPath, query=BouncesQuery, response=BouncePage)
async def contact_bounces(
    request: web.Request, path: ContactPath, query: BouncesQuery
) -> web.Response:
    """A contact's bounce history (バウンス履歴), newest first, every page of it (?limit 1-200,
    default 50; ?cursor); a contact never bounced has none."""
    after: tuple[dt.datetime | None, str | None, str | None] = (None, None, None)
    if query.cursor:
        at, key = keyset.decode(query.cursor)
        classification, _, campaign_id = key.partition("|")
        after = (at, classification, campaign_id)
    rows = await _ctx(request).pool.fetch(
        QUERIES["contact-bounces-page"], path.contact_id, *after, query.limit + 1
    )
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    last = rows[-1] if more else None
    cursor = (
        keyset.encode(last["occurred_at"], f"{last['classification']}|{last['campaign_id']}")
        if last
        else None
    )
    return json_response(
        {"contact_id": path.contact_id, "items": [dict(r) for r in rows], "next_cursor": cursor}
    )


BOUNCE_FIGURES = ("bounces", "hard", "soft", "policy", "complaints")
ENGAGEMENT_FIGURES = ("opens", "clicks")


@routes.get("/v1/stats/daily")
@requires("viewer")
@contract(query=daily.DailyQuery, response=DailyBounces)
async def daily_stats(request: web.Request, query: daily.DailyQuery) -> web.Response:
    """Bounces, complaints, opens and clicks per calendar day (?days=1-92, default 7; ?tz,
    default Asia/Tokyo), oldest first, today last; a failure counts on the day it occurred,
    once per campaign, contact and classification; an open or click on the day a reader
    first opened or clicked that campaign (unique opens and clicks)."""
    start, dates = daily.window(query.days, query.tz, dt.datetime.now(dt.UTC))
    async with _ctx(request).pool.acquire() as conn:
        bounces = await conn.fetch(QUERIES["daily-bounces"], start, query.tz)
        engagement = await conn.fetch(QUERIES["daily-engagement"], start, query.tz)
    by_day: dict[dt.date, dict[str, int]] = {}
    for row in bounces:
        by_day.setdefault(row["day"], dict.fromkeys(BOUNCE_FIGURES + ENGAGEMENT_FIGURES, 0))
        by_day[row["day"]].update({f: row[f] for f in BOUNCE_FIGURES})
    for row in engagement:
        by_day.setdefault(row["day"], dict.fromkeys(BOUNCE_FIGURES + ENGAGEMENT_FIGURES, 0))
        by_day[row["day"]].update({f: row[f] for f in ENGAGEMENT_FIGURES})
    rows = [{"day": day, **figures} for day, figures in by_day.items()]
    return json_response(daily.answer(rows, query.tz, dates, BOUNCE_FIGURES + ENGAGEMENT_FIGURES))


@routes.get("/v1/inbound/rejected")
@requires("operator")
@contract(query=RejectedQuery, response=RejectedList)
async def rejected_mail(request: web.Request, query: RejectedQuery) -> web.Response:
    """Inbound mail kept because it could not be attributed or read, newest first (?limit=,
    1 to 1000)."""
    rows = await _ctx(request).pool.fetch(QUERIES["rejected-inbound"], query.limit)
    return json_response({"items": [dict(r) for r in rows]})
