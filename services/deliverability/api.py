"""HTTP API of the deliverability service (SPEC §10): the windows per receiving domain,
and each campaign's complaint figures.

``GET /v1/domains``: every domain seen in the last hour with its current minute and its
last hour, busiest first. ``GET /v1/domains/{domain}``: one domain, with each of its
minute windows of the last hour. ``GET /v1/campaigns/{campaign_id}``: one campaign's
delivered mail and complaints per domain, and the domains its complaint guard holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import faust
from aiohttp import web
from pydantic import Field, StringConstraints

from libs.common.errors import NotFound
from libs.common.http import json_response, requires
from libs.common.http.contract import Answer, Model, contract
from services.deliverability import guard, processor
from services.deliverability.models import CampaignDomains

routes = web.RouteTableDef()
MAX_DOMAINS_PAGE = 1000


@dataclass
class Tables:
    """The tables the routes and the policy loop read (this process's partitions: all of
    them with one replica)."""

    minute: Any
    hour: Any
    #: the campaign-domains table (campaign id → :class:`CampaignDomains
    #: <services.deliverability.models.CampaignDomains>`).
    campaigns: Any
    app: faust.App

    def recovered(self) -> bool:
        manager: Any = self.app.tables  # faust's TableManager (the interface lacks recovery)
        return bool(
            manager.recovery.completed.is_set()
            and not manager.recovery.in_recovery
            and not self.app.rebalancing
        )

    def windows(self, table: Any) -> dict[str, list[tuple[float, float, dict[str, int]]]]:
        """Every (start, end, counters) window per domain the table holds."""
        out: dict[str, list[tuple[float, float, dict[str, int]]]] = {}
        for (domain, (start, end)), counts in list(table.data.items()):
            out.setdefault(domain, []).append((start, end, dict(counts.n)))
        return out


TABLES = web.AppKey("deliverability", Tables)


def _current(windows: list[tuple[float, float, dict[str, int]]], now: float) -> Any:
    """The earliest-starting window that holds ``now`` (for the hopping hour: the one
    covering most of the last hour), as (start, end, counters), or None."""
    holding = [w for w in windows if w[0] <= now <= w[1]]
    return min(holding, key=lambda w: w[0]) if holding else None


def _window(window: Any) -> dict[str, Any]:
    if window is None:
        return {"start": None, "end": None, **processor.figures(None)}
    start, end, counts = window
    return {"start": _iso(start), "end": _iso(end), **processor.figures(counts)}


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# Contracts ------------------------------------------------------------------------------


class Figures(Answer):
    """One window's counters (SMTP answers at send time and the feedback after it)."""

    start: str | None = Field(description="window start (UTC)")
    end: str | None = Field(description="window end (UTC)")
    attempts: int = Field(
        description="answers to sends that reached the relay (each 4xx the sender retried too)"
    )
    delivered: int = Field(description="accepted by the relay (2xx)")
    deferred: int = Field(
        description="deferred (4xx): retried by the sender (delivery.deferrals) or its last try"
    )
    rejected: int = Field(description="refused at send time (5xx)")
    hard_bounces: int
    soft_bounces: int
    complaints: int
    opens: int
    clicks: int
    deferred_by_code: dict[str, int] = Field(
        description="deferrals by enhanced status code (e.g. 4.7.0), else SMTP code"
    )
    deferral_rate: float = Field(description="deferred / attempts")
    complaint_rate: float = Field(description="complaints / delivered")


class DomainSummary(Answer):
    domain: str
    minute: Figures = Field(description="the current 1-minute window (tumbling)")
    hour: Figures = Field(description="the last hour (hopping window)")


class DomainList(Answer):
    items: list[DomainSummary] = Field(description="busiest first (attempts in the hour)")


class DomainDetail(DomainSummary):
    minutes: list[Figures] = Field(description="each minute of the last hour, oldest first")


class DomainPath(Model):
    domain: Annotated[
        str,
        StringConstraints(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.-]+$", to_lower=True),
    ] = Field(description="a receiving domain (IDNs as A-labels), e.g. docomo.ne.jp")


class CampaignDomainFigures(Answer):
    """One receiving domain's share of a campaign since it started."""

    domain: str
    delivered: int = Field(description="the campaign's mail to it accepted by the relay")
    complaints: int = Field(description="ARF complaints about the campaign's mail to it")
    complaint_rate: float = Field(description="complaints / delivered (0 with none delivered)")
    held: bool = Field(description="whether the complaint guard holds the campaign's sends to it")


