"""顧客検索 (F-05): the search form, results with sorting, keyset paging and the exact total,
saved searches (global or per group, /v1/filters), bulk actions with a confirmation
(/v1/contacts/bulk, /v1/groups/{id}/members) and the way to CSV出力."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from services.console import auth
from services.console.clients import ApiProblem, RoleApi
from services.console.fields import (
    DELIVERY_STATUSES,
    HISTORY_EVENTS,
    MEMBERSHIP_STATES,
    SALES_STATUSES,
    SORTS,
    STANDARD,
)
from services.console.screens import search_form
from services.console.web import POOL, USER, api, page, render

routes = web.RouteTableDef()
PAGE_SIZE = 50
BULK_ACTIONS = {
    "add_tag": "タグを追加",
    "remove_tag": "タグを削除",
    "star": "スターを付ける",
    "unstar": "スターを外す",
    "join_group": "グループに追加",
    "delete": "削除",
}


async def lookups(client: RoleApi, group: str | None = None) -> dict[str, Any]:
    """Custom fields, groups and saved searches for the form (the groups' names only: their
    member counts would cost a count over every membership per page)."""
    fields, groups, filters = await asyncio.gather(
        client.get("contacts", "/v1/fields"),
        client.get("contacts", "/v1/groups", members="false"),
        client.get(
            "contacts", "/v1/filters", group_id=group if group and group.isdigit() else None
        ),
    )
    return {
        "custom_fields": fields["items"],
        "groups": groups["items"],
        "saved_filters": filters["items"],
    }


def field_choices(custom_fields: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(key, label, kind) of every field a condition row can name."""
    rows = [(key, label, kind) for key, (label, kind) in STANDARD.items()]
    rows += [(f"custom.{f['key']}", f["label"], f["type"]) for f in custom_fields]
    return rows


def _query_without(form: dict[str, str], *names: str) -> str:
    return urlencode([(k, v) for k, v in form.items() if k not in names and v])


@routes.get("/contacts")
@page("viewer")
async def search(request: web.Request) -> web.Response:
    form = {k: v for k, v in request.query.items()}
    client = api(request)
    found = await lookups(client, form.get("group"))
    custom_kinds = {f["key"]: f["type"] for f in found["custom_fields"]}
    wanted = search_form.build(form, custom_kinds)
    errors = dict(wanted.errors)
    result = None
    if not errors:
        try:
            result = await client.post(
                "contacts",
                "/v1/contacts/search",
                wanted.body(PAGE_SIZE, form.get("cursor") or None),
            )
        except ApiProblem as problem:
            if problem.status != 400:
                raise
            for name, messages in problem.by_field().items():
                errors.setdefault(wanted.input_of(name), []).extend(messages)
            if not problem.errors:
                errors.setdefault("", []).append(problem.detail)
    return render(
        request,
        "contacts.html",
        form=form,
        errors=errors,
        result=result,
        fields=field_choices(found["custom_fields"]),
        rows=range(search_form.EXTRA_ROWS),
        groups=found["groups"],
        saved_filters=found["saved_filters"],
        sorts=SORTS,
        standard=STANDARD,
        delivery_statuses=DELIVERY_STATUSES,
        sales_statuses=SALES_STATUSES,
        membership_states=MEMBERSHIP_STATES,
        history_events=HISTORY_EVENTS,
        bulk_actions=BULK_ACTIONS,
        query=_query_without(form, "cursor", "saved_as", "done", "save_error"),
        next_query=(
            _query_without(form, "cursor", "saved_as", "done", "save_error")
            + "&cursor="
            + result["next_cursor"]
            if result and result.get("next_cursor")
            else None
        ),
        may_write=request[USER].may("operator"),
        may_delete=request[USER].may("admin"),
    )


