"""Operator HTTP API of the scheduler (SPEC §10): categories, campaigns, reservation,
cancel, test send, preview and the frozen recipient list. JSON, bearer tokens with roles.

Each route's contract (its path, query, body and answers) is in
:mod:`services.scheduler.contracts`; invalid input answers a 400 problem naming every failing
value (libs/common/http, as in every service); a request the campaign's status does not
allow answers 409.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from typing import Any

import asyncpg
from aiohttp import web

from libs.common import outbox, trace
from libs.common.errors import Conflict, InvalidMessage, NotFound
from libs.common.http import ROLE, json_response, requires
from libs.common.http.contract import contract
from libs.common.mail import mergetags
from libs.common.mail.compose import personalise
from libs.common.mail.template import CampaignTemplate
from libs.common.metrics import RESENDS_CREATED, SCHEDULER_RELEASED
from libs.common.safecsv import safe_cell
from libs.common.topics import Topic
from services.scheduler import processor, resend, status, store
from services.scheduler.context import CONTEXT, Context
from services.scheduler.contracts import Campaign as CampaignAnswer
from services.scheduler.contracts import (
    CampaignBody,
    CampaignPath,
    Campaigns,
    CampaignsQuery,
    Categories,
    Category,
    CategoryBody,
    CategoryPath,
    NoQuery,
    Preview,
    PreviewQuery,
    ResendBody,
    TestSend,
    TestSendBody,
)
from services.scheduler.store import QUERIES
from services.scheduler.window import Window

routes = web.RouteTableDef()


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


# Categories ---------------------------------------------------------------------------------


def _category_values(body: CategoryBody) -> tuple[str, str, str, str]:
    name = body.name.strip()
    if not name:
        raise InvalidMessage("name must not be empty", field="name")
    window = Window.of(body.window_start, body.window_end, body.time_zone)
    return name, f"{window.start:%H:%M}", f"{window.end:%H:%M}", window.zone.key


_CATEGORY_LINKS = {
    "get_category": {"id": "$response.body#/id"},
    "put_category": {"id": "$response.body#/id"},
    "delete_category": {"id": "$response.body#/id"},
}


@routes.get("/v1/categories")
@contract(query=NoQuery, response=Categories, errors=(400,))
async def list_categories(request: web.Request, query: NoQuery) -> web.Response:
    """Every category with its sending window (配信可能時間帯)."""
    rows = await _ctx(request).pool.fetch(QUERIES["categories"])
    return json_response({"items": [store.category_json(r) for r in rows]})


@routes.post("/v1/categories")
@contract(query=NoQuery, body=CategoryBody, response=Category, status=201, links=_CATEGORY_LINKS)
async def create_category(request: web.Request, query: NoQuery, body: CategoryBody) -> web.Response:
    """Create a category: {name, window_start "HH:MM", window_end "HH:MM", time_zone}.

    A window whose start is after its end crosses midnight; start == end is all day."""
    values = _category_values(body)
    row = await _ctx(request).pool.fetchrow(QUERIES["insert-category"], *values)
    return json_response(store.category_json(row), status=201)


@routes.get("/v1/categories/{id}")
@contract(path=CategoryPath, query=NoQuery, response=Category)
async def get_category(request: web.Request, path: CategoryPath, query: NoQuery) -> web.Response:
    """One category."""
    category_id = path.id
    row = await _ctx(request).pool.fetchrow(QUERIES["category"], category_id)
    if row is None:
        raise NotFound(f"category {category_id} does not exist")
    return json_response(store.category_json(row))


@routes.put("/v1/categories/{id}")
@requires("admin")
@contract(path=CategoryPath, query=NoQuery, body=CategoryBody, response=Category)
async def put_category(
    request: web.Request, path: CategoryPath, query: NoQuery, body: CategoryBody
) -> web.Response:
    """Replace a category's name and window; sending campaigns follow it from the next tick."""
    category_id = path.id
    values = _category_values(body)
    row = await _ctx(request).pool.fetchrow(QUERIES["update-category"], category_id, *values)
    if row is None:
        raise NotFound(f"category {category_id} does not exist")
    return json_response(store.category_json(row))


