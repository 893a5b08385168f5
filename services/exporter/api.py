"""HTTP API of the exporter (SPEC §10): export jobs, their downloads, and the jobs list.

Each route's contract (its path, query, body and answers) is a model below; the domain
rules of an export request (which columns, which encodings, what a campaign's list holds)
stay in :func:`services.exporter.processor.parse_request`, which also checks records that
reach ``export.requests`` without this API.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from libs.common import outbox
from libs.common.checks import CONTROL
from libs.common.errors import Conflict, Forbidden, InvalidMessage
from libs.common.http import REQUESTED_BY, ROLE, ROLES, error, json_response, requires
from libs.common.http.contract import (
    DIGITS,
    Answer,
    Id,
    InvalidRequest,
    JsonObject,
    Model,
    Text,
    Token,
    contract,
)
from libs.common.http.problems import Issue
from libs.common.mail.states import MembershipState
from libs.common.mail.tokens import BadToken
from libs.common.topics import Topic
from services.exporter import jobs, processor, store
from services.exporter.context import CONTEXT, Context
from services.exporter.csvfile import ALIASES, ENCODINGS
from services.exporter.store import QUERIES

routes = web.RouteTableDef()
MAX_JOBS_PAGE = 200


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


# Contracts ------------------------------------------------------------------------------


class Strict(Model):
    """A JSON body: values keep their JSON type ("5" is not a number, "no" not false)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


_COLUMN_KEY = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "pattern": r"^[^\x00-\x1f\x7f]*$",
}
_COLUMN_SCHEMA = {
    "anyOf": [
        {**_COLUMN_KEY, "description": "a column key", "examples": ["email"]},
        {
            "type": "object",
            "description": "a column key with the heading to print for it",
            "properties": {
                "key": _COLUMN_KEY,
                "label": {
                    "anyOf": [
                        {
                            "type": "string",
                            "maxLength": 2000,
                            "pattern": r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$",
                        },
                        {"type": "null"},
                    ]
                },
            },
            "required": ["key"],
            "additionalProperties": False,
        },
    ]
}


def _column_schema(schema: dict[str, Any], _: type) -> None:
    schema.clear()
    schema.update(_COLUMN_SCHEMA)


