"""Operator HTTP API of the suppression service (SPEC §10). JSON, bearer tokens with roles.

Every route declares its contract (:mod:`libs.common.http.contract`): the models below are
both its validation and its ``/openapi.json``. The domain rules (who may move a membership
where, what a blacklist value looks like) stay in the views and the processor.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Callable
from typing import Any, Literal

from aiohttp import web
from pydantic import Field, StrictBool

from libs.common.errors import Conflict, InvalidMessage, NotFound
from libs.common.http import REQUESTED_BY, Handler, daily, json_response, requires
from libs.common.http.contract import (
    Answer,
    Id,
    InvalidRequest,
    Model,
    Name,
    Token,
    contract,
)
from libs.common.http.problems import Issue
from libs.common.mail.can_send import Decision, can_send, normalise_rule, suffix_candidates
from libs.common.mail.unsubscribe import UnsubscribeTarget
from libs.common.metrics import CAN_SEND_SECONDS
from services.suppression import store, sync
from services.suppression.context import CONTEXT, Context
from services.suppression.processor import STATES
from services.suppression.store import QUERIES

routes = web.RouteTableDef()

STATE_MESSAGE = f"state must be one of {', '.join(STATES)}"
State = Literal["deliverable", "unsubscribed", "banned"]
assert set(STATES) == {"deliverable", "unsubscribed", "banned"}  # the Literal spells STATES


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


def worded(
    fields: dict[str, str] | None = None, unknown: str | None = None
) -> Callable[[Handler], Handler]:
    """Keep the first API's wording for the failures its clients match on.

    The problem still lists every failing value (``errors``); only its ``detail`` (and the
    legacy ``error``) reads as before: ``fields`` gives a field's message for any failure
    of it, ``unknown`` the message for a key the body does not know (``{name!r}`` in it),
    and an integer or boolean that does not parse reads "<field> must be an integer" /
    "<field> must be true or false"."""

    def reword(issue: Issue) -> str | None:
        name = issue.field
        if fields and name in fields:
            return fields[name]
        if unknown is not None and issue.detail == "is not a known key of this request":
            return unknown.format(name=name)
        if issue.detail.startswith("Input should be a valid integer"):
            return f"{name} must be an integer"
        if issue.detail.startswith("Input should be a valid boolean"):
            return f"{name} must be true or false"
        return None

    def wrap(view: Handler) -> Handler:
        @functools.wraps(view)
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await view(request)
            except InvalidRequest as exc:
                message = reword(exc.issues[0]) if exc.issues[0].field else None
                if message is not None:
                    exc.reason = message
                    exc.args = (message,)
                raise

        return run

    return wrap


# Shapes ---------------------------------------------------------------------------------

#: what Token and Name enforce, said in the schema too (no control characters).
ONE_LINE = "^[^\\u0000-\\u001f\\u007f]*$"
CONTACT_ID = Field(title="顧客ID", description="the contact's id", examples=[1])
GROUP_ID = Field(title="グループID", description="the group's or step plan's id", examples=[1])


class Membership(Answer):
    """One membership of a contact in a group or step plan (F-10)."""

    contact_id: int
    group_id: int
    state: State = Field(title="配信状態", examples=["deliverable"])
    method: str = Field(
        description="form, system, auto_sync, auto_stop or upstream", examples=["system"]
    )
    campaign_id: str | None = Field(description="the campaign whose link unsubscribed")
    joined_at: dt.datetime
    changed_at: dt.datetime
    changed_by: str | None = Field(
        description="who asked for the last change: the person a client named"
        " (X-Tayori-Requested-By) or the token's role; null for a reader's own link",
        examples=["tanaka@example.jp"],
    )
    version: int


class Memberships(Answer):
    items: list[Membership]


class ContactPath(Model):
    contact_id: Id = CONTACT_ID


class RefusalDay(Answer):
    date: dt.date = Field(description="a calendar day in the asked time zone")
    unsubscribes: int = Field(ge=0, title="配信停止", description="memberships stopped that day")
    unsubscribed_contacts: int = Field(ge=0, description="distinct contacts among them")
    by_form: int = Field(ge=0, description="of which by the reader (解除フォーム, one-click)")
    bans: int = Field(ge=0, title="配信禁止")


class DailyRefusals(Answer):
    tz: str
    days: list[RefusalDay] = Field(description="oldest first; the last is today")
    totals: dict[str, int]


DAILY_FIGURES = ("unsubscribes", "unsubscribed_contacts", "by_form", "bans")


class MembershipPath(Model):
    contact_id: Id = CONTACT_ID
    group_id: Id = GROUP_ID


class NewState(Model):
    state: State = Field(title="配信状態", examples=["unsubscribed"])


class SyncPolicy(Answer):
    unsubscribe: bool = Field(title="配信停止の同期")
    ban: bool = Field(title="配信禁止の同期")
    updated_at: dt.datetime


class SyncJob(Answer):
    id: str
    kind: Literal["unsubscribe", "ban"]
    status: Literal["queued", "running", "done", "failed"]
    requested_by: str | None
    contacts: int
    changed: int
    detail: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class SyncJobs(Answer):
    items: list[SyncJob]


class PolicyChange(SyncPolicy):
    jobs: list[SyncJob] = Field(description="the jobs started by switching a policy on")


class NewPolicy(Model):
    """The switches to set; an absent one stays as it is."""

    unsubscribe: StrictBool = Field(None, title="配信停止の同期", examples=[True])  # type: ignore[assignment]
    ban: StrictBool = Field(None, title="配信禁止の同期", examples=[False])  # type: ignore[assignment]


class SyncJobPath(Model):
    id: Token = Field(
        description="the job's id",
        examples=["0b6f6c1e-2c1d-4a8e-9f55-1c2b3d4e5f60"],
        json_schema_extra={"pattern": ONE_LINE},
    )


class BlacklistRule(Answer):
    id: int
    title: str
    match: Literal["exact", "suffix"]
    value: str
    created_at: dt.datetime


class Blacklist(Answer):
    items: list[BlacklistRule]


class NewRule(Model):
    title: Name = Field(title="タイトル", examples=["担当者の依頼"])
    match: Literal["exact", "suffix"] = Field(
        title="一致方法",
        description="exact: a whole address; suffix: a domain and its subdomains",
        examples=["suffix"],
    )
    value: Token = Field(
        title="アドレス・ドメイン",
        description="an address (exact) or a domain (suffix)",
        examples=["example.com"],
    )


class RulePath(Model):
    id: Id = Field(description="the rule's id", examples=[1])


class ContactIdPath(Model):
    id: Id = CONTACT_ID


class NewBlackFlag(Model):
    black: StrictBool = Field(title="ブラック", examples=[True])


class BlackFlag(Answer):
    contact_id: int
    black: bool
    changed: bool = Field(description="whether the flag was different before")


class EmailPath(Model):
    email: Token = Field(
        title="メールアドレス",
        description="the address",
        examples=["taro@example.jp"],
        json_schema_extra={"pattern": ONE_LINE},
    )


class Suppression(Answer):
    email: str
    reason: Literal["bounced", "complained", "invalid"]
    source: str | None
    created_at: dt.datetime


class CanSendQuery(Model):
    contact_id: Id = CONTACT_ID
    group_id: Id = Field(  # type: ignore[assignment]
        None, title="グループID", description="the group or step plan (absent: the address only)"
    )
    include_unsubscribed: bool = Field(
        False, description="whether an unsubscribed membership may still be sent to"
    )


class CanSend(Answer):
    allowed: bool
    reason: str | None = Field(description="why not (null when allowed)", examples=["banned"])
    membership_state: State | None
    blacklist_rule: int | None = Field(description="the id of the matching blacklist rule")
    address_known: bool


class LinkQuery(Model):
    contact_id: Id = CONTACT_ID
    group_id: Id = GROUP_ID
    campaign_id: Token | None = Field(
        None, description="the campaign the link is sent in", examples=["42"]
    )


class UnsubscribeLink(Answer):
    url: str = Field(
        examples=["https://mail.example.jp/u/k1.2VJzS0SAn6ZGb1oehhLauGspTFGSsTEuDK20ZY9_1C8"]
    )
    headers: dict[str, str] = Field(description="List-Unsubscribe and List-Unsubscribe-Post")


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
            "changed_by",
            "version",
        )
    }


# Memberships (F-10, F-11) -----------------------------------------------------------------


@routes.get("/v1/memberships/{contact_id}")
@worded()
@contract(path=ContactPath, response=Memberships)
async def list_memberships(request: web.Request, path: ContactPath) -> web.Response:
    """Every membership of one contact with its state, method and time of change."""
    rows = await _ctx(request).pool.fetch(QUERIES["memberships-of"], path.contact_id)
    return json_response({"items": [_membership_json(r) for r in rows]})


@routes.get("/v1/memberships/{contact_id}/{group_id}")
@worded()
@contract(path=MembershipPath, response=Membership)
async def get_membership(request: web.Request, path: MembershipPath) -> web.Response:
    """One membership's delivery state (配信状態).

    404 when it is not recorded here. A join made in contacts (``POST /v1/groups/{id}/members``,
    an import, an upstream event) is applied here a moment later (through
    ``suppression.commands``); until then this answers 404 saying the join may still be
    being applied: retry in a moment."""
    row = await _ctx(request).pool.fetchrow(QUERIES["membership"], path.contact_id, path.group_id)
    if row is None:
        raise store.no_membership(path.contact_id, path.group_id)
    return json_response(_membership_json(row))


@routes.put("/v1/memberships/{contact_id}/{group_id}")
@worded(fields={"state": STATE_MESSAGE})
@contract(path=MembershipPath, body=NewState, response=Membership)
async def put_membership(
    request: web.Request, path: MembershipPath, body: NewState
) -> web.Response:
    """Set a membership's state as an operator: {state}; propagates per the sync policy.

    403 when the rules of F-11 refuse the change; 404 when the membership is not recorded
    here, which for a join made a moment ago means it is still being applied (retry)."""
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        _, row = await store.change_state(
            conn,
            path.contact_id,
            path.group_id,
            body.state,
            actor="operator",
            requested_by=request[REQUESTED_BY],
        )
    return json_response(_membership_json(row))


# Sync policy (F-12) ---------------------------------------------------------------------


# Figures per day (issue 20) ----------------------------------------------------------------


@routes.get("/v1/stats/daily")
@contract(query=daily.DailyQuery, response=DailyRefusals)
async def daily_stats(request: web.Request, query: daily.DailyQuery) -> web.Response:
    """Unsubscribes (配信停止) and bans (配信禁止) per calendar day (?days=1-92, default 7;
    ?tz, default Asia/Tokyo), oldest first, today last: the memberships in that state now,
    on the day they entered it (a membership made deliverable again no longer counts;
    ``unsubscribed_contacts`` counts a reader who left every group through the sync policy
    once)."""
    start, dates = daily.window(query.days, query.tz, dt.datetime.now(dt.UTC))
    rows = await _ctx(request).pool.fetch(QUERIES["daily-refusals"], start, query.tz)
    return json_response(daily.answer(rows, query.tz, dates, DAILY_FIGURES))


@routes.get("/v1/sync-policy")
@contract(response=SyncPolicy)
async def get_sync_policy(request: web.Request) -> web.Response:
    """The two sync switches (配信状態の同期設定)."""
    row = await _ctx(request).pool.fetchrow(QUERIES["sync-policy"])
    return json_response(dict(row))


@routes.put("/v1/sync-policy")
@requires("admin")
@worded(unknown="unknown switch {name!r}; use unsubscribe and ban")
@contract(
    body=NewPolicy,
    response=PolicyChange,
    links={"get_sync_job": {"id": "$response.body#/jobs/0/id"}},
)
async def put_sync_policy(request: web.Request, body: NewPolicy) -> web.Response:
    """Set {unsubscribe, ban}; turning a switch on starts a job over existing data."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES["set-sync-policy"], body.unsubscribe, body.ban)
        jobs = []
        for kind in ("unsubscribe", "ban"):
            if row[kind] and not row[f"was_{kind}"]:
                jobs.append(await sync.create(conn, kind, request[REQUESTED_BY]))
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
@contract(response=SyncJobs)
async def list_sync_jobs(request: web.Request) -> web.Response:
    """Sync jobs, newest first (the last 100), with their counts and status."""
    rows = await _ctx(request).pool.fetch(QUERIES["sync-jobs"])
    return json_response({"items": [dict(r) for r in rows]})


