"""HTTP API of the contacts service (SPEC §10). JSON in and out, bearer tokens with roles."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from aiohttp import web

from libs.common.errors import Conflict, InvalidMessage, NotFound
from libs.common.http import REQUESTED_BY, ROLE, error, json_response, keyset, requires
from libs.common.http.contract import Model, contract
from libs.common.metrics import SEARCH_SECONDS
from services.contacts import store
from services.contacts.context import CONTEXT, Context
from services.contacts.processor import contact_json, contact_patch
from services.contacts.schemas import (
    ActivityQuery,
    BulkBody,
    BulkResult,
    Contact,
    ContactActivity,
    ContactBody,
    ContactPath,
    EmailCollisionList,
    FieldDefinition,
    FieldList,
    FilterPath,
    FilterQuery,
    Group,
    GroupList,
    GroupListQuery,
    GroupPath,
    Joined,
    MemberPath,
    NewField,
    NewFilter,
    NewGroup,
    NewMembers,
    SavedFilter,
    SavedFilterList,
    SearchBody,
    SearchPage,
)
from services.contacts.search import CUSTOM_PLANS, compile_filter, compile_search
from services.contacts.store import QUERIES
from services.contacts.stream import stream_contacts
from services.contacts.targets import load_saved_filters

routes = web.RouteTableDef()
#: bulk reads for other services (exports): CSV rows straight from COPY.
routes.post("/v1/contacts/stream")(stream_contacts)
TAGS = ("contacts",)
#: /v1/contacts/{id}: any segment but the fixed ones beside it, so that PATCH /v1/contacts/bulk
#: is a 405 (that path answers POST only), not a contact id that is not a number
CONTACT = "/v1/contacts/{id:(?!(?:search|bulk|stream|email-collisions)$)[^/]+}"


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


# Contacts ------------------------------------------------------------------------------


def _given(body: Model) -> dict[str, Any]:
    """The keys a client sent (absent keys leave a field as it is)."""
    return body.model_dump(exclude_unset=True)


@routes.post("/v1/contacts")
@contract(
    body=ContactBody,
    response=Contact,
    status=201,
    errors=(409,),
    tags=TAGS,
    links={"get_contact": {"id": "$response.body#/id"}},
)
async def create_contact(request: web.Request, body: Model) -> web.Response:
    """Create a contact (F-01). 409 when the email or external_id is taken."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        fields = await ctx.fields.get(conn)
        patch = contact_patch(_given(body), fields)
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


