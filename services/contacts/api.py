"""HTTP API of the contacts service (SPEC §10). JSON in and out, bearer tokens with roles."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from aiohttp import web

from libs.common.errors import Conflict, InvalidMessage, NotFound
from libs.common.http import ROLE, int_param, json_response, read_json, requires
from libs.common.metrics import SEARCH_SECONDS
from services.contacts import store
from services.contacts.context import CONTEXT, Context
from services.contacts.models import CUSTOM_TYPES
from services.contacts.processor import contact_json, contact_patch
from services.contacts.search import CUSTOM_PLANS, MAX_LIMIT, compile_filter, compile_search
from services.contacts.store import QUERIES
from services.contacts.stream import stream_contacts
from services.contacts.targets import load_saved_filters

routes = web.RouteTableDef()
#: bulk reads for other services (exports): CSV rows straight from COPY.
routes.post("/v1/contacts/stream")(stream_contacts)


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


# Contacts ------------------------------------------------------------------------------


@routes.post("/v1/contacts")
async def create_contact(request: web.Request) -> web.Response:
    """Create a contact (F-01). 409 when the email or external_id is taken."""
    ctx = _ctx(request)
    body = await read_json(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        fields = await ctx.fields.get(conn)
        patch = contact_patch(body, fields)
        if not patch.email:
            raise InvalidMessage("email is required", field="email")
        for column in ("email", "external_id"):
            value = patch.columns.get(column)
            if value and await store.find_id(
                conn,
                external_id=value if column == "external_id" else None,
                email=value if column == "email" else None,
            ):
                raise Conflict(f"a contact with this {column} already exists")
        row = await store.insert(conn, patch)
    return json_response(contact_json(row), status=201)


@routes.get("/v1/contacts/{id}")
async def get_contact(request: web.Request) -> web.Response:
    """One contact with its memberships."""
    ctx = _ctx(request)
    contact_id = int_param(request.match_info["id"], "id")
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(QUERIES["contact-by-id"], contact_id)
        if row is None:
            raise NotFound(f"contact {contact_id} does not exist")
        memberships = [
            dict(r) for r in await conn.fetch(QUERIES["contact-memberships"], contact_id)
        ]
    return json_response(contact_json(row, memberships))


@routes.patch("/v1/contacts/{id}")
async def patch_contact(request: web.Request) -> web.Response:
    """Change some fields; absent fields stay, "" clears, custom_fields merge."""
    ctx = _ctx(request)
    contact_id = int_param(request.match_info["id"], "id")
    body = await read_json(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        patch = contact_patch(body, await ctx.fields.get(conn))
        if "email" in body and not patch.email:
            raise InvalidMessage("email cannot be cleared", field="email")
        for column in ("email", "external_id"):
            value = patch.columns.get(column)
            owner = value and await store.find_id(
                conn,
                external_id=value if column == "external_id" else None,
                email=value if column == "email" else None,
            )
            if owner and owner != contact_id:
                raise Conflict(f"another contact already has this {column}")
        row = await store.update_by_id(conn, contact_id, patch)
    return json_response(contact_json(row))


@routes.delete("/v1/contacts/{id}")
async def delete_contact(request: web.Request) -> web.Response:
    """Delete a contact and its memberships; published as a deletion on the changelog."""
    ctx = _ctx(request)
    contact_id = int_param(request.match_info["id"], "id")
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await store.delete(conn, [contact_id]):
            raise NotFound(f"contact {contact_id} does not exist")
    return web.Response(status=204)


@routes.post("/v1/contacts/search")
@requires("viewer")
async def search_contacts(request: web.Request) -> web.Response:
    """F-05 search: {filter, sort, limit, cursor, group_id} → {items, next_cursor, total}."""
    ctx = _ctx(request)
    body = await read_json(request)
    unknown = set(body) - {"filter", "sort", "limit", "cursor", "group_id"}
    if unknown:
        raise InvalidMessage(f"unknown keys {sorted(unknown)}", field=sorted(unknown)[0])
    limit = body.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidMessage(f"limit must be an integer from 1 to {MAX_LIMIT}", field="limit")
    started = time.perf_counter()
    async with (
        ctx.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        await conn.execute(CUSTOM_PLANS)
        fields = await ctx.fields.get(conn)
        saved = await load_saved_filters(conn, body.get("filter"))
        page, next_cursor = compile_search(
            body.get("filter"),
            fields,
            sort=body.get("sort"),
            limit=limit,
            cursor=body.get("cursor"),
            saved_filters=saved,
            group_scope=body.get("group_id"),
        )
        rows = await conn.fetch(page.sql_page, *page.page_params)
        total = await conn.fetchval(page.sql_count, *page.count_params)
    SEARCH_SECONDS.observe(time.perf_counter() - started)
    cursor = next_cursor(rows[-1]) if len(rows) == limit else None
    return json_response(
        {"items": [contact_json(r) for r in rows], "next_cursor": cursor, "total": total}
    )


BULK_ACTIONS = ("add_tag", "remove_tag", "star", "unstar", "delete")


@routes.post("/v1/contacts/bulk")
async def bulk_action(request: web.Request) -> web.Response:
    """F-07: {action, ids | filter, tag} — add_tag, remove_tag, star, unstar, delete."""
    ctx = _ctx(request)
    body = await read_json(request)
    action = body.get("action")
    if action not in BULK_ACTIONS:
        raise InvalidMessage(f"action must be one of {', '.join(BULK_ACTIONS)}", field="action")
    if action == "delete" and request[ROLE] != "admin":
        return json_response({"error": "bulk delete needs the admin role"}, status=403)
    tag = body.get("tag")
    if action in ("add_tag", "remove_tag") and (not isinstance(tag, str) or not tag.strip()):
        raise InvalidMessage("tag is required for add_tag and remove_tag", field="tag")
    async with ctx.pool.acquire() as conn, conn.transaction():
        ids = await _selected_ids(conn, ctx, body)
        if action == "delete":
            affected = len(await store.delete(conn, ids))
        else:
            query, arg = {
                "add_tag": ("bulk-add-tag", (tag or "").strip()),
                "remove_tag": ("bulk-remove-tag", (tag or "").strip()),
                "star": ("bulk-star", True),
                "unstar": ("bulk-star", False),
            }[action]
            rows = await conn.fetch(QUERIES[query], ids, arg)
            await store.publish_contacts(conn, rows)
            affected = len(rows)
    return json_response({"action": action, "selected": len(ids), "affected": affected})


async def _selected_ids(conn: Any, ctx: Context, body: dict[str, Any]) -> list[int]:
    if ("ids" in body) == ("filter" in body):
        raise InvalidMessage("give either ids or filter", field="ids")
    if "ids" in body:
        ids = body["ids"]
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise InvalidMessage("ids must be a list of integers", field="ids")
        if len(ids) > 100_000:
            raise InvalidMessage("at most 100000 ids; use a filter for more", field="ids")
        return ids
    fields = await ctx.fields.get(conn)
    saved = await load_saved_filters(conn, body["filter"])
    compiled = compile_filter(
        body["filter"], fields, saved_filters=saved, group_scope=body.get("group_id")
    )
    rows = await conn.fetch(f"SELECT c.id FROM contact c WHERE {compiled.where}", *compiled.params)
    return [r["id"] for r in rows]


# Custom fields ---------------------------------------------------------------------------


@routes.get("/v1/fields")
async def list_fields(request: web.Request) -> web.Response:
    """Custom field definitions (F-02)."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        fields = await ctx.fields.get(conn, fresh=True)
    return json_response({"items": [f.as_json() for f in fields.values()]})