@routes.delete("/v1/categories/{id}")
@requires("admin")
@contract(path=CategoryPath, query=NoQuery, status=204, errors=(409,))
async def delete_category(request: web.Request, path: CategoryPath, query: NoQuery) -> web.Response:
    """Delete a category no campaign uses (409 otherwise)."""
    category_id = path.id
    async with _ctx(request).pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(QUERIES["category-in-use"], category_id):
            raise Conflict(f"category {category_id} is used by campaigns or step-mail plans")
        if await conn.fetchval(QUERIES["delete-category"], category_id) is None:
            raise NotFound(f"category {category_id} does not exist")
    return web.Response(status=204)


# Campaigns ------------------------------------------------------------------------------------


_CAMPAIGN_LINKS = {
    name: {"id": "$response.body#/id"}
    for name in (
        "get_campaign",
        "preview",
        "test_send",
        "reserve",
        "recipients_csv",
        "resend_campaign",
        "cancel",
        "resume_guard",
        "drop_guard",
    )
}


@routes.post("/v1/campaigns")
@contract(
    query=NoQuery,
    body=CampaignBody,
    response=CampaignAnswer,
    status=201,
    links=_CAMPAIGN_LINKS,
)
async def create_campaign(request: web.Request, query: NoQuery, body: CampaignBody) -> web.Response:
    """Create a draft campaign (F-20..F-22); every field is checked here, not at send time.

    Body: {name, category_id, target: {group_id?, filter?, saved_filter_id?}, from_address,
    from_name?, reply_to?, subject, format: text|html, body, coupon_url?, dedupe: none|by_email,
    include_unsubscribed?, track_opens? and track_clicks? (F-34, default true), scheduled_at
    (ISO 8601 with offset, ≥ now + 3 min)}."""
    values = body.model_dump(exclude_unset=True)
    row = await _create(_ctx(request), values, request.get(ROLE))
    return json_response(store.campaign_json(row), status=201)


async def _create(
    ctx: Context, body: dict[str, Any], role: str | None, resent_from: Any = None
) -> asyncpg.Record:
    """Validate and store a draft campaign (also a re-send's); its row."""
    now = ctx.clock.now()
    keys = await ctx.contacts.custom_field_keys()
    values = processor.validate_campaign(
        body,
        custom_field_keys=keys,
        now=now,
        min_lead=dt.timedelta(seconds=ctx.settings.min_lead_seconds),
    )
    target = processor.Target(values["group_id"], values["filter"], values["saved_filter_id"])
    search_filter = target.search_filter()
    if search_filter is not None:
        await ctx.contacts.check_filter(search_filter, "target.filter")
        await _check_history(ctx, search_filter, now)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await store.check_category(conn, values["category_id"])
        row = await conn.fetchrow(
            QUERIES["insert-campaign"], uuid.uuid4(), *values.values(), role, now
        )
        if resent_from is not None:
            row = await conn.fetchrow(QUERIES["set-resent-from"], row["id"], resent_from)
        await conn.execute(
            "INSERT INTO campaign_status_change (campaign_id, status, reason, at)"
            " VALUES ($1, 'draft', $2, $3)",
            row["id"],
            "created" if resent_from is None else f"re-send of {resent_from}",
            now,
        )
    return row


async def _check_history(ctx: Context, search_filter: dict[str, Any], now: dt.datetime) -> None:
    """F-28: campaigns named in the target's history conditions (saved filters followed)
    exist, were sent, and not more than SCHEDULER_HISTORY_MONTHS months ago."""
    named = set(resend.history_campaigns(search_filter))
    pending, seen = set(resend.saved_filters(search_filter)), set()
    while pending:
        filter_id = pending.pop()
        seen.add(filter_id)
        saved = (await ctx.contacts.saved_filter(filter_id))["filter"]
        named |= set(resend.history_campaigns(saved))
        pending |= set(resend.saved_filters(saved)) - seen
    if not named:
        return
    ids = []
    for campaign_id in named:
        try:
            ids.append(uuid.UUID(campaign_id))
        except ValueError:
            pass
    rows = await ctx.pool.fetch(QUERIES["campaign-times"], ids)
    known = {str(r["id"]): (r["sent_at"], r["step"]) for r in rows}
    resend.check_history(named, known, now, ctx.settings.history_months)


