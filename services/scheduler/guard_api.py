"""HTTP API of the complaint guard on the scheduler (issue 21; services/scheduler/guard.py).

- ``POST /v1/campaigns/{id}/guard/resume`` (operator): ``{"domains": [...]}`` or no body
  (every held domain). The named held domains become resumed; a campaign that may still
  send gets a ``campaign.control`` ``resume`` with those domains, and the release loop sends
  their waiting rows again (attempt + 1 for rows released before). Who asked
  (``X-Tayori-Requested-By``, else the token's role) is kept as ``resumed_by``. 404 for an
  unknown campaign, 409 when none of the named domains is held.

- ``POST /v1/campaigns/{id}/guard/drop`` (operator): the same body. The named held domains
  are given up: their rows without a result are recorded ``suppressed`` (no mail) and
  counted, so the campaign can finish; the sender keeps them paused. 404 / 409 as above.

A campaign's ``guard`` is read with the campaign (``GET /v1/campaigns/{id}``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

from libs.common.errors import Conflict
from libs.common.http import REQUESTED_BY, json_response, requires
from libs.common.http.contract import contract
from libs.common.logging import get_logger
from libs.common.metrics import SCHEDULER_GUARD_DOMAINS
from services.scheduler import guard, store
from services.scheduler.api import _ctx
from services.scheduler.contracts import Campaign, CampaignPath, GuardResumeBody, NoQuery
from services.scheduler.store import QUERIES

routes = web.RouteTableDef()
log = get_logger(__name__)


_GUARD_CONTRACT = contract(
    path=CampaignPath,
    query=NoQuery,
    body=GuardResumeBody,
    body_optional=True,
    response=Campaign,
    errors=(409,),
)


@routes.post("/v1/campaigns/{id}/guard/resume")
@requires("operator")
@_GUARD_CONTRACT
async def resume_guard(
    request: web.Request, path: CampaignPath, query: NoQuery, body: GuardResumeBody
) -> web.Response:
    """再開: send the campaign's mail to domains the complaint guard held again. Body:
    ``{"domains": ["docomo.ne.jp"]}`` (default: every held domain); 409 when none of them
    is held."""
    return await _act(request, path, body, "resumed", _resume)


@routes.post("/v1/campaigns/{id}/guard/drop")
@requires("operator")
@_GUARD_CONTRACT
async def drop_guard(
    request: web.Request, path: CampaignPath, query: NoQuery, body: GuardResumeBody
) -> web.Response:
    """配信中止: give up the campaign's mail to domains the complaint guard held; their
    recipients without a result are counted suppressed and the campaign can finish. Body
    and answers as for resume."""
    return await _act(request, path, body, "dropped", _drop)


#: what resuming or dropping does to the campaign's locked row: it records the chosen
#: domains (by whom, when) and returns the campaign row as it now is and how many waiting
#: recipients it gave up
Apply = Callable[
    [asyncpg.Connection, Any, list[str], str | None, dt.datetime], Awaitable[tuple[Any, int]]
]


async def _resume(
    conn: asyncpg.Connection, campaign: Any, chosen: list[str], who: str | None, now: dt.datetime
) -> tuple[Any, int]:
    """再開: the domains' waiting rows are released again, and a campaign that may still send
    tells the sender to resume them."""
    await conn.execute(QUERIES["resume-guard"], campaign["id"], chosen, who, now)
    await conn.execute(QUERIES["release-rows"], campaign["id"], chosen)
    if guard.may_send(campaign["status"]):
        await store.publish_control(
            conn, campaign["id"], "resume", f"resumed by {who}", now, domains=chosen
        )
    return campaign, 0


async def _drop(
    conn: asyncpg.Connection, campaign: Any, chosen: list[str], who: str | None, now: dt.datetime
) -> tuple[Any, int]:
    """配信中止: the domains' rows without a result are counted suppressed; the campaign is
    sent once that leaves nothing outstanding."""
    await conn.execute(QUERIES["drop-guard"], campaign["id"], chosen, who, now)
    dropped = await conn.fetchval(QUERIES["drop-held-rows"], campaign["id"], chosen, now)
    if dropped:
        campaign = await conn.fetchrow(QUERIES["add-counts"], campaign["id"], 0, 0, dropped)
        if campaign["status"] == "sending" and store.counters(campaign).outstanding == 0:
            # as a last result does (agents.handle_results)
            reason = "every recipient has a result"
            await store.transition(conn, campaign["id"], "sent", now, reason)
            campaign = await store.get_campaign(conn, str(campaign["id"]))
    return campaign, dropped


async def _act(
    request: web.Request, path: CampaignPath, body: GuardResumeBody, change: str, apply: Apply
) -> web.Response:
    """Resume or drop (``apply``; ``change`` names it in the metric and the log) the held
    domains ``body`` names, in one transaction with the campaign row locked (as the releaser
    and the guard consumer lock it)."""
    ctx = _ctx(request)
    now = ctx.clock.now()
    who = request.get(REQUESTED_BY)
    async with ctx.pool.acquire() as conn, conn.transaction():
        campaign = await store.get_campaign(conn, path.id, lock=True)
        row = await conn.fetchrow(QUERIES["guard-for-update"], campaign["id"])
        chosen = guard.to_resume(row["held"] if row is not None else (), body.domains)
        if not chosen:
            named = ", ".join(body.domains) if body.domains else "any domain"
            raise Conflict(f"the complaint guard does not hold {named} for this campaign")
        campaign, dropped = await apply(conn, campaign, chosen, who, now)
        history = await conn.fetch(QUERIES["history"], campaign["id"])
        answer = store.campaign_json(campaign, history) | {
            "guard": await store.guard_of(conn, campaign["id"])
        }
    SCHEDULER_GUARD_DOMAINS.labels(change).inc(len(chosen))
    log.info(
        f"campaign_guard_{change}",
        campaign_id=str(campaign["id"]),
        domains=chosen,
        recipients_dropped=dropped,
        status=campaign["status"],
    )
    return json_response(answer)
