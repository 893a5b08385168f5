"""Bulk reads of contacts for other services (SPEC §9): ``POST /v1/contacts/stream``.

Exports and other bulk readers never read the contacts tables; they ask here. The body
names a selection and columns::

    {"filter": {F-05 node} | null, "saved_filter_id": 7 | null, "ids": [1, 2] | null,
     "group_id": 12 | null, "membership_states": ["unsubscribed"],   ([] = every member)
     "columns": ["id", "email", "name", "custom.plan", "membership.12.changed_at"],
     "time_zone": "Asia/Tokyo", "safe_csv": false, "dry_run": false}

Every selection part given must hold (they combine with AND). Columns are the standard
fields (:data:`models.FIELD_KINDS`), ``custom.<key>`` of a defined custom field, and
``membership.<group_id>.<state|method|changed_at|joined_at>``.

The answer is CSV (RFC 4180 quoting, LF line ends, UTF-8, no header line) made by
PostgreSQL's ``COPY (query) TO STDOUT`` itself — no per-row Python here, so a million rows
cost what COPY costs — one record per contact in id order, read in one REPEATABLE READ
read-only transaction (a consistent picture however long the stream). Every value is text:
NULL and '' are both empty, booleans ``true``/``false``, tags joined with ``,``, dates
``YYYY-MM-DD``, times ``YYYY-MM-DD HH:MM:SS`` in ``time_zone``, custom values as stored.
With ``safe_csv`` every cell that begins with a formula start (F-42,
:data:`libs.common.safecsv.FORMULA_STARTS`) gets a leading ``'``, done by PostgreSQL in the
query, so a reader that wants safe cells need not scan the text (scanning a million rows in
Python costs more than COPY itself). Header ``X-Estimated-Total`` carries the planner's
row estimate (for progress). A stream that fails after it started is cut off without the
closing chunk, so a reader can always tell a complete answer from a broken one.
``dry_run`` checks the request and answers ``{"estimated_total": N}`` as JSON instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from aiohttp import web

from libs.common.errors import InvalidMessage
from libs.common.http import json_response, requires
from libs.common.http.contract import contract
from libs.common.safecsv import FORMULA_STARTS
from services.contacts.context import CONTEXT
from services.contacts.models import FIELD_KINDS, MEMBERSHIP_STATES, FieldDefinition
from services.contacts.schemas import StreamBody, StreamEstimate
from services.contacts.search import compile_filter
from services.contacts.targets import load_saved_filters

MAX_IDS = 1_000_000
MAX_COLUMNS = 200
_MEMBERSHIP_COLUMN = re.compile(
    r"^membership\.([1-9][0-9]{0,17})\.(state|method|changed_at|joined_at)$"
)
_KEYS = (
    "filter",
    "saved_filter_id",
    "ids",
    "group_id",
    "membership_states",
    "columns",
    "time_zone",
    "safe_csv",
    "dry_run",
)
_TIME = "'YYYY-MM-DD HH24:MI:SS'"
#: the formula starts as code points (``ascii()`` of the first character is the cheapest
#: test PostgreSQL has: a million rows of CASE on it cost ~25% of a plain COPY).
_FORMULA_CODES = ", ".join(str(ord(c)) for c in sorted(FORMULA_STARTS))


def _may_start_formula(name: str) -> bool:
    """Whether a column's text can begin with a formula start: not ids, dates and times,
    booleans, choice codes or membership attributes; any text, tags, number or custom."""
    if name.startswith("custom."):
        return True
    return name != "id" and FIELD_KINDS.get(name) in ("text", "tags", "number")


def _safe_sql(expression: str) -> str:
    """``expression`` as text, with a leading ``'`` when it begins with a formula start."""
    text = f"({expression})::text"
    return f"CASE WHEN ascii({text}) IN ({_FORMULA_CODES}) THEN '''' || {text} ELSE {text} END"


@dataclass(frozen=True)
class StreamQuery:
    """The SELECT to COPY and its parameters; the planner's estimate query and its own."""

    select: str
    params: list[Any]
    estimate: str
    estimate_params: list[Any]
    time_zone: str


def _column_sql(
    name: Any, fields: Mapping[str, FieldDefinition], params: list[Any], groups: dict[int, str]
) -> str:
    """One column as a text expression over ``c`` (and a membership alias per group)."""
    if not isinstance(name, str):
        raise InvalidMessage("columns must be strings", field="columns")
    if name.startswith("custom."):
        key = name[len("custom.") :]
        if key not in fields:
            raise InvalidMessage(f"unknown custom field {name!r}", field="columns")
        params.append(key)
        return f"c.custom ->> ${len(params)}::text"
    found = _MEMBERSHIP_COLUMN.match(name)
    if found:
        alias = groups.setdefault(int(found[1]), f"m{len(groups)}")
        attribute = found[2]
        if attribute in ("changed_at", "joined_at"):
            return f"to_char({alias}.{attribute}, {_TIME})"
        return f"{alias}.{attribute}"
    kind = FIELD_KINDS.get(name)
    if kind is None:
        raise InvalidMessage(
            f"unknown column {name!r}: a contact field, custom.<key> or "
            "membership.<group_id>.<state|method|changed_at|joined_at>",
            field="columns",
        )
    if kind == "tags":
        return "array_to_string(c.tags, ',')"
    if kind == "boolean":
        return f"CASE WHEN c.{name} THEN 'true' ELSE 'false' END"
    if kind == "timestamp":
        return f"to_char(c.{name}, {_TIME})"
    if kind == "date":
        return f"to_char(c.{name}, 'YYYY-MM-DD')"
    return f"c.{name}"


