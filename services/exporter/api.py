"""HTTP API of the exporter (SPEC §10): export jobs, their downloads, and the jobs list."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

from aiohttp import web

from libs.common import outbox
from libs.common.errors import Conflict, Forbidden, InvalidMessage
from libs.common.http import ROLE, ROLES, error, json_response, read_json, requires
from libs.common.mail.tokens import BadToken
from libs.common.topics import Topic
from services.exporter import jobs, processor, store
from services.exporter.context import CONTEXT, Context
from services.exporter.store import QUERIES

routes = web.RouteTableDef()
MAX_JOBS_PAGE = 200


def _ctx(request: web.Request) -> Context:
    return request.app[CONTEXT]


def _may_download(caller: str, job: Any) -> bool:
    """The requester's role or a higher one (a requester that is no role: admin only)."""
    return ROLES.get(caller, 0) >= ROLES.get(job["requested_by"], ROLES["admin"])


def _link(ctx: Context, request: web.Request, job: Any) -> str | None:
    if job["status"] != "done" or job["file_deleted_at"] is not None:
        return None
    return jobs.download_url(ctx, job) if _may_download(request[ROLE], job) else None


@routes.post("/v1/exports")
async def create_export(request: web.Request) -> web.Response:
    """CSV出力 (F-40): {source, filter | saved_filter_id | contact_ids | group_id +
    membership_states | campaign_id, columns, header, encoding, safe_csv, notify_email}.
    202 with the queued job; the link comes by mail and in GET /v1/exports/{id}."""
    ctx = _ctx(request)
    body = await read_json(request)
    export = processor.parse_request(
        body,
        requested_by=request[ROLE],
        notify_email=ctx.settings.operator_email,
        now=ctx.clock(),
    )
    await ctx.sources.check(export)
    async with ctx.pool.acquire() as conn, conn.transaction():
        job = await jobs.create(conn, export)
        await outbox.add(conn, Topic.EXPORT_REQUESTS, export["job_id"], export)
    return json_response(store.export_json(job, None), status=202)


@routes.get("/v1/exports/{id}")
async def get_export(request: web.Request) -> web.Response:
    """An export job: status, rows done / estimated total, error, and (when done, to the
    requester's role or higher) the signed download link."""
    ctx = _ctx(request)
    job = await store.get_job(ctx.pool, request.match_info["id"])
    return json_response(store.export_json(job, _link(ctx, request, job)))


@routes.get("/v1/exports/{id}/download")
async def download_export(request: web.Request) -> web.StreamResponse:
    """The file behind a signed link (?token=): 403 for a link we did not sign or a role
    below the requester's, 410 once the link expired (the file is deleted then)."""
    ctx = _ctx(request)
    job_id = request.match_info["id"]
    try:
        claims = ctx.signer.verify(request.query.get("token", ""))
    except BadToken:
        raise Forbidden("this download link is not valid") from None
    if claims.get("job") != job_id:
        raise Forbidden("this download link is not valid")
    job = await store.get_job(ctx.pool, job_id)
    if not _may_download(request[ROLE], job):
        raise Forbidden(f"only {job['requested_by']} or a higher role may download this export")
    if job["status"] != "done":
        raise Conflict(f"the export is {job['status']}, not done")
    path = jobs.file_path(ctx, job["id"])
    if ctx.clock().timestamp() >= claims.get("until", 0) or job["file_deleted_at"] is not None:
        await jobs.sweep(ctx)
        return error(410, "this download link has expired and the file was deleted")
    if not path.exists():
        return error(410, "the file of this export is gone")
    charset = {"cp932": "Shift_JIS", "utf-8-sig": "utf-8"}.get(job["request"]["encoding"], "utf-8")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": f"text/csv; charset={charset}",
            "Content-Disposition": f'attachment; filename="{job["file_name"]}"',
        },
    )


def _cursor(row: Any) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['job_id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _after(cursor: str | None) -> tuple[dt.datetime | None, str | None]:
    if not cursor:
        return None, None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, job_id = raw.partition("|")
        return dt.datetime.fromisoformat(at), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidMessage("cursor is not one we gave out", field="cursor") from None


@routes.get("/v1/jobs")
@requires("viewer")
async def list_jobs(request: web.Request) -> web.Response:
    """ジョブ確認 (F-43): imports, sync runs and exports, newest first, with status,
    counts, errors and times. ?kind=&status=&limit=&cursor= → {items, next_cursor}."""
    ctx = _ctx(request)
    query = request.query
    try:
        limit = int(query.get("limit", "50"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_JOBS_PAGE:
        raise InvalidMessage(f"limit must be 1 to {MAX_JOBS_PAGE}", field="limit")
    at, job_id = _after(query.get("cursor"))
    rows = await ctx.pool.fetch(
        QUERIES["jobs-page"], at, job_id, query.get("kind"), query.get("status"), limit
    )
    cursor = _cursor(rows[-1]) if len(rows) == limit else None
    return json_response({"items": [store.listed_job(r) for r in rows], "next_cursor": cursor})