@routes.get("/v1/sync-jobs/{id}")
@contract(path=SyncJobPath, response=SyncJob)
async def get_sync_job(request: web.Request, path: SyncJobPath) -> web.Response:
    """One sync job."""
    row = await _ctx(request).pool.fetchrow(QUERIES["sync-job"], path.id)
    if row is None:
        raise NotFound(f"sync job {path.id} does not exist")
    return json_response(dict(row))


# Blacklist (F-14) --------------------------------------------------------------------------


@routes.get("/v1/blacklist")
@contract(response=Blacklist)
async def list_blacklist(request: web.Request) -> web.Response:
    """Blacklist rules (ブラックリスト)."""
    rows = await _ctx(request).pool.fetch(QUERIES["blacklist"])
    return json_response({"items": [dict(r) for r in rows]})


@routes.post("/v1/blacklist")
@worded(
    fields={
        "match": "match must be exact (an address) or suffix (a domain)",
    }
)
@contract(
    body=NewRule,
    response=BlacklistRule,
    status=201,
    errors=(409,),
    links={"delete_blacklist_rule": {"id": "$response.body#/id"}},
)
async def add_blacklist_rule(request: web.Request, body: NewRule) -> web.Response:
    """Add a rule: {title, match: exact|suffix, value}."""
    title, match = body.title.strip(), body.match
    if not title:
        raise InvalidMessage("title is required", field="title")
    stored = normalise_rule(match, body.value)
    if not stored:
        raise InvalidMessage("value is required", field="value")
    if match == "exact" and ("@" not in stored or stored.startswith("@")):
        raise InvalidMessage(
            "an exact rule is a whole address, e.g. taro@example.jp", field="value"
        )
    if match == "suffix" and ("@" in stored or "." not in stored or " " in stored):
        raise InvalidMessage("a suffix rule is a domain, e.g. example.com", field="value")
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES["insert-blacklist-rule"], title, match, stored)
        if row is None:
            raise Conflict(f"a {match} rule for {stored!r} already exists")
        await store.blacklist_change(conn, row, removed=False)
    return json_response(dict(row), status=201)