def _selection(body: Mapping[str, Any]) -> dict[str, Any]:
    """The filter node that the selection keys amount to (ids are handled apart)."""
    parts: list[Any] = []
    if body.get("filter") not in (None, {}):
        parts.append(body["filter"])
    saved = body.get("saved_filter_id")
    if saved is not None:
        if not isinstance(saved, int) or isinstance(saved, bool):
            raise InvalidMessage("saved_filter_id must be an integer", field="saved_filter_id")
        parts.append({"saved_filter": saved})
    group_id = body.get("group_id")
    states = body.get("membership_states") or []
    if not isinstance(states, list) or any(s not in MEMBERSHIP_STATES for s in states):
        raise InvalidMessage(
            f"membership_states: a list of {', '.join(MEMBERSHIP_STATES)}",
            field="membership_states",
        )
    if group_id is not None:
        if not isinstance(group_id, int) or isinstance(group_id, bool):
            raise InvalidMessage("group_id must be an integer", field="group_id")
        members = [{"membership": {"group_id": group_id, "state": s}} for s in states]
        parts.append({"any": members} if members else {"membership": {"group_id": group_id}})
    elif states:
        raise InvalidMessage("membership_states needs a group_id", field="membership_states")
    return {"all": parts}


async def compile_stream(
    conn: asyncpg.Connection, fields: Mapping[str, FieldDefinition], body: Mapping[str, Any]
) -> StreamQuery:
    """Check a stream request and build its query; bad input raises InvalidMessage."""
    unknown = set(body) - set(_KEYS)
    if unknown:
        raise InvalidMessage(f"unknown keys {sorted(unknown)}", field=sorted(unknown)[0])
    columns = body.get("columns")
    if not isinstance(columns, list) or not columns or len(columns) > MAX_COLUMNS:
        raise InvalidMessage(f"columns: a list of 1 to {MAX_COLUMNS} names", field="columns")
    time_zone = body.get("time_zone") or "UTC"
    try:
        ZoneInfo(str(time_zone))
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidMessage(f"unknown time zone {time_zone!r}", field="time_zone") from None
    node = _selection(body)
    group_scope = body.get("group_id")
    saved = await load_saved_filters(conn, node)
    compiled = compile_filter(node, fields, saved_filters=saved, group_scope=group_scope)
    params = list(compiled.params)
    where = [compiled.where]
    ids = body.get("ids")
    if ids is not None:
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_IDS
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise InvalidMessage(f"ids: a list of at most {MAX_IDS} integers", field="ids")
        params.append(ids)
        where.append(f"c.id = ANY(${len(params)}::bigint[])")
    where_params = list(params)
    safe = body.get("safe_csv", False)
    if not isinstance(safe, bool):
        raise InvalidMessage("safe_csv must be true or false", field="safe_csv")
    groups: dict[int, str] = {}
    selected = [_column_sql(name, fields, params, groups) for name in columns]
    if safe:
        selected = [
            _safe_sql(sql) if _may_start_formula(name) else sql
            for name, sql in zip(columns, selected, strict=True)
        ]
    joins = "".join(
        f" LEFT JOIN membership {alias} ON {alias}.contact_id = c.id AND {alias}.group_id = {gid}"
        for gid, alias in groups.items()
    )
    condition = " AND ".join(f"({w})" for w in where)
    return StreamQuery(
        select=f"SELECT {', '.join(selected)} FROM contact c{joins}"
        f" WHERE {condition} ORDER BY c.id",
        params=params,
        estimate=f"EXPLAIN (FORMAT JSON) SELECT 1 FROM contact c WHERE {condition}",
        estimate_params=where_params,
        time_zone=str(time_zone),
    )


async def _estimate(conn: asyncpg.Connection, query: StreamQuery) -> int:
    plan = await conn.fetchval(query.estimate, *query.estimate_params)
    if isinstance(plan, str):  # a connection without the pool's json codec
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


@requires("viewer")
@contract(
    body=StreamBody,
    response=StreamEstimate,
    media={"text/csv": "the selected contacts' columns, one CSV record per contact"},
    tags=("contacts",),
)
async def stream_contacts(request: web.Request, body: StreamBody) -> web.StreamResponse:
    """Bulk read (SPEC §9): the selected contacts' columns as CSV rows from COPY, in id
    order (see services/contacts/stream.py); ``dry_run`` → {estimated_total} as JSON.

    An internal read for the exporter (and other bulk readers)."""
    ctx = request.app[CONTEXT]
    given = body.model_dump(exclude_unset=True)
    async with (
        ctx.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        query = await compile_stream(conn, await ctx.fields.get(conn), given)
        await conn.execute("SELECT set_config('TimeZone', $1, true)", query.time_zone)
        total = await _estimate(conn, query)
        if body.dry_run:
            return json_response({"estimated_total": total})
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "X-Estimated-Total": str(total),
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        # COPY hands over rows in chunks; each write waits while the reader is behind,
        # which pauses COPY too: memory stays flat on both sides.
        await conn.copy_from_query(query.select, *query.params, output=response.write, format="csv")
    await response.write_eof()
    return response