class Column(Strict):
    """A column: its key (``email``, ``custom_fields.<key>``, ``unsubscribed_at:<group>`` —
    配信停止日時(配信停止方法) with the method in Japanese, ``unsubscribed_at:<group>:code``
    with its machine code) and the heading printed for it (the key when none); a bare key
    is a column too."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        strict=True,
        json_schema_extra=_column_schema,
    )
    key: Token = Field(title="項目")
    label: Text | None = Field(None, title="見出し")

    @model_validator(mode="before")
    @classmethod
    def _bare_key(cls, value: Any) -> Any:
        return {"key": value} if isinstance(value, str) else value


Source = Literal["filter", "saved_filter", "contact_ids", "group", "campaign"]
Encoding = Literal["utf-8", "utf-8-sig", "cp932", "shift_jis", "sjis", "shift-jis", "windows-31j"]
assert set(Encoding.__args__) == set(ENCODINGS) | set(ALIASES)  # type: ignore[attr-defined]
_STATES = MembershipState.values()


def _states(value: list[str]) -> list[str]:
    if any(state not in _STATES for state in value):
        raise ValueError(f"must be a list of {', '.join(_STATES)}")
    return value


#: membership states; a wrong one names the list (as it always has), not its item.
States = Annotated[
    list[str],
    Field(max_length=16),
    AfterValidator(_states),
    WithJsonSchema(
        {"type": "array", "items": {"enum": list(_STATES), "type": "string"}, "maxItems": 16}
    ),
]


_EXAMPLES: list[dict[str, Any]] = [
    {"source": "filter", "filter": {}, "columns": ["email", "name"]},
    {
        "source": "group",
        "group_id": 1,
        "membership_states": ["unsubscribed"],
        "columns": ["email", {"key": "unsubscribed_at:1", "label": "配信停止日時"}],
    },
    {
        "source": "group",
        "group_id": 1,
        "membership_states": ["deliverable"],
        "filter": {"field": "tags", "op": "include_any", "value": ["展示会"]},
        "columns": ["email", "name"],
    },
]

#: what each source requires beside ``source`` and ``columns``.
_REQUIRED_BY_SOURCE = {
    "filter": ["filter"],
    "saved_filter": ["saved_filter_id"],
    "contact_ids": ["contact_ids"],
    "group": ["group_id"],
    "campaign": ["campaign_id"],
}


def _by_source(schema: dict[str, Any], _: type) -> None:
    """The body as one shape per source (what the view enforces: a source's own keys and
    the common ones, nothing else), so a client generator sees the real choices."""
    properties = schema.pop("properties")
    common = {k: v for k, v in properties.items() if k not in processor.SOURCE_KEYS_ALL}
    variants = []
    for source, keys in processor.SOURCE_KEYS.items():
        own = {}
        for key in keys:
            prop = dict(properties[key])
            if key in _REQUIRED_BY_SOURCE[source]:  # required: its value, not null
                prop.update(next(a for a in prop.pop("anyOf") if a.get("type") != "null"))
                prop.pop("default", None)
            own[key] = prop
        variants.append(
            {
                "type": "object",
                "title": f"NewExport_{source}",
                "properties": {**common, "source": {"const": source}, **own},
                "required": ["source", *_REQUIRED_BY_SOURCE[source], "columns"],
                "additionalProperties": False,
            }
        )
    for key in ("required", "additionalProperties", "type"):
        schema.pop(key, None)
    schema["oneOf"] = variants
    schema["examples"] = _EXAMPLES


class NewExport(Strict):
    """CSV出力: which rows (by ``source``, with that source's keys only) and which columns.

    - ``filter``: ``filter`` (a contacts search filter, F-05);
    - ``saved_filter``: ``saved_filter_id``;
    - ``contact_ids``: ``contact_ids``;
    - ``group``: ``group_id``, optionally ``membership_states``, and optionally ``filter``
      and/or ``saved_filter_id`` (global, or a filter scoped to that group: its 絞込条件) to
      export only the members that match;
    - ``campaign``: ``campaign_id`` (its frozen recipient list).

    A key of another source is refused (400 naming it), never ignored."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        strict=True,
        json_schema_extra=_by_source,
    )

    source: Source = Field(title="出力対象", examples=["filter"])
    filter: JsonObject | None = Field(
        None,
        title="検索条件",
        description="source filter: a contacts search filter (F-05); source group: only "
        "the members that match it",
    )
    saved_filter_id: Id | None = Field(
        None,
        title="保存した絞込",
        description="source saved_filter; source group: only the members that match it "
        "(a global saved filter or one scoped to that group)",
    )
    contact_ids: list[Id] | None = Field(
        None,
        title="顧客ID",
        description="source contact_ids",
        min_length=1,
        max_length=processor.MAX_CONTACT_IDS,
    )
    group_id: Id | None = Field(None, title="グループ", description="source group")
    membership_states: States | None = Field(
        None,
        title="配信状態",
        description="source group: only memberships in these states (all when absent)",
    )
    campaign_id: uuid.UUID | None = Field(None, title="配信", description="source campaign")
    columns: list[Column] = Field(
        title="出力項目", min_length=1, max_length=processor.MAX_COLUMNS, examples=[["email"]]
    )
    header: StrictBool = Field(True, title="見出し行")
    encoding: Encoding = Field(
        "utf-8",
        title="文字コード",
        description="cp932 for Excel in Japan (shift_jis, sjis and windows-31j mean it too)",
    )
    safe_csv: StrictBool = Field(True, title="CSVインジェクション対策")
    notify_email: Annotated[str, StringConstraints(max_length=320)] | None = Field(
        None,
        title="通知先メールアドレス",
        description="where the link is mailed (default: the operator)",
    )


class ColumnAnswer(Answer):
    key: str
    label: str | None = None