@routes.post("/v1/fields")
@requires("admin")
async def create_field(request: web.Request) -> web.Response:
    """Define a custom field: {key, label, type, choices}."""
    ctx = _ctx(request)
    body = await read_json(request)
    key, label, kind = body.get("key"), body.get("label"), body.get("type")
    choices = body.get("choices") or []
    if (
        not isinstance(key, str)
        or not key
        or not key.isidentifier()
        or not key.islower()
        or len(key) > 63
        or not key.isascii()
    ):
        raise InvalidMessage(
            "key must be lower-case ASCII letters, digits and _ (max 63)", field="key"
        )
    if not isinstance(label, str) or not label.strip():
        raise InvalidMessage("label is required", field="label")
    if kind not in CUSTOM_TYPES:
        raise InvalidMessage(f"type must be one of {', '.join(CUSTOM_TYPES)}", field="type")
    if kind == "choice" and (
        not isinstance(choices, list)
        or not choices
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise InvalidMessage("a choice field needs a non-empty list of choices", field="choices")
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(
            QUERIES["insert-field-definition"],
            key,
            label.strip(),
            kind,
            list(choices) if kind == "choice" else [],
        )
    if row is None:
        raise Conflict(f"custom field {key!r} already exists")
    ctx.fields.invalidate()
    return json_response(dict(row), status=201)


# Groups and step plans ----------------------------------------------------------------


def _group_views(kind: str) -> None:
    path = "/v1/groups" if kind == "group" else "/v1/plans"

    async def list_groups(request: web.Request) -> web.Response:
        async with _ctx(request).pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["groups"], kind)
        return json_response({"items": [dict(r) for r in rows]})

    async def create_group(request: web.Request) -> web.Response:
        body = await read_json(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidMessage("name is required", field="name")
        async with _ctx(request).pool.acquire() as conn:
            row = await conn.fetchrow(
                QUERIES["insert-group"], kind, name.strip(), body.get("description")
            )
        if row is None:
            raise Conflict(f"a {kind} named {name.strip()!r} already exists")
        return json_response(dict(row), status=201)

    async def get_group(request: web.Request) -> web.Response:
        group_id = int_param(request.match_info["id"], "id")
        async with _ctx(request).pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["group-with-members"], group_id, kind)
        if row is None:
            raise NotFound(f"{kind} {group_id} does not exist")
        return json_response(dict(row))

    list_groups.__doc__ = f"List {kind}s with member counts."
    create_group.__doc__ = f"Create a {kind}: {{name, description}}."
    get_group.__doc__ = f"One {kind} with its member count" + (
        " (its steps and schedule are the scheduler's: PUT|GET /v1/plans/{id} there)."
        if kind == "plan"
        else "."
    )
    routes.get(path)(list_groups)
    routes.post(path)(create_group)
    routes.get(path + "/{id}")(get_group)


