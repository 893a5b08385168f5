"""配信リスト: groups and step plans with member counts by delivery state (counted by the
contacts search), members (a link into 顧客検索), 配信状態の同期設定 with its backfill jobs,
and the blacklist (exact address / domain)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from services.console import auth
from services.console.clients import ApiProblem, RoleApi
from services.console.fields import MEMBERSHIP_STATES
from services.console.web import POOL, USER, api, page, render

routes = web.RouteTableDef()
#: groups whose counts by state the page asks for (each is three searches).
COUNTED_GROUPS = 30
MATCHES = {"exact": "完全一致（アドレス）", "suffix": "ドメイン"}


async def _counts(client: RoleApi, group_id: int) -> dict[str, int]:
    async def total(state: str) -> tuple[str, int]:
        body = {"filter": {"membership": {"group_id": group_id, "state": state}}, "limit": 1}
        return state, (await client.post("contacts", "/v1/contacts/search", body))["total"]

    return dict(await asyncio.gather(*(total(s) for s in MEMBERSHIP_STATES)))


async def _page(
    request: web.Request,
    errors: dict[str, list[str]] | None = None,
    form: dict[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    client = api(request)
    groups, plans, policy, sync_jobs, blacklist = await asyncio.gather(
        client.get("contacts", "/v1/groups"),
        client.get("contacts", "/v1/plans"),
        client.get("suppression", "/v1/sync-policy"),
        client.get("suppression", "/v1/sync-jobs"),
        client.get("suppression", "/v1/blacklist"),
    )
    counted = groups["items"][:COUNTED_GROUPS] + plans["items"][:COUNTED_GROUPS]
    counts = await asyncio.gather(*(_counts(client, g["id"]) for g in counted))
    by_group: dict[int, dict[str, int]] = {g["id"]: c for g, c in zip(counted, counts, strict=True)}
    return render(
        request,
        "groups.html",
        status=status,
        groups=groups["items"],
        plans=plans["items"],
        counts=by_group,
        states=MEMBERSHIP_STATES,
        policy=policy,
        sync_jobs=sync_jobs["items"][:10],
        blacklist=blacklist["items"],
        matches=MATCHES,
        errors=errors or {},
        form=form or {},
        may_write=request[USER].may("operator"),
        may_admin=request[USER].may("admin"),
    )


@routes.get("/groups")
@page("viewer")
async def groups_page(request: web.Request) -> web.Response:
    return await _page(request)


async def _write(
    request: web.Request, action: str, method: str, service: str, path: str, body: Any, prefix: str
) -> web.Response:
    """One write; its refusal is shown beside the form's fields (``prefix`` + field)."""
    posted = await request.post()
    try:
        await api(request).call(service, method, path, json_body=body)
    except ApiProblem as problem:
        await auth.audit(request.app[POOL], request[USER], action, path, problem.status)
        if problem.status not in (400, 403, 404, 409):
            raise
        errors: dict[str, list[str]] = {}
        for name, messages in problem.by_field().items():
            errors.setdefault(prefix + (name or ""), []).extend(messages)
        if not problem.errors:
            errors.setdefault(prefix, []).append(problem.detail)
        form = {k: str(v) for k, v in posted.items() if k != "csrf"}
        return await _page(request, errors, form, status=problem.status)
    await auth.audit(request.app[POOL], request[USER], action, path, 200, {"body": body})
    raise web.HTTPSeeOther("/groups")


@routes.post("/groups")
@page("operator")
async def create_group(request: web.Request) -> web.Response:
    posted = await request.post()
    kind = "plans" if posted.get("kind") == "plan" else "groups"
    body = {
        "name": str(posted.get("name", "")),
        "description": str(posted.get("description", "")) or None,
    }
    return await _write(request, "create_group", "POST", "contacts", f"/v1/{kind}", body, "group.")


@routes.post("/groups/sync-policy")
@page("admin")
async def sync_policy(request: web.Request) -> web.Response:
    posted = await request.post()
    body = {"unsubscribe": posted.get("unsubscribe") == "1", "ban": posted.get("ban") == "1"}
    return await _write(
        request, "sync_policy", "PUT", "suppression", "/v1/sync-policy", body, "policy."
    )


@routes.post("/groups/blacklist")
@page("operator")
async def add_rule(request: web.Request) -> web.Response:
    posted = await request.post()
    body = {
        "title": str(posted.get("title", "")),
        "match": str(posted.get("match", "")),
        "value": str(posted.get("value", "")),
    }
    return await _write(
        request, "add_blacklist_rule", "POST", "suppression", "/v1/blacklist", body, "rule."
    )


@routes.post("/groups/blacklist/{id:[0-9]{1,18}}/delete")
@page("operator")
async def delete_rule(request: web.Request) -> web.Response:
    rule = int(request.match_info["id"])
    return await _write(
        request,
        "delete_blacklist_rule",
        "DELETE",
        "suppression",
        f"/v1/blacklist/{rule}",
        None,
        "rule.",
    )
