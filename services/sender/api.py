"""Operator HTTP API of the sender: relay state, one campaign's send ledger and the sends per
day (read-only), and the operator overrides of the per-recipient-domain sending policy
(pacing.py)."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, model_validator

from libs.common.errors import NotFound
from libs.common.http import ROLE, daily, json_response, requires
from libs.common.http.contract import Answer, Model, Timestamp, Token, contract
from libs.common.logging import get_logger
from services.sender import domains, overrides
from services.sender.context import CONTEXT, Context
from services.sender.ledger import QUERIES

log = get_logger(__name__)

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
    waiting_for_domains: int = Field(
        ge=0, description="deliveries parked until their recipient domain lets them go"
    )


class CampaignPath(Model):
    campaign_id: Token = Field(description="the campaign's id", examples=["42"])


class Ledger(Answer):
    campaign_id: str
    control: str = Field(description="active, paused, halted or cancelled", examples=["active"])
    held_domains: list[str] = Field(
        description="receiving domains the campaign's mail is held for (a campaign.control "
        "pause with domains: the complaint guard), until a resume names them",
        examples=[["docomo.ne.jp"]],
    )
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
    return json_response(
        {
            "relays": relays,
            "queued_deliveries": ctx.relays.queue.qsize(),
            "waiting_for_domains": ctx.relays.pacing.waiting(),
        }
    )


@routes.get("/v1/ledger/{campaign_id}")
@requires("viewer")
@contract(path=CampaignPath, response=Ledger)
async def campaign_ledger(request: web.Request, path: CampaignPath) -> web.Response:
    """One campaign's send ledger: rows by status and by outcome, its control state and the
    receiving domains its mail is held for."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["ledger-summary"], path.campaign_id)
        control = await conn.fetchval(QUERIES["control-state"], path.campaign_id)
        held = await conn.fetch(QUERIES["held-domains"], path.campaign_id)
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
            "held_domains": [r["domain"] for r in held],
            "by_status": by_status,
            "by_outcome": by_outcome,
        }
    )


# Per-domain overrides --------------------------------------------------------------------

_REASON_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


def _reason(value: str) -> str:
    if _REASON_FORBIDDEN.search(value):
        raise ValueError("must be one line with no control character")
    return value


_DOMAIN = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not _DOMAIN.fullmatch(value):
        raise ValueError("must be a domain name such as docomo.ne.jp (IDN in xn-- form)")
    return value


DomainName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=254),
    AfterValidator(_domain),
    Field(examples=["docomo.ne.jp"], description="a recipient domain, lower-cased"),
]


class DomainPath(Model):
    domain: DomainName


class NoQuery(Model):
    """A route that reads no query parameter: any one given is refused (400 naming it)."""


class StrictBody(Model):
    """A body taken as written: no false for 0, no 0 for a date (JSON's types are the API's)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class WarmUpBody(StrictBody):
    start: dt.date = Field(title="開始日 (start, UTC)", examples=["2026-12-07"])
    daily_caps: list[Annotated[int, Field(ge=1, le=1_000_000_000)]] = Field(
        title="日ごとの上限 (daily caps)",
        description="messages to the domain on the first day, the second, …; none after",
        min_length=1,
        max_length=366,
        examples=[[1000, 2000, 5000, 10000, 20000]],
    )


class OverrideBody(StrictBody):
    """A domain's override, replaced whole. rate/connections: null = the built-in
    default's, 0 = unlimited."""

    rate: float | None = Field(
        None, title="送信速度 (msgs/s)", ge=0, le=100_000, allow_inf_nan=False
    )
    connections: int | None = Field(None, title="同時接続数 (in flight)", ge=0, le=10_000)
    state: Literal["normal", "throttled", "paused"] = Field("normal", title="状態 (state)")
    until: Timestamp | None = Field(None, title="期限 (until)", description="null: until deleted")
    reason: Annotated[str, StringConstraints(max_length=500), AfterValidator(_reason)] | None = (
        Field(None, title="理由 (reason)")
    )
    warmup: WarmUpBody | None = Field(None, title="ウォームアップ (warm-up)")

    @model_validator(mode="after")
    def _future(self) -> OverrideBody:
        if self.until is not None and self.until <= dt.datetime.now(dt.UTC):
            raise ValueError("until must be in the future")
        return self


class Policy(Answer):
    rate: float = Field(description="messages per second, 0 = unlimited")
    connections: int = Field(description="transactions in flight, 0 = unlimited")
    state: str = Field(examples=["normal"])
    reason: str | None
    paused_for_seconds: float | None = Field(description="null: not paused or until deleted")
    daily_cap: int | None