_group_views("group")
_group_views("plan")


@routes.post("/v1/groups/{id}/members")
async def add_members(request: web.Request) -> web.Response:
    """Join contacts to a group or plan: {contact_ids, auto_stop}. Joins are idempotent."""
    ctx = _ctx(request)
    group_id = int_param(request.match_info["id"], "id")
    body = await read_json(request)
    ids = body.get("contact_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise InvalidMessage(
            "contact_ids must be a non-empty list of integers", field="contact_ids"
        )
    auto_stop = bool(body.get("auto_stop", False))
    joined = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        known = {
            r["id"]
            for r in await conn.fetch("SELECT id FROM contact WHERE id = ANY($1::bigint[])", ids)
        }
        missing = [i for i in ids if i not in known]
        if missing:
            raise NotFound(f"contacts do not exist: {missing[:10]}")
        for contact_id in ids:
            if await store.join(conn, contact_id, group_id, auto_stop=auto_stop) is not None:
                joined += 1
    return json_response(
        {"group_id": group_id, "joined": joined, "already_members": len(ids) - joined}
    )


@routes.delete("/v1/groups/{id}/members/{contact_id}")
async def remove_member(request: web.Request) -> web.Response:
    """Remove a contact from a group or plan (a plan's remaining steps stop)."""
    ctx = _ctx(request)
    group_id = int_param(request.match_info["id"], "id")
    contact_id = int_param(request.match_info["contact_id"], "contact_id")
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await store.leave(conn, contact_id, group_id):
            raise NotFound(f"contact {contact_id} is not a member of group or plan {group_id}")
    return web.Response(status=204)


# Saved filters ---------------------------------------------------------------------------


def _filter_json(row: Any) -> dict[str, Any]:
    return dict(row)


@routes.get("/v1/filters")
async def list_filters(request: web.Request) -> web.Response:
    """Saved filters (F-06): global ones, plus those of ?group_id= when given."""
    ctx = _ctx(request)
    group = request.query.get("group_id")
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(
            QUERIES["saved-filters"], int_param(group, "group_id") if group else None
        )
    if not group:
        rows = [r for r in rows if r["group_id"] is None]
    return json_response({"items": [_filter_json(r) for r in rows]})


@routes.post("/v1/filters")
async def create_filter(request: web.Request) -> web.Response:
    """Save a filter: {name, filter, group_id (optional: scoped to that group)}."""
    ctx = _ctx(request)
    body = await read_json(request)
    name, group_id, node = body.get("name"), body.get("group_id"), body.get("filter")
    if not isinstance(name, str) or not name.strip():
        raise InvalidMessage("name is required", field="name")
    if not isinstance(node, dict):
        raise InvalidMessage("filter must be an object", field="filter")
    async with ctx.pool.acquire() as conn, conn.transaction():
        if group_id is not None and await conn.fetchrow(QUERIES["group-by-id"], group_id) is None:
            raise NotFound(f"group {group_id} does not exist")
        saved = await load_saved_filters(conn, node)
        compile_filter(node, await ctx.fields.get(conn), saved_filters=saved, group_scope=group_id)
        try:
            row = await conn.fetchrow(QUERIES["insert-saved-filter"], name.strip(), group_id, node)
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a saved filter named {name.strip()!r} already exists there") from None
    return json_response(_filter_json(row), status=201)


@routes.get("/v1/filters/{id}")
async def get_filter(request: web.Request) -> web.Response:
    """One saved filter."""
    ctx = _ctx(request)
    filter_id = int_param(request.match_info["id"], "id")
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["saved-filters-by-id"], [filter_id])
    if not rows:
        raise NotFound(f"saved filter {filter_id} does not exist")
    return json_response(_filter_json(rows[0]))


@routes.delete("/v1/filters/{id}")
async def delete_filter(request: web.Request) -> web.Response:
    """Delete a saved filter."""
    ctx = _ctx(request)
    filter_id = int_param(request.match_info["id"], "id")
    async with ctx.pool.acquire() as conn:
        if await conn.fetchval(QUERIES["delete-saved-filter"], filter_id) is None:
            raise NotFound(f"saved filter {filter_id} does not exist")
    return web.Response(status=204)