@routes.get("/v1/contacts/email-collisions")
@contract(response=EmailCollisionList, tags=TAGS)
async def email_collisions(request: web.Request) -> web.Response:
    """Contacts whose addresses differ only by case, found when the address became
    case-insensitive (issue 18 #8) and kept, neither merged nor deleted. Resolve each pair
    by editing or deleting one of them; the next maintenance pass then makes the address key
    case-insensitive for every row and the list empties."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["email-collisions"], 1000)
    items = [{k: r[k] for k in ("email_key", "contact_id", "email", "found_at")} for r in rows]
    return json_response({"items": items, "total": rows[0]["total"] if rows else 0})


@routes.get(CONTACT)
@contract(path=ContactPath, response=Contact, tags=TAGS)
async def get_contact(request: web.Request, path: ContactPath) -> web.Response:
    """One contact with its memberships."""
    ctx = _ctx(request)
    contact_id = path.id
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(QUERIES["contact-by-id"], contact_id)
        if row is None:
            raise NotFound(f"contact {contact_id} does not exist")
        memberships = [
            dict(r) for r in await conn.fetch(QUERIES["contact-memberships"], contact_id)
        ]
    return json_response(contact_json(row, memberships))


@routes.get("/v1/contacts/{id}/activity")
@contract(path=ContactPath, query=ActivityQuery, response=ContactActivity, tags=TAGS)
async def contact_activity(
    request: web.Request, path: ContactPath, query: ActivityQuery
) -> web.Response:
    """One contact's campaigns: received, errored, first open and opens, first click and
    clicks, one item per campaign, newest first (?limit 1-200, default 50; ?cursor); with
    how many campaigns it received, errored, opened and clicked in all (issue 20)."""
    after_at, after_campaign = keyset.decode(query.cursor) if query.cursor else (None, None)
    async with _ctx(request).pool.acquire() as conn:
        if await conn.fetchval(QUERIES["contact-exists"], path.id) is None:
            raise NotFound(f"contact {path.id} does not exist")
        rows = await conn.fetch(
            QUERIES["contact-activity"], path.id, after_at, after_campaign, query.limit + 1
        )
        totals = await conn.fetchrow(QUERIES["contact-activity-totals"], path.id)
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    last = rows[-1] if more else None
    return json_response(
        {
            "contact_id": path.id,
            "items": [dict(r) for r in rows],
            "next_cursor": keyset.encode(last["at"], last["campaign_id"]) if last else None,
            "totals": dict(totals),
        }
    )


@routes.patch(CONTACT)
@contract(path=ContactPath, body=ContactBody, response=Contact, errors=(409,), tags=TAGS)
async def patch_contact(request: web.Request, path: ContactPath, body: Model) -> web.Response:
    """Change some fields; absent fields stay, "" clears, custom_fields merge."""
    ctx = _ctx(request)
    contact_id = path.id
    given = _given(body)
    async with ctx.pool.acquire() as conn, conn.transaction():
        patch = contact_patch(given, await ctx.fields.get(conn))
        if "email" in given and not patch.email:
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


@routes.delete(CONTACT)
@contract(path=ContactPath, status=204, tags=TAGS)
async def delete_contact(request: web.Request, path: ContactPath) -> web.Response:
    """Delete a contact and its memberships; published as a deletion on the changelog."""
    ctx = _ctx(request)
    contact_id = path.id
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await store.delete(conn, [contact_id]):
            raise NotFound(f"contact {contact_id} does not exist")
    return web.Response(status=204)


@routes.post("/v1/contacts/search")
@requires("viewer")
@contract(body=SearchBody, response=SearchPage, tags=TAGS)
async def search_contacts(request: web.Request, body: SearchBody) -> web.Response:
    """F-05 search: {filter, sort, limit, cursor, group_id} → {items, next_cursor, total}."""
    ctx = _ctx(request)
    limit = body.limit
    started = time.perf_counter()
    async with (
        ctx.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        await conn.execute(CUSTOM_PLANS)
        fields = await ctx.fields.get(conn)
        saved = await load_saved_filters(conn, body.filter)
        page, next_cursor = compile_search(
            body.filter,
            fields,
            sort=body.sort,
            limit=limit,
            cursor=body.cursor,
            saved_filters=saved,
            group_scope=body.group_id,
        )
        rows = await conn.fetch(page.sql_page, *page.page_params)
        total = await conn.fetchval(page.sql_count, *page.count_params)
    SEARCH_SECONDS.observe(time.perf_counter() - started)
    cursor = next_cursor(rows[-1]) if len(rows) == limit else None
    return json_response(
        {"items": [contact_json(r) for r in rows], "next_cursor": cursor, "total": total}
    )


@routes.post("/v1/contacts/bulk")
@contract(body=BulkBody, response=BulkResult, errors=(404,), tags=TAGS)
async def bulk_action(request: web.Request, body: BulkBody) -> web.Response:
    """F-07: {action, ids | filter, tag} — add_tag, remove_tag, star, unstar, delete; and
    set_state {state, target_group_id}: the selected contacts' memberships in that group or
    plan move to 配信可能 / 配信停止 / 配信禁止 as an operator's change (F-10, F-11).

    For set_state, ``affected`` counts the members asked for (contacts that are not members
    are skipped); the suppression service owns the state and applies each change a moment
    later (``suppression.commands``), propagating it per the sync policy (F-12)."""
    ctx = _ctx(request)
    action = body.action
    if action == "delete" and request[ROLE] != "admin":
        return error(403, "bulk delete needs the admin role", request=request)
    tag = body.tag
    if action in ("add_tag", "remove_tag") and (not isinstance(tag, str) or not tag.strip()):
        raise InvalidMessage("tag is required for add_tag and remove_tag", field="tag")
    if action == "set_state":
        if body.state is None:
            raise InvalidMessage("state is required for set_state", field="state")
        if body.target_group_id is None:
            raise InvalidMessage(
                "target_group_id is required for set_state", field="target_group_id"
            )
    async with ctx.pool.acquire() as conn, conn.transaction():
        ids = await _selected_ids(conn, ctx, body)
        if action == "delete":
            affected = len(await store.delete(conn, ids))
        elif action == "set_state":
            assert body.state is not None and body.target_group_id is not None
            if await conn.fetchrow(QUERIES["group-by-id"], body.target_group_id) is None:
                raise NotFound(f"group or plan {body.target_group_id} does not exist")
            members = await store.set_states(
                conn,
                ids,
                body.target_group_id,
                body.state,
                requested_by=request[REQUESTED_BY],
            )
            affected = len(members)
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


async def _selected_ids(conn: Any, ctx: Context, body: BulkBody) -> list[int]:
    given = body.model_fields_set
    if ("ids" in given) == ("filter" in given):
        raise InvalidMessage("give either ids or filter", field="ids")
    if "ids" in given:
        if body.ids is None:
            raise InvalidMessage("ids must be a list of integers", field="ids")
        return list(body.ids)
    fields = await ctx.fields.get(conn)
    saved = await load_saved_filters(conn, body.filter)
    compiled = compile_filter(body.filter, fields, saved_filters=saved, group_scope=body.group_id)
    rows = await conn.fetch(f"SELECT c.id FROM contact c WHERE {compiled.where}", *compiled.params)
    return [r["id"] for r in rows]


# Custom fields ---------------------------------------------------------------------------


@routes.get("/v1/fields")
@contract(response=FieldList, tags=TAGS)
async def list_fields(request: web.Request) -> web.Response:
    """Custom field definitions (F-02)."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        fields = await ctx.fields.get(conn, fresh=True)
    return json_response({"items": [f.as_json() for f in fields.values()]})


