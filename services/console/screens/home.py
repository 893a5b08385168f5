"""ホーム: today and the last 7 days, from the APIs that exist.

Sends, errors, opens and clicks come from the scheduler's campaigns (each counted on the
day it started, Japan time); running jobs from the exporter's jobs list. Bounces,
complaints and unsubscribes per day have no API yet: the page says so. A service that is
away blanks its numbers only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from services.console.clients import ApiProblem, NoToken, RoleApi, ServiceUnavailable
from services.console.web import api, page, render

routes = web.RouteTableDef()
TOKYO = ZoneInfo("Asia/Tokyo")
DAYS = 7
#: the campaign counts the page adds up per day: (key in the API, label).
SERIES = (("success", "配信数"), ("error", "エラー"), ("opens", "開封"), ("clicks", "クリック"))


@dataclass
class Chart:
    """A small bar chart drawn as inline SVG on the server."""

    label: str
    values: list[int]
    days: list[str]

    @property
    def today(self) -> int:
        return self.values[-1]

    @property
    def week(self) -> int:
        return sum(self.values)

    def bars(self, height: int = 40, width: int = 14, gap: int = 4) -> list[dict[str, Any]]:
        top = max(self.values) or 1
        out = []
        for i, (value, day) in enumerate(zip(self.values, self.days, strict=True)):
            h = round(value / top * height) if value else 0
            out.append(
                {
                    "x": i * (width + gap),
                    "y": height - h,
                    "w": width,
                    "h": max(h, 1),
                    "value": value,
                    "day": day,
                }
            )
        return out


def day_keys(now: dt.datetime) -> list[dt.date]:
    today = now.astimezone(TOKYO).date()
    return [today - dt.timedelta(days=DAYS - 1 - i) for i in range(DAYS)]


def campaign_charts(campaigns: list[dict[str, Any]], now: dt.datetime) -> list[Chart]:
    days = day_keys(now)
    index = {d: i for i, d in enumerate(days)}
    sums = {key: [0] * DAYS for key, _ in SERIES}
    for campaign in campaigns:
        at = campaign.get("started_at") or campaign.get("scheduled_at")
        if not at:
            continue
        day = dt.datetime.fromisoformat(at).astimezone(TOKYO).date()
        if day not in index:
            continue
        for key, _ in SERIES:
            sums[key][index[day]] += int(campaign.get(key) or 0)
    labels = [d.strftime("%m/%d") for d in days]
    return [Chart(label, sums[key], labels) for key, label in SERIES]


async def _try(call: Any) -> tuple[Any, str | None]:
    try:
        return await call, None
    except (ServiceUnavailable, ApiProblem, NoToken) as exc:
        return None, str(exc)


async def _campaigns(client: RoleApi) -> list[dict[str, Any]]:
    page = await client.get("scheduler", "/v1/campaigns", limit=200)
    return list(page.get("items", []))


@routes.get("/")
@page("viewer")
async def home(request: web.Request) -> web.Response:
    client = api(request)
    (campaigns, campaigns_error), (running, jobs_error), (recent, _) = await asyncio.gather(
        _try(_campaigns(client)),
        _try(client.get("exporter", "/v1/jobs", status="running", limit=200)),
        _try(client.get("exporter", "/v1/jobs", limit=5)),
    )
    now = dt.datetime.now(dt.UTC)
    charts = campaign_charts(campaigns or [], now) if campaigns is not None else []
    sending = [c for c in campaigns or [] if c.get("status") == "sending"]
    return render(
        request,
        "home.html",
        charts=charts,
        campaigns_error=campaigns_error,
        jobs_error=jobs_error,
        running=len((running or {}).get("items", [])) if running is not None else None,
        sending=len(sending) if campaigns is not None else None,
        recent_jobs=(recent or {}).get("items", []),
        recent_campaigns=(campaigns or [])[:5],
    )