@routes.delete("/v1/blacklist/{id}")
@worded()
@contract(path=RulePath, status=204)
async def delete_blacklist_rule(request: web.Request, path: RulePath) -> web.Response:
    """Remove a rule."""
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES["delete-blacklist-rule"], path.id)
        if row is None:
            raise NotFound(f"blacklist rule {path.id} does not exist")
        await store.blacklist_change(conn, row, removed=True)
    return web.Response(status=204)


@routes.put("/v1/contacts/{id}/black")
@worded()
@contract(path=ContactIdPath, body=NewBlackFlag, response=BlackFlag)
async def put_black_flag(
    request: web.Request, path: ContactIdPath, body: NewBlackFlag
) -> web.Response:
    """Set or clear a contact's black flag: {black: true|false}."""
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        changed = await store.set_black(conn, path.id, body.black)
    return json_response({"contact_id": path.id, "black": body.black, "changed": changed})


# Address suppressions (F-15) ------------------------------------------------------------


@routes.get("/v1/suppressions/{email}")
@contract(path=EmailPath, response=Suppression)
async def get_suppression(request: web.Request, path: EmailPath) -> web.Response:
    """Whether an address is suppressed (bounced, complained, invalid); 404 when not."""
    row = await _ctx(request).pool.fetchrow(QUERIES["address-suppression"], path.email)
    if row is None:
        raise NotFound("this address is not suppressed")
    return json_response(dict(row))