@routes.get("/v1/campaigns")
@contract(query=CampaignsQuery, response=Campaigns)
async def list_campaigns(request: web.Request, query: CampaignsQuery) -> web.Response:
    """Campaigns, newest first: ?limit (1-200, default 50), ?cursor, ?status."""
    limit = query.limit
    wanted = query.status
    if wanted is not None and wanted not in status.STATUSES:
        raise InvalidMessage(f"status must be one of {', '.join(status.STATUSES)}", field="status")
    after = query.cursor
    async with _ctx(request).pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["campaigns-page"], after, wanted, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        guards = await store.guards_of(conn, [r["id"] for r in rows])
    next_cursor = str(rows[-1]["number"]) if more else None
    items = [store.campaign_json(r) | {"guard": guards[r["id"]]} for r in rows]
    return json_response({"items": items, "next_cursor": next_cursor})


@routes.get("/v1/campaigns/{id}")
@contract(path=CampaignPath, query=NoQuery, response=CampaignAnswer)
async def get_campaign(request: web.Request, path: CampaignPath, query: NoQuery) -> web.Response:
    """One campaign with its status, counters (planned, success, error, suppressed, pending,
    unsent, released, re_released), statistics (opens, clicks, unique_opens, unique_clicks),
    status history and the complaint guard (``guard``: null, or the held receiving domains
    and why)."""
    async with _ctx(request).pool.acquire() as conn:
        row = await store.get_campaign(conn, path.id)
        history = await conn.fetch(QUERIES["history"], row["id"])
        guard = await store.guard_of(conn, row["id"])
    return json_response(store.campaign_json(row, history) | {"guard": guard})


@routes.post("/v1/campaigns/{id}/reserve")
@contract(path=CampaignPath, query=NoQuery, response=CampaignAnswer, status=202, errors=(409,))
async def reserve(request: web.Request, path: CampaignPath, query: NoQuery) -> web.Response:
    """予約 (F-22): freeze the recipient list. draft → reserving; the list arrives from
    contacts and the campaign becomes scheduled (or failed when nobody is selected).

    The 3-minute rule of F-22 was checked when the campaign was created; a draft reserved
    after its time starts as soon as its list is frozen and its window is open."""
    ctx = _ctx(request)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        campaign = await store.get_campaign(conn, path.id, lock=True)
        status.check(campaign["status"], "reserving")
        request_id = uuid.uuid4()
        await conn.execute(QUERIES["set-request"], campaign["id"], request_id, trace.current())
        row = await store.transition(conn, campaign["id"], "reserving", now, "reserved")
        assert row is not None  # locked and checked above
        await outbox.add(
            conn,
            Topic.SNAPSHOT_REQUESTS,
            str(campaign["id"]),
            processor.snapshot_request(campaign, str(request_id), now),
        )
    return json_response(store.campaign_json(row), status=202)


@routes.post("/v1/campaigns/{id}/cancel")
@contract(path=CampaignPath, query=NoQuery, response=CampaignAnswer, errors=(409,))
async def cancel(request: web.Request, path: CampaignPath, query: NoQuery) -> web.Response:
    """キャンセル: only before sending starts (draft, reserving, scheduled); 409 after."""
    ctx = _ctx(request)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        campaign = await store.get_campaign(conn, path.id, lock=True)
        status.check(campaign["status"], "cancelled")
        row = await store.transition(
            conn, campaign["id"], "cancelled", now, f"by {request.get(ROLE)}"
        )
        assert row is not None  # locked and checked above
        await store.publish_control(conn, campaign["id"], "cancel", "cancelled by an operator", now)
    return json_response(store.campaign_json(row))