@routes.post("/v1/fields")
@requires("admin")
@contract(body=NewField, response=FieldDefinition, status=201, errors=(409,), tags=TAGS)
async def create_field(request: web.Request, body: NewField) -> web.Response:
    """Define a custom field: {key, label, type, choices}."""
    ctx = _ctx(request)
    key, label, kind = body.key, body.label, body.type
    choices = body.choices or []
    if not label.strip():
        raise InvalidMessage("label is required", field="label")
    if kind == "choice" and not choices:
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
    """The list, create and read views of groups or of plans (one table, two kinds).

    Each view gets its own function name (list_groups / list_plans …): the name is the
    operation's id in /openapi.json."""
    path = "/v1/groups" if kind == "group" else "/v1/plans"
    plural = f"{kind}s"

    async def list_view(request: web.Request, query: GroupListQuery) -> web.Response:
        sql = QUERIES["groups" if query.members else "groups-without-counts"]
        async with _ctx(request).pool.acquire() as conn:
            rows = await conn.fetch(sql, kind)
        return json_response({"items": [dict(r) for r in rows]})

    async def create_view(request: web.Request, body: NewGroup) -> web.Response:
        name = body.name.strip()
        if not name:
            raise InvalidMessage("name is required", field="name")
        async with _ctx(request).pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["insert-group"], kind, name, body.description)
        if row is None:
            raise Conflict(f"a {kind} named {name!r} already exists")
        return json_response(dict(row), status=201)

    async def get_view(request: web.Request, path: GroupPath) -> web.Response:
        async with _ctx(request).pool.acquire() as conn:
            row = await conn.fetchrow(QUERIES["group-with-members"], path.id, kind)
        if row is None:
            raise NotFound(f"{kind} {path.id} does not exist")
        return json_response(dict(row))

    for view, name in (
        (list_view, f"list_{plural}"),
        (create_view, f"create_{kind}"),
        (get_view, f"get_{kind}"),
    ):
        view.__name__ = view.__qualname__ = name
    list_view.__doc__ = f"List {kind}s with member counts (none with ?members=false)."
    create_view.__doc__ = f"Create a {kind}: {{name, description}}."
    get_view.__doc__ = f"One {kind} with its member count" + (
        " (its steps and schedule are the scheduler's: PUT|GET /v1/plans/{id} there)."
        if kind == "plan"
        else "."
    )
    tags = (plural,)
    routes.get(path)(contract(query=GroupListQuery, response=GroupList, tags=tags)(list_view))
    routes.post(path)(
        contract(
            body=NewGroup,
            response=Group,
            status=201,
            errors=(409,),
            tags=tags,
            links={f"get_{kind}": {"id": "$response.body#/id"}},
        )(create_view)
    )
    routes.get(path + "/{id}")(contract(path=GroupPath, response=Group, tags=tags)(get_view))