class ExportJob(Answer):
    """An export job: its progress, and the signed link once done (to the requester's role
    or a higher one)."""

    id: str = Field(examples=["4c1f0c3e-5b1a-4c53-9d3a-2f1f6d2b7a10"])
    status: str = Field(description="queued, running, done or failed", examples=["done"])
    source: str
    columns: list[ColumnAnswer]
    header: bool
    encoding: str
    safe_csv: bool
    requested_by: str = Field(
        description="the role of the token that asked: downloading needs at least this role",
        examples=["operator"],
    )
    requester: str | None = Field(
        description="who asked: the person a client named (X-Tayori-Requested-By), else the"
        " role; null for a request that came on export.requests",
        examples=["tanaka@example.jp"],
    )
    notify_email: str
    rows: int
    estimated_total: int | None
    replaced_characters: int
    size_bytes: int | None
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    expires_at: dt.datetime | None
    file_deleted: bool
    download_url: str | None


class ExportPath(Model):
    id: Token = Field(
        description="the export job's id", examples=["4c1f0c3e-5b1a-4c53-9d3a-2f1f6d2b7a10"]
    )


class DownloadQuery(Model):
    # The signer's alphabet (base64url and dots), and short enough that any such link
    # fits aiohttp's 8 KiB request line.
    token: (
        Annotated[str, StringConstraints(max_length=1024, pattern=r"^[A-Za-z0-9_.=-]*$")] | None
    ) = Field(None, description="the signature of the link (GET /v1/exports/{id} gives the link)")


class JobsQuery(Model):
    kind: Token | None = Field(None, description="import, sync or export", examples=["export"])
    status: Token | None = Field(None, description="a job status", examples=["done"])
    limit: Annotated[int, Field(ge=1, le=MAX_JOBS_PAGE), DIGITS] = Field(50, title="件数")
    cursor: Token | None = Field(None, description="next_cursor of the page before")


class ListedJob(Answer):
    job_id: str
    kind: str
    status: str
    service: str
    title: str
    requested_by: str | None
    total: int | None
    processed: int
    succeeded: int
    failed: int
    errors: list[Any]
    detail: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class JobsPage(Answer):
    items: list[ListedJob]
    next_cursor: str | None


# Views ----------------------------------------------------------------------------------


def _may_download(caller: str, job: Any) -> bool:
    """The requester's role or a higher one (a requester that is no role: admin only)."""
    return ROLES.get(caller, 0) >= ROLES.get(job["requested_by"], ROLES["admin"])


def _link(ctx: Context, request: web.Request, job: Any) -> str | None:
    if job["status"] != "done" or job["file_deleted_at"] is not None:
        return None
    return jobs.download_url(ctx, job) if _may_download(request[ROLE], job) else None


def _refuse_unused(body: NewExport) -> None:
    unused = processor.unused_keys(body.source, body.model_fields_set)
    if unused:
        raise InvalidRequest(
            [
                Issue(
                    "body",
                    (key,),
                    f"is not used by a {body.source!r} export; send only the keys of its source",
                    NewExport.model_fields[key].title,
                )
                for key in unused
            ]
        )


@routes.post("/v1/exports")
@contract(
    body=NewExport,
    response=ExportJob,
    status=202,
    links={"get_export": {"id": "$response.body#/id"}},
)
async def create_export(request: web.Request, body: NewExport) -> web.Response:
    """CSV出力 (F-40): {source, filter | saved_filter_id | contact_ids | group_id +
    membership_states (+ filter, saved_filter_id) | campaign_id, columns, header,
    encoding, safe_csv, notify_email}. 202 with the queued job; the link comes by mail and
    in GET /v1/exports/{id}. A saved filter scoped to another group than the export's is a
    400."""
    ctx = _ctx(request)
    _refuse_unused(body)
    raw = body.model_dump(mode="json", exclude_unset=True)
    raw["columns"] = [c.model_dump(exclude_unset=True) for c in body.columns]
    export = processor.parse_request(
        raw,
        requested_by=request[ROLE],
        notify_email=ctx.settings.operator_email,
        now=ctx.clock(),
    )
    await ctx.sources.check(export)
    async with ctx.pool.acquire() as conn, conn.transaction():
        job = await jobs.create(conn, export, request[REQUESTED_BY])
        await outbox.add(conn, Topic.EXPORT_REQUESTS, export["job_id"], export)
    return json_response(store.export_json(job, None), status=202)


