"""HTTP API of step-mail schedules (F-29) on the scheduler.

The plan is created on contacts (``POST /v1/plans`` there: name; members join with
``POST /v1/groups/{id}/members``); its schedule is set here, under the same id:

- ``PUT /v1/plans/{id}``: ``{category_id, from_address, from_name?, reply_to?, coupon_url?,
  track_opens?, track_clicks?, steps: [{id?, day_offset, send_time "HH:MM", subject,
  format, body}]}``. Steps are matched by ``id`` (as ``GET`` returns it): a step given
  with its id is edited (only sends not yet made change), one without is new, one left out
  is removed (never due again; its statistics stay).
- ``GET /v1/plans``, ``GET /v1/plans/{id}``: schedules with per-step statistics (released,
  success, error, suppressed, skipped, opens, clicks, unique_opens, unique_clicks) and
  enrolment counts.
- ``GET /v1/plans/{id}/enrolments?contact_id=&limit=&cursor=``: enrolments, newest first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from libs.common.errors import NotFound
from libs.common.http import json_response, requires
from libs.common.http.contract import contract
from services.scheduler import plans, store
from services.scheduler.api import _ctx
from services.scheduler.contracts import (
    Enrolments,
    EnrolmentsQuery,
    NoQuery,
    Plan,
    PlanBody,
    PlanPath,
    Plans,
)
from services.scheduler.store import QUERIES

routes = web.RouteTableDef()


def step_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "position": row["position"],
        "day_offset": row["day_offset"],
        "send_time": row["send_time"],
        "subject": row["subject"],
        "format": row["format"],
        "body": row["body"],
        "timed_since": row["timed_since"],
        # Statistics: sends released, results (first per enrolment), opens and clicks.
        "released": row["released"],
        "success": row["success"],
        "error": row["error"],
        "suppressed": row["suppressed"],
        "skipped": row["skipped"],
        "opens": row["opens"],
        "clicks": row["clicks"],
        "unique_opens": row["unique_opens"],
        "unique_clicks": row["unique_clicks"],
    }


def plan_json(
    row: Mapping[str, Any], steps: list[Any], counts: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": row["id"],
        "name": row["name"],
        "category_id": row["category_id"],
        "from_address": row["from_address"],
        "from_name": row["from_name"],
        "reply_to": row["reply_to"],
        "coupon_url": row["coupon_url"],
        "track_opens": row["track_opens"],
        "track_clicks": row["track_clicks"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "steps": [step_json(s) for s in steps],
    }
    if counts is not None:
        body["enrolments"] = {"active": counts["active"], "ended": counts["ended"]}
    return body


@routes.put("/v1/plans/{id}")
@requires("operator")
@contract(
    path=PlanPath,
    query=NoQuery,
    body=PlanBody,
    response=Plan,
    also={201: Plan},
    links={"get_plan": {"id": "$request.path.id"}, "list_enrolments": {"id": "$request.path.id"}},
)
async def put_plan(
    request: web.Request, path: PlanPath, query: NoQuery, body: PlanBody
) -> web.Response:
    """Set a plan's schedule: its category (window and time zone), sender and steps.

    201 when the plan had no schedule before, 200 when it replaces one."""
    ctx = _ctx(request)
    plan_id = path.id
    keys = await ctx.contacts.custom_field_keys()
    values, wanted = plans.validate_plan(
        body.model_dump(exclude_unset=True), custom_field_keys=keys
    )
    plan = await ctx.contacts.plan(plan_id)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        await store.check_category(conn, values["category_id"])
        row = await conn.fetchrow(
            QUERIES["upsert-plan"],
            plan_id,
            plan["name"],
            values["category_id"],
            values["from_address"],
            values["from_name"],
            values["reply_to"],
            values["coupon_url"],
            values["track_opens"],
            values["track_clicks"],
            now,
        )
        current = {r["id"]: r for r in await conn.fetch(QUERIES["lock-plan-steps"], plan_id)}
        changes, removed = plans.plan_edit(current, wanted)
        for change in changes:
            s = change.step
            await conn.execute(
                QUERIES["save-step"],
                change.id,
                plan_id,
                change.position,
                s.day_offset,
                s.send_time,
                s.subject,
                s.format,
                s.body,
                now,
                change.retimed,
            )
        if removed:
            await conn.execute(QUERIES["remove-steps"], removed, now)
        if row["created"]:
            # Members who joined before the schedule existed are enrolled at their join;
            # steps whose moment passed before now skip them (steps.py).
            await conn.execute(QUERIES["enrol-members"], plan_id)
        steps = await conn.fetch(QUERIES["plan-steps"], plan_id)
        counts = await conn.fetchrow(QUERIES["enrolment-counts"], plan_id)
    return json_response(plan_json(row, steps, counts), status=201 if row["created"] else 200)


@routes.get("/v1/plans")
@contract(query=NoQuery, response=Plans, errors=(400,))
async def list_plans(request: web.Request, query: NoQuery) -> web.Response:
    """Every plan schedule with its steps and their statistics."""
    async with _ctx(request).pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["plans"])
        items = [plan_json(r, await conn.fetch(QUERIES["plan-steps"], r["id"])) for r in rows]
    return json_response({"items": items})


@routes.get("/v1/plans/{id}")
@contract(path=PlanPath, query=NoQuery, response=Plan)
async def get_plan(request: web.Request, path: PlanPath, query: NoQuery) -> web.Response:
    """One plan schedule: steps with statistics, and enrolments running and ended."""
    plan_id = path.id
    async with _ctx(request).pool.acquire() as conn:
        row = await conn.fetchrow(QUERIES["plan"], plan_id)
        if row is None:
            raise NotFound(f"plan {plan_id} has no schedule")
        steps = await conn.fetch(QUERIES["plan-steps"], plan_id)
        counts = await conn.fetchrow(QUERIES["enrolment-counts"], plan_id)
    return json_response(plan_json(row, steps, counts))


@routes.get("/v1/plans/{id}/enrolments")
@contract(path=PlanPath, query=EnrolmentsQuery, response=Enrolments)
async def list_enrolments(
    request: web.Request, path: PlanPath, query: EnrolmentsQuery
) -> web.Response:
    """Enrolments of a plan, newest first (?contact_id=, ?limit 1-1000, ?cursor)."""
    plan_id = path.id
    contact_id = query.contact_id
    cursor = query.cursor
    limit = query.limit
    rows = await _ctx(request).pool.fetch(
        QUERIES["enrolments-of"], plan_id, contact_id, cursor, limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {
            "id": r["id"],
            "contact_id": r["contact_id"],
            "enrolled_at": r["enrolled_at"],
            "ended_at": r["ended_at"],
            "ended_reason": r["ended_reason"],
            "steps_done": r["steps_done"],
        }
        for r in rows
    ]
    return json_response({"items": items, "next_cursor": str(rows[-1]["id"]) if more else None})
