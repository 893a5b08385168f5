"""顧客詳細: profile, tags, custom fields and star (contacts); the delivery state in every group
and plan with 配信停止日時 and 方法, and the operator's change (suppression); delivery status
and bounce history (bounce processor)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from services.console import auth
from services.console.clients import ApiProblem, RoleApi, ServiceUnavailable
from services.console.fields import DELIVERY_STATUSES, MEMBERSHIP_STATES, METHODS, STANDARD
from services.console.web import POOL, USER, api, page, render

routes = web.RouteTableDef()
CONTACT = "/contacts/{id:[0-9]{1,18}}"


async def _optional(call: Any) -> tuple[Any, str | None]:
    """An answer that the page can do without (a 404 or a service away shows as a note)."""
    try:
        return await call, None
    except ServiceUnavailable as exc:
        return None, str(exc)
    except ApiProblem as exc:
        return None, None if exc.status == 404 else exc.detail


async def _memberships(
    client: RoleApi, contact: dict[str, Any], contact_id: int
) -> list[dict[str, Any]]:
    """Every membership: the group's name from contacts, the state from suppression."""
    states = await client.get("suppression", f"/v1/memberships/{contact_id}")
    by_group = {m["group_id"]: m for m in states["items"]}
    rows = []
    for m in contact.get("memberships") or []:
        owned = by_group.get(m["group_id"], {})
        rows.append({**m, **owned, "name": m["name"], "kind": m["kind"], "applied": bool(owned)})
    return rows


async def view(
    request: web.Request,
    *,
    errors: dict[int, str] | None = None,
    notice: str = "",
    status: int = 200,
) -> web.Response:
    contact_id = int(request.match_info["id"])
    client = api(request)
    contact = await client.get("contacts", f"/v1/contacts/{contact_id}")
    (
        (memberships, memberships_error),
        (delivery, delivery_error),
        (fields, _),
    ) = await asyncio.gather(
        _optional(_memberships(client, contact, contact_id)),
        _optional(client.get("bounce_processor", f"/v1/contacts/{contact_id}/delivery")),
        _optional(client.get("contacts", "/v1/fields")),
    )
    labels = {f["key"]: f["label"] for f in (fields or {}).get("items", [])}
    return render(
        request,
        "contact.html",
        status=status,
        contact=contact,
        memberships=memberships or [],
        memberships_error=memberships_error,
        delivery=delivery,
        delivery_error=delivery_error,
        custom_labels=labels,
        standard=STANDARD,
        delivery_statuses=DELIVERY_STATUSES,
        states=MEMBERSHIP_STATES,
        methods=METHODS,
        errors=errors or {},
        notice=notice,
        may_write=request[USER].may("operator"),
    )


@routes.get(CONTACT)
@page("viewer")
async def contact_page(request: web.Request) -> web.Response:
    return await view(request)


@routes.post(CONTACT + "/memberships/{group:[0-9]{1,18}}")
@page("operator")
async def change_state(request: web.Request) -> web.Response:
    """配信停止 / 配信禁止 / 配信可能 for one membership (the rules of F-11 are suppression's)."""
    contact_id = int(request.match_info["id"])
    group_id = int(request.match_info["group"])
    posted = await request.post()
    state = str(posted.get("state", ""))
    target = f"membership:{contact_id}/{group_id}"
    try:
        await api(request).call(
            "suppression",
            "PUT",
            f"/v1/memberships/{contact_id}/{group_id}",
            json_body={"state": state},
        )
    except ApiProblem as problem:
        await auth.audit(
            request.app[POOL],
            request[USER],
            "change_state",
            target,
            problem.status,
            {"state": state},
        )
        if problem.status not in (400, 403, 404, 409):
            raise
        return await view(request, errors={group_id: problem.detail}, status=problem.status)
    await auth.audit(
        request.app[POOL], request[USER], "change_state", target, 200, {"state": state}
    )
    raise web.HTTPSeeOther(f"/contacts/{contact_id}?changed={group_id}")