@routes.get("/v1/exports/{id}")
@contract(path=ExportPath, response=ExportJob)
async def get_export(request: web.Request, path: ExportPath) -> web.Response:
    """An export job: status, rows done / estimated total, error, and (when done, to the
    requester's role or higher) the signed download link."""
    ctx = _ctx(request)
    job = await store.get_job(ctx.pool, path.id)
    return json_response(store.export_json(job, _link(ctx, request, job)))


@routes.get("/v1/exports/{id}/download")
@contract(
    path=ExportPath,
    query=DownloadQuery,
    media={"text/csv": "the CSV file (charset utf-8 or Shift_JIS, as the export asked)"},
    errors=(403, 409, 410),
)
async def download_export(
    request: web.Request, path: ExportPath, query: DownloadQuery
) -> web.StreamResponse:
    """The file behind a signed link (?token=): 403 for a link we did not sign or a role
    below the requester's, 410 once the link expired (the file is deleted then)."""
    ctx = _ctx(request)
    job_id = path.id
    try:
        claims = ctx.signer.verify(query.token or "")
    except BadToken:
        raise Forbidden("this download link is not valid") from None
    if claims.get("job") != job_id:
        raise Forbidden("this download link is not valid")
    job = await store.get_job(ctx.pool, job_id)
    if not _may_download(request[ROLE], job):
        raise Forbidden(f"only {job['requested_by']} or a higher role may download this export")
    if job["status"] != "done":
        raise Conflict(f"the export is {job['status']}, not done")
    file = jobs.file_path(ctx, job["id"])
    if ctx.clock().timestamp() >= claims.get("until", 0) or job["file_deleted_at"] is not None:
        await jobs.sweep(ctx)
        return error(410, "this download link has expired and the file was deleted")
    if not file.exists():
        return error(410, "the file of this export is gone")
    charset = {"cp932": "Shift_JIS", "utf-8-sig": "utf-8"}.get(job["request"]["encoding"], "utf-8")
    return web.FileResponse(
        file,
        headers={
            "Content-Type": f"text/csv; charset={charset}",
            "Content-Disposition": f'attachment; filename="{job["file_name"]}"',
        },
    )


def _cursor(row: Any) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['job_id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


_EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def _after(cursor: str | None) -> tuple[dt.datetime | None, str | None]:
    """The position a cursor we gave out names; anything else is a 400 (a forged cursor
    must not carry a NUL or an out-of-range time to PostgreSQL)."""
    if not cursor:
        return None, None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at_text, _, job_id = raw.partition("|")
        at = dt.datetime.fromisoformat(at_text)
        if at.tzinfo is None or not _EARLIEST <= at.astimezone(dt.UTC) <= _LATEST:
            raise ValueError("not an instant we wrote")
        if not job_id or CONTROL.search(job_id):
            raise ValueError("not a job id")
        return at, job_id
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise InvalidMessage("cursor is not one we gave out", field="cursor") from None


@routes.get("/v1/jobs")
@requires("viewer")
@contract(query=JobsQuery, response=JobsPage)
async def list_jobs(request: web.Request, query: JobsQuery) -> web.Response:
    """ジョブ確認 (F-43): imports, sync runs and exports, newest first, with status,
    counts, errors and times. ?kind=&status=&limit=&cursor= → {items, next_cursor}."""
    ctx = _ctx(request)
    at, job_id = _after(query.cursor)
    rows = await ctx.pool.fetch(
        QUERIES["jobs-page"], at, job_id, query.kind, query.status, query.limit
    )
    cursor = _cursor(rows[-1]) if len(rows) == query.limit else None
    return json_response({"items": [store.listed_job(r) for r in rows], "next_cursor": cursor})