@routes.delete("/v1/suppressions/{email}")
@contract(path=EmailPath, status=204)
async def clear_suppression(request: web.Request, path: EmailPath) -> web.Response:
    """Clear a bounced address (クリーニング解除); complaints cannot be cleared here (403)."""
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        await store.clear_bounce(conn, path.email)
    return web.Response(status=204)


# Can-send (F-16) -----------------------------------------------------------------------------


@routes.get("/v1/can-send")
@worded()
@contract(query=CanSendQuery, response=CanSend, errors=(404,))
async def get_can_send(request: web.Request, query: CanSendQuery) -> web.Response:
    """May (contact, group) be sent to now? ?contact_id=&group_id=&include_unsubscribed=

    404 when no membership of the contact in the group is recorded here (not a member, or a
    join made a moment ago that is still being applied: retry)."""
    started = time.perf_counter()
    decision, facts = await decide_can_send(
        _ctx(request), query.contact_id, query.group_id, query.include_unsubscribed
    )
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
            raise store.no_membership(contact_id, group_id)
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
@worded()
@contract(query=LinkQuery, response=UnsubscribeLink, errors=(404,))
async def unsubscribe_link(request: web.Request, query: LinkQuery) -> web.Response:
    """The unsubscribe URL and RFC 8058 headers for ?contact_id=&group_id=&campaign_id=.

    Only for a membership that exists (in any state): 404 otherwise. The URL's token is
    opaque (it shows no id) and new on every call; each one keeps working."""
    ctx = _ctx(request)
    row = await ctx.pool.fetchrow(QUERIES["membership"], query.contact_id, query.group_id)
    if row is None:
        raise NotFound(
            f"contact {query.contact_id} is not a member of group or plan {query.group_id}"
        )
    target = UnsubscribeTarget(query.contact_id, query.group_id, query.campaign_id or None)
    headers = ctx.links.headers(target)
    # one token for both: each call seals a new one
    return json_response({"url": headers["List-Unsubscribe"][1:-1], "headers": headers})
