"""HTTP API of the complaint guard on the scheduler (issue 21; services/scheduler/guard.py).

- ``POST /v1/campaigns/{id}/guard/resume`` (operator): ``{"domains": [...]}`` or no body
  (every held domain). The named held domains become resumed; a campaign that may still
  send gets a ``campaign.control`` ``resume`` with those domains, and the release loop sends
  their waiting rows again (attempt + 1 for rows released before). Who asked
  (``X-Tayori-Requested-By``, else the token's role) is kept as ``resumed_by``. 404 for an
  unknown campaign, 409 when none of the named domains is held.

A campaign's ``guard`` is read with the campaign (``GET /v1/campaigns/{id}``).
"""

from __future__ import annotations

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


@routes.post("/v1/campaigns/{id}/guard/resume")
@requires("operator")
@contract(
    path=CampaignPath,
    query=NoQuery,
    body=GuardResumeBody,
    body_optional=True,
    response=Campaign,
    errors=(409,),
)
async def resume_guard(
    request: web.Request, path: CampaignPath, query: NoQuery, body: GuardResumeBody
) -> web.Response:
    """再開: send the campaign's mail to domains the complaint guard held again. Body:
    ``{"domains": ["docomo.ne.jp"]}`` (default: every held domain); 409 when none of them
    is held."""
    ctx = _ctx(request)
    now = ctx.clock.now()
    who = request.get(REQUESTED_BY)
    async with ctx.pool.acquire() as conn, conn.transaction():
        # The campaign row first (as the releaser and the guard consumer lock it).
        campaign = await store.get_campaign(conn, path.id, lock=True)
        row = await conn.fetchrow(QUERIES["guard-for-update"], campaign["id"])
        chosen = guard.to_resume(row["held"] if row is not None else (), body.domains)
        if not chosen:
            named = ", ".join(body.domains) if body.domains else "any domain"
            raise Conflict(f"the complaint guard does not hold {named} for this campaign")
        await conn.execute(QUERIES["resume-guard"], campaign["id"], chosen, who, now)
        await conn.execute(QUERIES["release-rows"], campaign["id"], chosen)
        if guard.may_send(campaign["status"]):
            await store.publish_control(
                conn, campaign["id"], "resume", f"resumed by {who}", now, domains=chosen
            )
        history = await conn.fetch(QUERIES["history"], campaign["id"])
        answer = store.campaign_json(campaign, history) | {
            "guard": await store.guard_of(conn, campaign["id"])
        }
    SCHEDULER_GUARD_DOMAINS.labels("resumed").inc(len(chosen))
    log.info(
        "campaign_guard_resumed",
        campaign_id=str(campaign["id"]),
        domains=chosen,
        status=campaign["status"],
    )
    return json_response(answer)