class DomainOverride(Answer):
    domain: str
    override: dict[str, Any] | None = Field(description="null: no override")
    policy: Policy = Field(description="in force on this sender replica now")
    in_flight: int = Field(ge=0, description="its transactions in progress on this replica")
    waiting: int = Field(ge=0, description="its deliveries parked on this replica")


class DomainOverrides(Answer):
    overrides: list[dict[str, Any]]


def _override_json(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    warmup = None
    if row["warmup_start"] is not None:
        warmup = {"start": row["warmup_start"], "daily_caps": list(row["warmup_caps"])}
    return {
        "domain": row["domain"],
        "rate": row["rate"],
        "connections": row["connections"],
        "state": row["state"],
        "until": row["until"],
        "reason": row["reason"],
        "warmup": warmup,
        "active": row["until"] is None or row["until"] > dt.datetime.now(dt.UTC),
        "updated_by": row["updated_by"],
        "updated_at": row["updated_at"],
    }


def _policy_json(policy: domains.Policy) -> dict[str, Any]:
    paused = None
    if policy.state == domains.PAUSED and policy.until != float("inf"):
        paused = round(max(0.0, policy.until - time.monotonic()), 3)
    return {
        "rate": policy.rate,
        "connections": policy.connections,
        "state": policy.state,
        "reason": policy.reason,
        "paused_for_seconds": paused,
        "daily_cap": policy.daily_cap,
    }


async def _answer(ctx: Context, domain: str, row: Mapping[str, Any] | None) -> web.Response:
    pacing = ctx.relays.pacing
    state = pacing.states.get(domain)
    return json_response(
        {
            "domain": domain,
            "override": _override_json(row),
            "policy": _policy_json(pacing.policy_of(domain)),
            "in_flight": state.in_flight if state is not None else 0,
            "waiting": len(state.parked) if state is not None else 0,
        }
    )


@routes.get("/v1/domain-overrides")
@requires("viewer")
@contract(query=NoQuery, response=DomainOverrides)
async def list_domain_overrides(request: web.Request, query: NoQuery) -> web.Response:
    """Every operator override of a recipient domain's sending policy."""
    rows = await _ctx(request).pool.fetch(QUERIES["domain-overrides"])
    return json_response({"overrides": [_override_json(row) for row in rows]})


@routes.get("/v1/domains/{domain}/override")
@requires("viewer")
@contract(path=DomainPath, query=NoQuery, response=DomainOverride)
async def get_domain_override(
    request: web.Request, path: DomainPath, query: NoQuery
) -> web.Response:
    """A domain's override (null when none) and the policy in force on this replica:
    built-in default, learned AIMD state, override and warm-up together."""
    ctx = _ctx(request)
    row = await ctx.pool.fetchrow(QUERIES["domain-override"], path.domain)
    return await _answer(ctx, path.domain, row)


@routes.put("/v1/domains/{domain}/override")
@requires("operator")
@contract(path=DomainPath, query=NoQuery, body=OverrideBody, response=DomainOverride)
async def put_domain_override(
    request: web.Request, path: DomainPath, query: NoQuery, body: OverrideBody
) -> web.Response:
    """Set (replace) a domain's override: rate, connections, state (normal, throttled,
    paused), until, reason, warm-up schedule. In force on this replica at once, on the
    others within SENDER_DOMAIN_OVERRIDES_REFRESH_SECONDS."""
    ctx = _ctx(request)
    warmup = body.warmup
    row = await ctx.pool.fetchrow(
        QUERIES["put-domain-override"],
        path.domain,
        body.rate,
        body.connections,
        body.state,
        body.until,
        body.reason,
        warmup.start if warmup else None,
        warmup.daily_caps if warmup else None,
        request.get(ROLE) or "unknown",
    )
    log.info(
        "domain_override_set",
        domain=path.domain,
        state=body.state,
        rate=body.rate,
        connections=body.connections,
        reason=body.reason,
    )
    await overrides.refresh(ctx)
    return await _answer(ctx, path.domain, row)


@routes.delete("/v1/domains/{domain}/override")
@requires("operator")
@contract(path=DomainPath, query=NoQuery, status=204)
async def delete_domain_override(
    request: web.Request, path: DomainPath, query: NoQuery
) -> web.Response:
    """Remove a domain's override: its built-in default (and what it taught) apply again."""
    ctx = _ctx(request)
    if await ctx.pool.fetchval(QUERIES["delete-domain-override"], path.domain) is None:
        raise NotFound(f"domain {path.domain} has no override")
    log.info("domain_override_deleted", domain=path.domain)
    await overrides.refresh(ctx)
    return web.Response(status=204)


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