@routes.post("/v1/campaigns/{id}/resend")
@contract(path=CampaignPath, query=NoQuery, body=ResendBody, response=CampaignAnswer, status=201)
async def resend_campaign(
    request: web.Request, path: CampaignPath, query: NoQuery, body: ResendBody
) -> web.Response:
    """再配信 (F-28): a new draft campaign with this one's body, from, reply_to, category,
    format and settings; the target is chosen anew. Body: {scheduled_at, target?,
    recipients?: all|opened|not_opened|clicked|not_clicked|errored|not_errored (recipients
    of this campaign, as F-05 history conditions added to the target's filter), name?,
    subject?, dedupe?, include_unsubscribed?}. A campaign sent more than 3 months ago
    cannot be targeted by its recipients (400)."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        source = await store.get_campaign(conn, path.id)
    values = resend.resend_body(source, body.model_dump(exclude_unset=True))
    row = await _create(ctx, values, request.get(ROLE), resent_from=source["id"])
    RESENDS_CREATED.inc()
    return json_response(store.campaign_json(row), status=201)


# Test send and confirmation (F-23, F-24) ----------------------------------------------------


async def _recipient_values(
    ctx: Context,
    conn: asyncpg.Connection,
    campaign: Any,
    contact_id: int | None,
    *,
    from_ledger: bool,
) -> tuple[dict[str, str], str, int | None, int]:
    """(merge values, address, group_id, contact_id) of the chosen recipient: from the
    frozen list when ``from_ledger`` and the campaign has one, else the chosen contact as
    the contacts service has it now, else sample values."""
    if from_ledger and campaign["status"] in status.LEDGER_COMPLETE:
        row = await (
            conn.fetchrow(QUERIES["first-recipient"], campaign["id"])
            if contact_id is None
            else conn.fetchrow(QUERIES["recipient-of"], campaign["id"], contact_id)
        )
        if row is not None:
            return dict(row["merge_values"]), row["email"], row["group_id"], row["contact_id"]
        if contact_id is not None:
            raise NotFound(f"contact {contact_id} is not a recipient of this campaign")
    if contact_id is not None:
        contact = await ctx.contacts.contact(contact_id)
        values = processor.merge_values_of_contact(contact)
        address = contact.get("email") or processor.SAMPLE_VALUES["email"]
        return values, address, campaign["group_id"], contact_id
    values = dict(processor.SAMPLE_VALUES)
    return values, values["email"], campaign["group_id"], 0


def _with_links(ctx: Context, campaign: Any, values: dict[str, str]) -> dict[str, str]:
    """The special tags for a preview. The unsubscribe URL is a placeholder, never a
    working token: a viewer may read previews, and must not get links that unsubscribe
    real recipients. The coupon is its template rendered with the recipient's values."""
    out = dict(values)
    out["unsubscribe_url"] = f"{ctx.settings.public_base_url.rstrip('/')}/u/preview"
    if campaign["coupon_url"]:
        out["coupon_url"] = mergetags.render(campaign["coupon_url"], values)
    return out


@routes.post("/v1/campaigns/{id}/test-send")
@contract(path=CampaignPath, query=NoQuery, body=TestSendBody, response=TestSend, status=202)
async def test_send(
    request: web.Request, path: CampaignPath, query: NoQuery, body: TestSendBody
) -> web.Response:
    """テスト送信 (F-23): {addresses: "a@x, b@y" (≤ 20), contact_id?}. One send request per
    address, test=true, subject prefixed [TEST]; never counted."""
    ctx = _ctx(request)
    addresses = processor.parse_test_addresses(body.addresses)
    contact_id = body.contact_id
    now = ctx.clock.now()
    test_id = uuid.uuid4().hex[:12]
    async with ctx.pool.acquire() as conn, conn.transaction():
        campaign = await store.get_campaign(conn, path.id)
        values, _, group_id, chosen = await _recipient_values(
            ctx, conn, campaign, contact_id, from_ledger=False
        )
        content = processor.content_of(campaign, test=True)
        messages = [
            (
                Topic.SEND_REQUESTS,
                chosen,
                {
                    "request_id": str(uuid.uuid4()),
                    "campaign_id": str(campaign["id"]),
                    "step_id": f"{processor.TEST_STEP_PREFIX}{test_id}:{n}",
                    "contact_id": chosen,
                    "email": address,
                    "group_id": group_id,
                    "include_unsubscribed": campaign["include_unsubscribed"],
                    "merge_values": values,
                    "content": content,
                    "attempt": 1,
                    "released_at": now,
                    "test": True,
                },
            )
            for n, address in enumerate(addresses)
        ]
        await outbox.add_many(conn, messages)
    SCHEDULER_RELEASED.labels("test").inc(len(messages))
    return json_response(
        {
            "test_id": test_id,
            "addresses": addresses,
            "contact_id": chosen,
            "requests": len(messages),
        },
        status=202,
    )


