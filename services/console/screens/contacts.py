"""顧客検索 (F-05): the search form, results with sorting, keyset paging and the exact total,
saved searches (global or per group, /v1/filters), bulk actions with a confirmation
(/v1/contacts/bulk, /v1/groups/{id}/members) — the delivery state in one group among them
(配信停止 / 配信禁止 / 配信可能: contacts' set_state, applied by suppression) — and the way to
CSV出力."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from libs.common.vocabulary import SALES_STATUSES
from services.console import auth
from services.console.clients import ApiProblem, RoleApi
from services.console.fields import (
    DELIVERY_STATUSES,
    HISTORY_EVENTS,
    MEMBERSHIP_STATES,
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
    "state_unsubscribed": "配信停止にする",
    "state_banned": "配信禁止にする",
    "state_deliverable": "配信可能にする",
    "delete": "削除",
}
#: the bulk actions that set the delivery state in one group (F-10), and the state each sets.
STATE_ACTIONS = {
    "state_unsubscribed": "unsubscribed",
    "state_banned": "banned",
    "state_deliverable": "deliverable",
}
#: what an operator's change of the delivery state does (F-10 to F-12), on its confirmation.
STATE_RULES = (
    "グループのメンバーだけが変更されます。メンバーでない顧客はそのままです。",
    "オペレーターの変更（方法: システム）として、実行したユーザーとともに記録されます。",
    "配信禁止は配信停止より強い停止です。解除できるのはオペレーターだけです。",
    "配信可能に戻すと、停止・禁止だった顧客にも再び配信されます。同意を確認してください。",
    "配信状態の同期設定がオンなら、配信停止・配信禁止は他のグループにも反映されます。",
    "変更は配信停止サービスが数秒以内に反映します。",
)


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


def _selection(wanted: search_form.Search, ids: list[int], everything: bool) -> dict[str, Any]:
    """The bulk body's selection: the search's matches, or the chosen ids."""
    if not everything:
        return {"ids": ids}
    body: dict[str, Any] = {"filter": wanted.filter or {"all": []}}
    if wanted.group_id is not None:
        body["group_id"] = wanted.group_id
    return body


async def _state_counts(
    client: RoleApi,
    wanted: search_form.Search,
    ids: list[int],
    everything: bool,
    group: int,
    state: str,
) -> dict[str, int]:
    """Of the selection: how many are members of ``group`` and how many of those are in
    ``state`` already (the confirmation shows both; the change skips non-members)."""
    chosen: dict[str, Any] = (
        wanted.filter or {"all": []} if everything else {"field": "id", "op": "in", "value": ids}
    )

    async def total(membership_state: str) -> int:
        node = {"membership": {"group_id": group, "state": membership_state}}
        body: dict[str, Any] = {"filter": {"all": [chosen, node]}, "limit": 1}
        if everything and wanted.group_id is not None:
            body["group_id"] = wanted.group_id
        return int((await client.post("contacts", "/v1/contacts/search", body))["total"])

    members, already = await asyncio.gather(total("member"), total(state))
    return {"members": members, "already": already, "changing": members - already}


def _problem(action: str, everything: bool, ids: list[int], tag: str, group: str) -> str:
    """What the form lacks for ``action`` ("" when nothing)."""
    if action == "join_group" and (everything or not group.isdigit()):
        return "顧客とグループを選んでください / choose contacts and a group"
    if action in STATE_ACTIONS and not group.isdigit():
        return "グループを選んでください / choose a group"
    if action in ("add_tag", "remove_tag") and not tag:
        return "タグを入力してください / enter a tag"
    if not everything and not ids:
        return "顧客を選択してください / select contacts"
    return ""


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
    # each action reads only its own inputs (the form has them all)
    tag = str(posted.get("tag", "")).strip() if action in ("add_tag", "remove_tag") else ""
    uses_group = action == "join_group" or action in STATE_ACTIONS
    group = str(posted.get("target_group", "")) if uses_group else ""
    groups = (await client.get("contacts", "/v1/groups", members="false"))["items"]
    count = len(ids)
    if everything:
        count = (await client.post("contacts", "/v1/contacts/search", wanted.body(1, None)))[
            "total"
        ]
    problem = _problem(action, everything, ids, tag, group)
    state = STATE_ACTIONS.get(action)
    if problem or posted.get("confirm") != "1":
        counts = None
        if state is not None and not problem:
            counts = await _state_counts(client, wanted, ids, everything, int(group), state)
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
            counts=counts,
            rules=STATE_RULES if state is not None else (),
        )
    if action == "join_group":
        result = await client.post(
            "contacts", f"/v1/groups/{int(group)}/members", {"contact_ids": ids}
        )
        affected = result["joined"]
    else:
        body: dict[str, Any] = {
            "action": "set_state" if state is not None else action,
            **_selection(wanted, ids, everything),
        }
        if tag:
            body["tag"] = tag
        if state is not None:
            body["state"] = state
            body["target_group_id"] = int(group)
        affected = (await client.post("contacts", "/v1/contacts/bulk", body))["affected"]
    await auth.audit(
        request.app[POOL],
        request[USER],
        f"bulk_{action}",
        f"group:{group}" if state is not None else None,
        200,
        {"selected": count, "affected": affected, "tag": tag or None, "state": state},
    )
    raise web.HTTPSeeOther(back + ("&" if query else "") + urlencode({"done": affected}))
