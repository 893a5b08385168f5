"""キャンペーン詳細: one campaign's status and counters (scheduler), and its complaint guard
(issue 21): the receiving domains whose remaining sends are held because the campaign's
complaint rate passed the threshold, why, and per domain a 再開 / Resume and a 配信中止 /
Give up action (confirmed in the browser, sent to the scheduler for the signed-in user,
audited)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.console import auth
from services.console.clients import ApiProblem
from services.console.web import POOL, USER, api, page, render

routes = web.RouteTableDef()
CAMPAIGN = "/campaigns/{id:[0-9a-fA-F-]{36}}"
#: the guard's actions: the scheduler's path segment, the audit name, the notice shown.
ACTIONS = {
    "resume": ("resume_guard", "配信を再開しました"),
    "drop": ("drop_guard", "配信を中止しました"),
}
#: the counters shown, in the order of F-25.
COUNTERS = (
    ("planned", "配信予定数"),
    ("success", "成功数"),
    ("error", "エラー数"),
    ("suppressed", "配信停止で除外"),
    ("pending", "結果待ち"),
    ("unsent", "未配信数"),
)


def complaint_rate(guard: dict[str, Any]) -> str:
    """Complaints over delivered mail as a percentage (as the threshold is read: 0.3%)."""
    delivered = guard.get("delivered") or 0
    if delivered <= 0:
        return "-"
    return f"{100 * (guard.get('complaints') or 0) / delivered:.2f}%"


async def view(
    request: web.Request, *, error: str = "", notice: str = "", status: int = 200
) -> web.Response:
    campaign_id = request.match_info["id"]
    campaign = await api(request).get("scheduler", f"/v1/campaigns/{campaign_id}")
    done = request.query.get("done", "")
    guard = campaign.get("guard")
    return render(
        request,
        "campaign.html",
        status=status,
        c=campaign,
        guard=guard,
        rate=complaint_rate(guard) if guard else "",
        counters=COUNTERS,
        error=error,
        notice=notice,
        notice_title=ACTIONS[done][1] if done in ACTIONS else ACTIONS["resume"][1],
        may_write=request[USER].may("operator"),
    )


@routes.get(CAMPAIGN)
@page("viewer")
async def campaign_page(request: web.Request) -> web.Response:
    resumed = request.query.get("resumed", "")[:300]
    return await view(request, notice=resumed)


@routes.post(CAMPAIGN + "/guard/{action:resume|drop}")
@page("operator")
async def guard_action(request: web.Request) -> web.Response:
    """再開 or 配信中止: the held domain named by the button (every held one when it names
    none)."""
    campaign_id, action = request.match_info["id"], request.match_info["action"]
    audited = ACTIONS[action][0]
    posted = await request.post()
    domain = str(posted.get("domain", "")).strip()
    body = {"domains": [domain]} if domain else {}
    path = f"/v1/campaigns/{campaign_id}/guard/{action}"
    try:
        await api(request).call("scheduler", "POST", path, json_body=body)
    except ApiProblem as problem:
        await auth.audit(request.app[POOL], request[USER], audited, path, problem.status)
        if problem.status not in (400, 404, 409):
            raise
        return await view(request, error=problem.detail, status=problem.status)
    await auth.audit(request.app[POOL], request[USER], audited, path, 200, {"body": body})
    raise web.HTTPSeeOther(f"/campaigns/{campaign_id}?resumed={domain or '*'}&done={action}")
