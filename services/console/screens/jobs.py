"""ジョブ確認 and CSV出力: the one jobs list (the exporter's GET /v1/jobs: imports, sync runs
and exports) with live progress, the export dialog, and downloads.

The link in an export's mail is ``EXPORTER_PUBLIC_URL/v1/exports/{id}/download?token=…``;
with ``EXPORTER_PUBLIC_URL`` set to the console's address (``tayori dev`` does) it opens
the console, which asks for a login if needed and then fetches the file from the exporter
with the user's role (the exporter still checks the signed token and the role).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlparse

from aiohttp import web

from services.console import auth
from services.console.clients import ApiProblem, RoleApi
from services.console.fields import MEMBERSHIP_STATES, STANDARD
from services.console.screens import search_form
from services.console.web import (
    API,
    POOL,
    USER,
    api,
    error_page,
    login_redirect,
    page,
    render,
)

routes = web.RouteTableDef()
ENCODINGS = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8 (BOM)", "cp932": "Shift_JIS (CP932)"}
KINDS = {"import": "インポート", "sync": "配信状態の同期設定", "export": "CSV出力"}
DEFAULT_COLUMNS = ("email", "name", "company", "tags")
_JOB_ID = re.compile(r"^[0-9a-fA-F-]{36}$")


async def _jobs(client: RoleApi, query: dict[str, str]) -> dict[str, Any]:
    return await client.get(
        "exporter",
        "/v1/jobs",
        kind=query.get("kind"),
        status=query.get("status"),
        cursor=query.get("cursor"),
        limit=50,
    )


@routes.get("/jobs")
@page("viewer")
async def jobs_list(request: web.Request) -> web.Response:
    query = dict(request.query)
    found = await _jobs(api(request), query)
    running = any(j["status"] in ("queued", "running") for j in found["items"])
    template = "jobs_table.html" if query.get("partial") == "1" else "jobs.html"
    return render(
        request,
        template,
        jobs=found["items"],
        next_cursor=found.get("next_cursor"),
        kinds=KINDS,
        query=query,
        running=running,
    )


def _columns(
    custom_fields: list[dict[str, Any]], groups: list[dict[str, Any]]
) -> list[tuple[str, str]]:
    columns = [(key, label) for key, (label, _) in STANDARD.items()]
    columns += [(f"custom_fields.{f['key']}", f["label"]) for f in custom_fields]
    columns += [
        (f"unsubscribed_at:{g['id']}", f"配信停止日時(配信停止方法) {g['name']}") for g in groups
    ]
    return columns


async def _dialog(
    request: web.Request, form: dict[str, str], errors: dict[str, list[str]], status: int = 200
) -> web.Response:
    client = api(request)
    fields, groups = await asyncio.gather(
        client.get("contacts", "/v1/fields"),
        client.get("contacts", "/v1/groups", members="false"),
    )
    chosen = form.get("columns_list", ",".join(DEFAULT_COLUMNS)).split(",")
    return render(
        request,
        "export.html",
        status=status,
        form=form,
        errors=errors,
        columns=_columns(fields["items"], groups["items"]),
        chosen=chosen,
        groups=groups["items"],
        states=MEMBERSHIP_STATES,
        encodings=ENCODINGS,
    )


@routes.get("/exports/new")
@page("operator")
async def export_dialog(request: web.Request) -> web.Response:
    """The export dialog, with the search it was opened from (its query) as the rows."""
    form = {"search": request.query_string, "source": "search" if request.query_string else "group"}
    if request.query.get("group"):
        form["group_id"] = request.query["group"]
    return await _dialog(request, form, {})


@routes.post("/exports")
@page("operator")
async def create_export(request: web.Request) -> web.Response:
    posted = await request.post()
    form = {k: str(v) for k, v in posted.items() if k not in ("csrf", "column", "state")}
    columns = [str(c) for c in posted.getall("column", [])]
    states = [str(s) for s in posted.getall("state", [])]
    form["columns_list"] = ",".join(columns)
    client = api(request)
    headings = {key: label for key, (label, _) in STANDARD.items()}
    body: dict[str, Any] = {
        "columns": [
            {"key": c, "label": "配信停止日時(配信停止方法)"}
            if c.startswith("unsubscribed_at:")
            else {"key": c, "label": headings[c]}
            if c in headings
            else {"key": c}
            for c in columns
        ],
        "header": posted.get("header") == "1",
        "encoding": str(posted.get("encoding", "utf-8")),
    }
    if request[USER].email:
        body["notify_email"] = request[USER].email
    search = dict(parse_qsl(str(posted.get("search", ""))))
    fields = await client.get("contacts", "/v1/fields")
    wanted = search_form.build(search, {f["key"]: f["type"] for f in fields["items"]})
    if posted.get("source") == "group":
        group = str(posted.get("group_id", ""))
        body.update(source="group", group_id=int(group) if group.isdigit() else 0)
        if states:
            body["membership_states"] = states
    else:
        body.update(source="filter", filter=wanted.filter or {"all": []})
    try:
        job = await client.post("exporter", "/v1/exports", body)
    except ApiProblem as problem:
        await auth.audit(request.app[POOL], request[USER], "export", None, problem.status)
        if problem.status not in (400, 404, 409):
            raise
        errors: dict[str, list[str]] = {}
        for name, messages in problem.by_field().items():
            errors.setdefault(name.split(".")[0] if name else "", []).extend(messages)
        if not problem.errors:
            errors.setdefault("", []).append(problem.detail)
        return await _dialog(request, form, errors, status=problem.status)
    await auth.audit(
        request.app[POOL],
        request[USER],
        "export",
        f"export:{job['id']}",
        202,
        {"source": body["source"], "columns": columns},
    )
    raise web.HTTPSeeOther(f"/jobs?kind=export&created={job['id']}")


async def _stream(request: web.Request, job_id: str, token: str) -> web.StreamResponse:
    client = api(request)
    async with client.stream(
        "exporter", f"/v1/exports/{job_id}/download", {"token": token}
    ) as upstream:
        response = web.StreamResponse(
            headers={
                "Content-Type": upstream.headers.get("Content-Type", "text/csv"),
                "Content-Disposition": upstream.headers.get(
                    "Content-Disposition", f'attachment; filename="{job_id}.csv"'
                ),
            }
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            await response.write(chunk)
        await response.write_eof()
    await auth.audit(request.app[POOL], request[USER], "download", f"export:{job_id}", 200)
    return response


@routes.get("/v1/exports/{id}/download")
@page(None)
async def mail_link(request: web.Request) -> web.StreamResponse:
    """The export mail's link: login first if needed, then the file. An API client that
    sends its bearer token is passed through to the exporter as it is (the link works for
    curl as it did when it pointed at the exporter)."""
    job_id = request.match_info["id"]
    if not _JOB_ID.match(job_id):
        raise web.HTTPNotFound()
    if request.get(USER) is None:
        if request.headers.get("Authorization", "").lower().startswith("bearer "):
            return await _pass_through(request, job_id)
        raise login_redirect(request)
    return await _download(request, job_id, request.query.get("token", ""))


async def _pass_through(request: web.Request, job_id: str) -> web.StreamResponse:
    """The exporter's own answer to a bearer-token client, status and body as they are."""
    client = request.app[API]
    assert client.session is not None
    url = client.urls["exporter"] + f"/v1/exports/{job_id}/download"
    headers = {"Authorization": request.headers["Authorization"]}
    async with client.session.get(
        url, params={"token": request.query.get("token", "")}, headers=headers
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        for name in ("Content-Type", "Content-Disposition", "Retry-After"):
            if name in upstream.headers:
                response.headers[name] = upstream.headers[name]
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _download(request: web.Request, job_id: str, token: str) -> web.StreamResponse:
    try:
        return await _stream(request, job_id, token)
    except ApiProblem as problem:
        if problem.status == 410:
            return error_page(request, 410, "エラーが発生しました", problem.detail)
        raise


@routes.get("/exports/{id}/download")
@page("viewer")
async def download(request: web.Request) -> web.StreamResponse:
    """A finished export from the jobs list: its signed link comes from the exporter."""
    job_id = request.match_info["id"]
    if not _JOB_ID.match(job_id):
        raise web.HTTPNotFound()
    job = await api(request).get("exporter", f"/v1/exports/{job_id}")
    link = job.get("download_url")
    if not link:
        return error_page(
            request,
            409,
            "エラーが発生しました",
            f"the export is {job['status']} and has no file to download",
        )
    token = parse_qs(urlparse(link).query).get("token", [""])[0]
    return await _download(request, job_id, token)