_group_views("group")
_group_views("plan")


@routes.post("/v1/groups/{id}/members")
@contract(path=GroupPath, body=NewMembers, response=Joined, tags=("groups",))
async def add_members(request: web.Request, path: GroupPath, body: NewMembers) -> web.Response:
    """Join contacts to a group or plan: {contact_ids, auto_stop}. Joins are idempotent.

    ``joined`` counts memberships recorded here, at once. Their delivery state is owned by
    the suppression service, which applies each join a moment later (``suppression.commands``):
    until then its ``/v1/memberships/{contact_id}/{group_id}`` answers 404 saying the join may
    still be being applied (retry), and an unsubscribe link used meanwhile is kept and applied
    when the join arrives."""
    ctx = _ctx(request)
    group_id = path.id
    ids = body.contact_ids
    auto_stop = body.auto_stop
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
            joined_row = await store.join(
                conn,
                contact_id,
                group_id,
                auto_stop=auto_stop,
                requested_by=request[REQUESTED_BY],
            )
            if joined_row is not None:
                joined += 1
    return json_response(
        {"group_id": group_id, "joined": joined, "already_members": len(ids) - joined}
    )


@routes.delete("/v1/groups/{id}/members/{contact_id}")
@contract(path=MemberPath, status=204, tags=("groups",))
async def remove_member(request: web.Request, path: MemberPath) -> web.Response:
    """Remove a contact from a group or plan (a plan's remaining steps stop)."""
    ctx = _ctx(request)
    group_id, contact_id = path.id, path.contact_id
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await store.leave(conn, contact_id, group_id, requested_by=request[REQUESTED_BY]):
            raise NotFound(f"contact {contact_id} is not a member of group or plan {group_id}")
    return web.Response(status=204)


# Saved filters ---------------------------------------------------------------------------


def _filter_json(row: Any) -> dict[str, Any]:
    return dict(row)


@routes.get("/v1/filters")
@contract(query=FilterQuery, response=SavedFilterList, tags=("filters",))
async def list_filters(request: web.Request, query: FilterQuery) -> web.Response:
    """Saved filters (F-06): global ones, plus those of ?group_id= when given."""
    ctx = _ctx(request)
    group = query.group_id
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["saved-filters"], group)
    if group is None:
        rows = [r for r in rows if r["group_id"] is None]
    return json_response({"items": [_filter_json(r) for r in rows]})


@routes.post("/v1/filters")
@contract(
    body=NewFilter,
    response=SavedFilter,
    status=201,
    errors=(404, 409),
    tags=("filters",),
    links={"get_filter": {"id": "$response.body#/id"}},
)
async def create_filter(request: web.Request, body: NewFilter) -> web.Response:
    """Save a filter: {name, filter, group_id (optional: scoped to that group)}."""
    ctx = _ctx(request)
    name, group_id, node = body.name, body.group_id, body.filter
    if not name.strip():
        raise InvalidMessage("name is required", field="name")
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
@contract(path=FilterPath, response=SavedFilter, tags=("filters",))
async def get_filter(request: web.Request, path: FilterPath) -> web.Response:
    """One saved filter."""
    ctx = _ctx(request)
    filter_id = path.id
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["saved-filters-by-id"], [filter_id])
    if not rows:
        raise NotFound(f"saved filter {filter_id} does not exist")
    return json_response(_filter_json(rows[0]))


@routes.delete("/v1/filters/{id}")
@contract(path=FilterPath, status=204, tags=("filters",))
async def delete_filter(request: web.Request, path: FilterPath) -> web.Response:
    """Delete a saved filter."""
    ctx = _ctx(request)
    filter_id = path.id
    async with ctx.pool.acquire() as conn:
        if await conn.fetchval(QUERIES["delete-saved-filter"], filter_id) is None:
            raise NotFound(f"saved filter {filter_id} does not exist")
    return web.Response(status=204)