@routes.get("/v1/campaigns/{id}/preview")
@contract(path=CampaignPath, query=PreviewQuery, response=Preview)
async def preview(request: web.Request, path: CampaignPath, query: PreviewQuery) -> web.Response:
    """確認 (F-24): the mail as rendered for one recipient (?contact_id=; default the first
    of the frozen list, or sample values before reservation): subject, from, text, html."""
    ctx = _ctx(request)
    contact_id = query.contact_id
    async with ctx.pool.acquire() as conn:
        campaign = await store.get_campaign(conn, path.id)
        values, address, _, chosen = await _recipient_values(
            ctx, conn, campaign, contact_id, from_ledger=True
        )
    values = _with_links(ctx, campaign, values)
    message = CampaignTemplate(
        campaign_id=str(campaign["id"]),
        from_address=campaign["from_address"],
        from_name=campaign["from_name"],
        reply_to=campaign["reply_to"],
        subject=campaign["subject"],
        format=campaign["format"],
        body=campaign["body"],
    )
    mime = personalise(message, values, to=address, contact_id=chosen)
    return json_response(
        {
            "contact_id": chosen,
            "to": address,
            "from": message.from_address,
            "from_name": campaign["from_name"],
            "reply_to": campaign["reply_to"],
            "subject": message.subject.render(values, "header").strip(),
            "text": message.text.render(values, "text"),
            "html": None if message.html is None else message.html.render(values, "html"),
            "mime": mime.decode("utf-8"),
        }
    )


@routes.get("/v1/campaigns/{id}/recipients.csv")
@contract(
    path=CampaignPath,
    query=NoQuery,
    media={"text/csv": "the frozen recipient list, UTF-8 CSV"},
    errors=(409,),
)
async def recipients_csv(
    request: web.Request, path: CampaignPath, query: NoQuery
) -> web.StreamResponse:
    """配信対象リスト (F-24): the frozen list as UTF-8 CSV (seq, contact_id, email, group_id,
    membership_state, then one column per merge value); 409 before it is complete."""
    ctx = _ctx(request)
    async with ctx.pool.acquire() as conn:
        campaign = await store.get_campaign(conn, path.id)
        if campaign["status"] not in status.LEDGER_COMPLETE:
            raise Conflict(f"the recipient list is not frozen yet (status {campaign['status']})")
        keys = [r["key"] for r in await conn.fetch(QUERIES["merge-keys"], campaign["id"])]
        columns = processor.merge_columns(keys)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="recipients-{campaign["id"]}.csv"',
            }
        )
        await response.prepare(request)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(["seq", "contact_id", "email", "group_id", "membership_state", *columns])
        async with conn.transaction(readonly=True):
            async for row in conn.cursor(QUERIES["ledger"], campaign["id"], prefetch=2000):
                values = row["merge_values"]
                writer.writerow(
                    [
                        row["seq"],
                        row["contact_id"],
                        safe_cell(row["email"]),
                        "" if row["group_id"] is None else row["group_id"],
                        row["membership_state"] or "",
                        *(safe_cell(values.get(c)) for c in columns),
                    ]
                )
                if buffer.tell() > 64 * 1024:
                    await response.write(buffer.getvalue().encode("utf-8"))
                    buffer.seek(0)
                    buffer.truncate()
        await response.write(buffer.getvalue().encode("utf-8"))
        await response.write_eof()
    return response