class CampaignGuardState(Answer):
    """What the complaint guard last published on campaign.guard for the campaign."""

    domains: list[str] = Field(description="the receiving domains held, sorted")
    reason: str = Field(description="why, e.g. complaint_rate 0.0052 > 0.0030 (13/2500 delivered)")


class CampaignDetail(Answer):
    campaign_id: str
    delivered: int = Field(description="over all its receiving domains")
    complaints: int = Field(description="over all its receiving domains")
    complaint_rate: float = Field(description="complaints / delivered")
    updated_at: str = Field(description="when its figures last moved (UTC)")
    domains: list[CampaignDomainFigures] = Field(description="most delivered first")
    guard: CampaignGuardState | None = Field(
        description="the complaint guard in force (null: it holds nothing)"
    )


class CampaignPath(Model):
    campaign_id: Annotated[
        str,
        StringConstraints(
            pattern=r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$",
            to_lower=True,
        ),
    ] = Field(
        description="the campaign's id (a UUID)",
        examples=["0b9f6c2e-3d1a-4c57-9f0e-6a2d8b1c4e73"],
    )


# Views ----------------------------------------------------------------------------------


@routes.get("/v1/domains")
@requires("viewer")
@contract(response=DomainList)
async def list_domains(request: web.Request) -> web.Response:
    """配信ドメイン一覧 (domains): every receiving domain seen in the last hour, with its
    current minute and last hour, busiest first."""
    tables = request.app[TABLES]
    now = time.time()
    minutes, hours = tables.windows(tables.minute), tables.windows(tables.hour)
    items: list[dict[str, Any]] = []
    for domain in set(minutes) | set(hours):
        hour = _current(hours.get(domain, []), now)
        minute = _current(minutes.get(domain, []), now)
        if hour is None and minute is None:
            continue
        items.append({"domain": domain, "minute": _window(minute), "hour": _window(hour)})
    items.sort(
        key=lambda item: (-item["hour"]["attempts"], -item["minute"]["attempts"], item["domain"])
    )
    return json_response({"items": items[:MAX_DOMAINS_PAGE]})


@routes.get("/v1/domains/{domain}")
@requires("viewer")
@contract(path=DomainPath, response=DomainDetail, errors=(404,))
async def get_domain(request: web.Request, path: DomainPath) -> web.Response:
    """配信ドメイン (domain): one domain's current minute, last hour, and each minute
    window of the last hour."""
    tables = request.app[TABLES]
    now = time.time()
    minutes = tables.windows(tables.minute).get(path.domain, [])
    hours = tables.windows(tables.hour).get(path.domain, [])
    if not minutes and not hours:
        raise NotFound(f"no mail to {path.domain} in the last hour")
    return json_response(
        {
            "domain": path.domain,
            "minute": _window(_current(minutes, now)),
            "hour": _window(_current(hours, now)),
            "minutes": [_window(w) for w in sorted(minutes) if w[0] <= now],
        }
    )


@routes.get("/v1/campaigns/{campaign_id}")
@requires("viewer")
@contract(path=CampaignPath, response=CampaignDetail, errors=(404,))
async def get_campaign(request: web.Request, path: CampaignPath) -> web.Response:
    """配信の苦情 (campaign complaints): one campaign's delivered mail and complaints per
    receiving domain since it started, and the complaint guard holding its sends to some
    of them, if any (campaign.guard)."""
    tables = request.app[TABLES]
    figures = tables.campaigns.data.get(path.campaign_id)
    if figures is None:
        raise NotFound(f"no delivered mail or complaint counted for campaign {path.campaign_id}")
    return json_response(campaign_detail(path.campaign_id, figures))


def campaign_detail(campaign_id: str, figures: CampaignDomains) -> dict[str, Any]:
    """The public shape of one campaign's entry in the campaign-domains table."""
    held = set(figures.held)
    domains: list[dict[str, Any]] = [
        {
            "domain": domain,
            "delivered": int(counts.get("delivered", 0)),
            "complaints": int(counts.get("complaints", 0)),
            "complaint_rate": guard.complaint_rate(
                int(counts.get("complaints", 0)), int(counts.get("delivered", 0))
            ),
            "held": domain in held,
        }
        for domain, counts in figures.domains.items()
    ]
    domains.sort(key=lambda d: (-d["delivered"], -d["complaints"], d["domain"]))
    delivered, complaints = guard.totals(figures.domains)
    return {
        "campaign_id": campaign_id,
        "delivered": delivered,
        "complaints": complaints,
        "complaint_rate": guard.complaint_rate(complaints, delivered),
        "updated_at": _iso(figures.updated_at),
        "domains": domains,
        "guard": ({"domains": sorted(held), "reason": figures.reason or ""} if held else None),
    }
