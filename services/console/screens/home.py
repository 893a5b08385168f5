"""ホーム: today and the last 7 days (Japan time) as numbers and small bar charts.

Each figure per day comes from the service that owns it, through its
``GET /v1/stats/daily``: sends and errors from the sender's ledger, bounces, complaints and
(unique) opens and clicks from the bounce processor, unsubscribes (配信停止) from
suppression. Running jobs come from the exporter's jobs list, campaigns sending and the
latest campaigns from the scheduler. A service that is away blanks its own figures only,
saying which service and why.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.console.clients import ApiProblem, NoToken, RoleApi, ServiceUnavailable
from services.console.web import api, page, render

routes = web.RouteTableDef()
DAYS = 7
#: the figures per day, each from its owner's GET /v1/stats/daily: (service, figure, label).
DAILY = (
    ("sender", "sent", "配信数"),
    ("sender", "errors", "エラー"),
    ("bounce_processor", "bounces", "バウンス数"),
    ("bounce_processor", "complaints", "苦情"),
    ("suppression", "unsubscribes", "配信停止"),
    ("bounce_processor", "opens", "開封"),
    ("bounce_processor", "clicks", "クリック"),
)


@dataclass
class Chart:
    """A small bar chart drawn as inline SVG on the server."""

    label: str
    values: list[int]
    days: list[str]
    #: why there are no values (the service that is away, and its reason).
    error: str | None = None
    #: the figure's key (the card's id: figure-<key>).
    key: str = ""

    @property
    def today(self) -> int:
        return self.values[-1] if self.values else 0

    @property
    def week(self) -> int:
        return sum(self.values)

    def bars(self, height: int = 40, width: int = 14, gap: int = 4) -> list[dict[str, Any]]:
        top = max(self.values, default=0) or 1
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


def daily_charts(answers: dict[str, tuple[Any, str | None]]) -> list[Chart]:
    """The charts of :data:`DAILY` from each service's answer (or its error)."""
    charts = []
    for service, key, label in DAILY:
        body, error = answers[service]
        if body is None:
            charts.append(Chart(label, [], [], error=error or service, key=key))
            continue
        days = body["days"]
        labels = [dt.date.fromisoformat(d["date"]).strftime("%m/%d") for d in days]
        charts.append(Chart(label, [int(d[key]) for d in days], labels, key=key))
    return charts


async def _daily(client: RoleApi) -> dict[str, tuple[Any, str | None]]:
    services = sorted({service for service, _, _ in DAILY})
    answers = await asyncio.gather(
        *(
            _try(client.get(service, "/v1/stats/daily", days=DAYS, tz="Asia/Tokyo"))
            for service in services
        )
    )
    return {
        service: (
            body,
            None if error is None or error.startswith(service) else f"{service}: {error}",
        )
        for service, (body, error) in zip(services, answers, strict=True)
    }


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
    (campaigns, campaigns_error), (running, jobs_error), (recent, _), daily = await asyncio.gather(
        _try(_campaigns(client)),
        _try(client.get("exporter", "/v1/jobs", status="running", limit=200)),
        _try(client.get("exporter", "/v1/jobs", limit=5)),
        _daily(client),
    )
    charts = daily_charts(daily)
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
