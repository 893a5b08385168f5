"""Operator HTTP API of the suppression service (SPEC §10). JSON, bearer tokens with roles."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from libs.common.errors import Conflict, InvalidMessage, NotFound
from libs.common.http import ROLE, int_param, json_response, read_json, requires
from libs.common.mail.can_send import Decision, can_send, normalise_rule, suffix_candidates
from libs.common.mail.unsubscribe import UnsubscribeTarget
from libs.common.metrics import CAN_SEND_SECONDS
from services.suppression import store, sync
from services.suppression.context import CONTEXT, Context
from services.suppression.processor import STATES
from services.suppression.store import QUERIES

routes = web.RouteTableDef()


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


def _membership_json(row: Any) -> dict[str, Any]:
    return {
        k: row[k]
        for k in (
            "contact_id",
            "group_id",
            "state",
            "method",
            "campaign_id",
            "joined_at",
            "changed_at",
            "version",
        )
    }


# Memberships (F-10, F-11) -----------------------------------------------------------------


@routes.get("/v1/memberships/{contact_id}")
async def list_memberships(request: web.Request) -> web.Response:
    """Every membership of one contact with its state, method and time of change."""
    contact_id = int_param(request.match_info["contact_id"], "contact_id")
    rows = await _ctx(request).pool.fetch(QUERIES["memberships-of"], contact_id)
    return json_response({"items": [_membership_json(r) for r in rows]})


@routes.get("/v1/memberships/{contact_id}/{group_id}")
async def get_membership(request: web.Request) -> web.Response:
    """One membership's delivery state (配信状態)."""
    contact_id = int_param(request.match_info["contact_id"], "contact_id")
    group_id = int_param(request.match_info["group_id"], "group_id")
    row = await _ctx(request).pool.fetchrow(QUERIES["membership"], contact_id, group_id)
    if row is None:
        raise NotFound(f"contact {contact_id} is not a member of group or plan {group_id}")
    return json_response(_membership_json(row))


@routes.put("/v1/memberships/{contact_id}/{group_id}")
async def put_membership(request: web.Request) -> web.Response:
    """Set a membership's state as an operator: {state}; propagates per the sync policy."""
    contact_id = int_param(request.match_info["contact_id"], "contact_id")
    group_id = int_param(request.match_info["group_id"], "group_id")
    body = await read_json(request)
    state = body.get("state")
    if state not in STATES:
        raise InvalidMessage(f"state must be one of {', '.join(STATES)}", field="state")
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        _, row = await store.change_state(conn, contact_id, group_id, state, actor="operator")
    return json_response(_membership_json(row))


# Sync policy (F-12) ---------------------------------------------------------------------


@routes.get("/v1/sync-policy")
async def get_sync_policy(request: web.Request) -> web.Response:
    """The two sync switches (配信状態の同期設定)."""
    row = await _ctx(request).pool.fetchrow(QUERIES["sync-policy"])
    return json_response(dict(row))


@routes.put("/v1/sync-policy")
@requires("admin")
async def put_sync_policy(request: web.Request) -> web.Response:
    """Set {unsubscribe, ban}; turning a switch on starts a job over existing data."""
    ctx = _ctx(request)
    body = await read_json(request)
    for name in body:
        if name not in ("unsubscribe", "ban"):
            raise InvalidMessage(f"unknown switch {name!r}; use unsubscribe and ban", field=name)
        if not isinstance(body[name], bool):
            raise InvalidMessage(f"{name} must be true or false", field=name)
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            QUERIES["set-sync-policy"], body.get("unsubscribe"), body.get("ban")
        )
        jobs = []
        for kind in ("unsubscribe", "ban"):
            if row[kind] and not row[f"was_{kind}"]:
                jobs.append(await sync.create(conn, kind, request[ROLE]))
    for job in jobs:
        sync.launch(ctx, job["id"])
    return json_response(
        {
            "unsubscribe": row["unsubscribe"],
            "ban": row["ban"],
            "updated_at": row["updated_at"],
            "jobs": [dict(j) for j in jobs],
        }
    )


@routes.get("/v1/sync-jobs")
async def list_sync_jobs(request: web.Request) -> web.Response:
    """Sync jobs, newest first, with their counts and status."""
    rows = await _ctx(request).pool.fetch(QUERIES["sync-jobs"])
    return json_response({"items": [dict(r) for r in rows]})


@routes.get("/v1/sync-jobs/{id}")
async def get_sync_job(request: web.Request) -> web.Response:
    """One sync job."""
    row = await _ctx(request).pool.fetchrow(QUERIES["sync-job"], request.match_info["id"])
    if row is None:
        raise NotFound(f"sync job {request.match_info['id']} does not exist")
    return json_response(dict(row))


# Blacklist (F-14) --------------------------------------------------------------------------


@routes.get("/v1/blacklist")
async def list_blacklist(request: web.Request) -> web.Response:
    """Blacklist rules (ブラックリスト)."""
    rows = await _ctx(request).pool.fetch(QUERIES["blacklist"])
    return json_response({"items": [dict(r) for r in rows]})