@routes.post("/contacts/filters")
@page("operator")
async def save_filter(request: web.Request) -> web.Response:
    """Save the current search as a named filter, global or for one group."""
    posted = await request.post()
    query = str(posted.get("query", ""))
    form = dict(parse_qsl(query))
    client = api(request)
    fields = await client.get("contacts", "/v1/fields")
    wanted = search_form.build(form, {f["key"]: f["type"] for f in fields["items"]})
    scope = str(posted.get("scope", ""))
    body: dict[str, Any] = {
        "name": str(posted.get("name", "")),
        "filter": wanted.filter or {"all": []},
    }
    if scope.isdigit():
        body["group_id"] = int(scope)
    try:
        saved = await client.post("contacts", "/v1/filters", body)
    except ApiProblem as problem:
        await auth.audit(request.app[POOL], request[USER], "save_filter", None, problem.status)
        if problem.status not in (400, 404, 409):
            raise
        raise web.HTTPSeeOther(
            "/contacts?" + urlencode({**form, "save_error": problem.detail[:300]})
        ) from None
    await auth.audit(
        request.app[POOL],
        request[USER],
        "save_filter",
        f"filter:{saved['id']}",
        201,
        {"name": saved["name"], "group_id": saved["group_id"]},
    )
    raise web.HTTPSeeOther("/contacts?" + urlencode({**form, "saved_as": saved["name"]}))


@routes.post("/contacts/bulk")
@page("operator")
async def bulk(request: web.Request) -> web.Response:
    """A bulk action: first a confirmation page, then (confirm=1) the action itself."""
    posted = await request.post()
    action = str(posted.get("action", ""))
    query = str(posted.get("query", ""))
    back = "/contacts?" + query
    if action not in BULK_ACTIONS:
        raise web.HTTPSeeOther(back)
    if action == "delete" and not request[USER].may("admin"):
        raise web.HTTPForbidden()
    ids = [int(v) for v in posted.getall("id", []) if isinstance(v, str) and v.isdigit()]
    everything = posted.get("scope") == "all"
    client = api(request)
    form = dict(parse_qsl(query))
    fields = await client.get("contacts", "/v1/fields")
    wanted = search_form.build(form, {f["key"]: f["type"] for f in fields["items"]})
    tag = str(posted.get("tag", "")).strip()
    group = str(posted.get("target_group", ""))
    groups = (await client.get("contacts", "/v1/groups", members="false"))["items"]
    count = len(ids)
    if everything:
        count = (await client.post("contacts", "/v1/contacts/search", wanted.body(1, None)))[
            "total"
        ]
    problem = ""
    if action == "join_group" and (everything or not group.isdigit()):
        problem = "顧客とグループを選んでください / choose contacts and a group"
    elif action in ("add_tag", "remove_tag") and not tag:
        problem = "タグを入力してください / enter a tag"
    elif not everything and not ids:
        problem = "顧客を選択してください / select contacts"
    if problem or posted.get("confirm") != "1":
        return render(
            request,
            "bulk_confirm.html",
            action=action,
            label=BULK_ACTIONS[action],
            ids=ids,
            everything=everything,
            count=count,
            tag=tag,
            group=group,
            groups=groups,
            query=query,
            problem=problem,
        )
    if action == "join_group":
        result = await client.post(
            "contacts", f"/v1/groups/{int(group)}/members", {"contact_ids": ids}
        )
        affected = result["joined"]
    else:
        body: dict[str, Any] = {"action": action}
        if everything:
            body["filter"] = wanted.filter or {"all": []}
            if wanted.group_id is not None:
                body["group_id"] = wanted.group_id
        else:
            body["ids"] = ids
        if tag:
            body["tag"] = tag
        affected = (await client.post("contacts", "/v1/contacts/bulk", body))["affected"]
    await auth.audit(
        request.app[POOL],
        request[USER],
        f"bulk_{action}",
        None,
        200,
        {"selected": count, "affected": affected, "tag": tag or None},
    )
    raise web.HTTPSeeOther(back + ("&" if query else "") + urlencode({"done": affected}))