@routes.post("/v1/blacklist")
async def add_blacklist_rule(request: web.Request) -> web.Response:
    """Add a rule: {title, match: exact|suffix, value}."""
    body = await read_json(request)
    title, match, value = body.get("title"), body.get("match"), body.get("value")
    if not isinstance(title, str) or not title.strip():
        raise InvalidMessage("title is required", field="title")
    if match not in ("exact", "suffix"):
        raise InvalidMessage("match must be exact (an address) or suffix (a domain)", field="match")
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessage("value is required", field="value")
    stored = normalise_rule(match, value)
    if match == "exact" and ("@" not in stored or stored.startswith("@")):
        raise InvalidMessage(
            "an exact rule is a whole address, e.g. taro@example.jp", field="value"
        )
    if match == "suffix" and ("@" in stored or "." not in stored or " " in stored):
        raise InvalidMessage("a suffix rule is a domain, e.g. example.com", field="value")
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES["insert-blacklist-rule"], title.strip(), match, stored)
        if row is None:
            raise Conflict(f"a {match} rule for {stored!r} already exists")
        await store.blacklist_change(conn, row, removed=False)
    return json_response(dict(row), status=201)


@routes.delete("/v1/blacklist/{id}")
async def delete_blacklist_rule(request: web.Request) -> web.Response:
    """Remove a rule."""
    rule_id = int_param(request.match_info["id"], "id")
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES["delete-blacklist-rule"], rule_id)
        if row is None:
            raise NotFound(f"blacklist rule {rule_id} does not exist")
        await store.blacklist_change(conn, row, removed=True)
    return web.Response(status=204)


@routes.put("/v1/contacts/{id}/black")
async def put_black_flag(request: web.Request) -> web.Response:
    """Set or clear a contact's black flag: {black: true|false}."""
    contact_id = int_param(request.match_info["id"], "id")
    body = await read_json(request)
    if not isinstance(body.get("black"), bool):
        raise InvalidMessage("black must be true or false", field="black")
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        changed = await store.set_black(conn, contact_id, body["black"])
    return json_response({"contact_id": contact_id, "black": body["black"], "changed": changed})


# Address suppressions (F-15) ------------------------------------------------------------


@routes.get("/v1/suppressions/{email}")
async def get_suppression(request: web.Request) -> web.Response:
    """Whether an address is suppressed (bounced, complained, invalid)."""
    row = await _ctx(request).pool.fetchrow(
        QUERIES["address-suppression"], request.match_info["email"]
    )
    if row is None:
        raise NotFound("this address is not suppressed")
    return json_response(dict(row))


@routes.delete("/v1/suppressions/{email}")
async def clear_suppression(request: web.Request) -> web.Response:
    """Clear a bounced address (クリーニング解除); complaints cannot be cleared here."""
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        await store.clear_bounce(conn, request.match_info["email"])
    return web.Response(status=204)


# Can-send (F-16) -----------------------------------------------------------------------------


@routes.get("/v1/can-send")
async def get_can_send(request: web.Request) -> web.Response:
    """May (contact, group) be sent to now? ?contact_id=&group_id=&include_unsubscribed="""
    started = time.perf_counter()
    query = request.query
    contact_id = int_param(query.get("contact_id"), "contact_id")
    group_id = int_param(query["group_id"], "group_id") if query.get("group_id") else None
    include = query.get("include_unsubscribed", "false").lower() in ("1", "true", "yes")
    decision, facts = await decide_can_send(_ctx(request), contact_id, group_id, include)
    CAN_SEND_SECONDS.observe(time.perf_counter() - started)
    return json_response({"allowed": decision.allowed, "reason": decision.reason, **facts})


async def decide_can_send(
    ctx: Context, contact_id: int, group_id: int | None, include_unsubscribed: bool
) -> tuple[Decision, dict[str, Any]]:
    async with ctx.pool.acquire() as conn:
        contact = await conn.fetchrow(QUERIES["contact"], contact_id)
        membership = (
            await conn.fetchrow(QUERIES["membership"], contact_id, group_id)
            if group_id is not None
            else None
        )
        if group_id is not None and membership is None:
            raise NotFound(f"contact {contact_id} is not a member of group or plan {group_id}")
        email = contact["email"] if contact is not None else None
        rule = suppression = None
        if email:
            rule = await conn.fetchrow(QUERIES["blacklist-match"], email, suffix_candidates(email))
            suppression = await conn.fetchrow(QUERIES["address-suppression"], email)
    decision = can_send(
        blacklisted=rule is not None,
        black=bool(contact and contact["black"]),
        suppression=suppression["reason"] if suppression else None,
        delivery_status=contact["delivery_status"] if contact else None,
        membership_state=membership["state"] if membership else None,
        include_unsubscribed=include_unsubscribed,
    )
    facts = {
        "membership_state": membership["state"] if membership else None,
        "blacklist_rule": rule["id"] if rule else None,
        "address_known": email is not None,
    }
    return decision, facts


@routes.get("/v1/unsubscribe-link")
async def unsubscribe_link(request: web.Request) -> web.Response:
    """The signed unsubscribe URL and RFC 8058 headers for ?contact_id=&group_id=&campaign_id="""
    target = UnsubscribeTarget(
        int_param(request.query.get("contact_id"), "contact_id"),
        int_param(request.query.get("group_id"), "group_id"),
        request.query.get("campaign_id") or None,
    )
    links = _ctx(request).links
    return json_response({"url": links.url(target), "headers": links.headers(target)})
