"""インポート (F-04): upload a CSV, preview its first rows with the column mapping, choose the
mode and key, then follow the job (contacts' POST/GET /v1/imports) and download its row
errors as CSV. Between upload and import the file waits in the console's own schema."""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from typing import Any

import aiohttp
from aiohttp import web

from services.console import auth
from services.console.clients import ApiProblem
from services.console.fields import STANDARD
from services.console.web import POOL, USER, api, page, render

routes = web.RouteTableDef()
ENCODINGS = {
    "auto": "自動判定",
    "cp932": "Shift_JIS (CP932)",
    "utf-8": "UTF-8",
    "utf-8-sig": "UTF-8 (BOM)",
}
MODES = {"insert_or_update": "新規追加と更新", "update_only": "更新のみ", "insert_only": "新規のみ"}
KEYS = {"email": "メールアドレス", "external_id": "顧客ID"}
PREVIEW_ROWS = 5
#: standard fields an import writes (the system keeps the rest).
WRITABLE = tuple(
    k for k in STANDARD if k not in ("id", "score", "delivery_status", "created_at", "updated_at")
)
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def preview_text(content: bytes, encoding: str) -> str:
    """The file as text for the preview (the import itself decodes strictly)."""
    if encoding == "auto":
        if content.startswith(b"\xef\xbb\xbf"):
            encoding = "utf-8-sig"
        else:
            try:
                return content.decode("utf-8")
            except UnicodeDecodeError:
                encoding = "cp932"
    codec = "utf-8-sig" if encoding == "utf-8-sig" else encoding
    return content.decode(codec, errors="replace")


def preview_rows(text: str) -> list[list[str]]:
    reader = csv.reader(io.StringIO(text[:200_000]))
    rows = []
    for row in reader:
        rows.append(row)
        if len(rows) > PREVIEW_ROWS:
            break
    return rows


@routes.get("/imports")
@page("viewer")
async def imports_page(request: web.Request) -> web.Response:
    jobs = await api(request).get("contacts", "/v1/imports", limit=20)
    return render(
        request,
        "imports.html",
        jobs=jobs["items"],
        encodings=ENCODINGS,
        errors={},
        may_write=request[USER].may("operator"),
    )


@routes.post("/imports/preview")
@page("operator")
async def preview(request: web.Request) -> web.Response:
    posted = await request.post()
    upload = posted.get("file")
    encoding = str(posted.get("encoding", "auto"))
    if not isinstance(upload, web.FileField) or encoding not in ENCODINGS:
        jobs = await api(request).get("contacts", "/v1/imports", limit=20)
        return render(
            request,
            "imports.html",
            status=400,
            jobs=jobs["items"],
            encodings=ENCODINGS,
            may_write=True,
            errors={"file": ["ファイルを選んでください / choose a file"]},
        )
    content = upload.file.read()
    upload_id = secrets.token_urlsafe(16)
    pool = request.app[POOL]
    await pool.execute(auth.QUERIES["forget-old-uploads"])
    await pool.execute(
        auth.QUERIES["save-upload"],
        upload_id,
        request[USER].id,
        (upload.filename or "upload.csv")[:255],
        content,
    )
    return await _mapping_page(request, upload_id, encoding, {}, {})


async def _mapping_page(
    request: web.Request,
    upload_id: str,
    encoding: str,
    form: dict[str, str],
    errors: dict[str, list[str]],
    status: int = 200,
) -> web.Response:
    row = await request.app[POOL].fetchrow(auth.QUERIES["upload"], upload_id, request[USER].id)
    if row is None:
        raise web.HTTPNotFound()
    rows = preview_rows(preview_text(row["content"], encoding))
    fields = await api(request).get("contacts", "/v1/fields")
    targets = [(k, STANDARD[k][0]) for k in WRITABLE]
    targets += [(f"custom.{f['key']}", f["label"]) for f in fields["items"]]
    return render(
        request,
        "import_preview.html",
        status=status,
        upload_id=upload_id,
        filename=row["filename"],
        encoding=encoding,
        encodings=ENCODINGS,
        header=rows[0] if rows else [],
        rows=rows[1:],
        targets=targets,
        modes=MODES,
        keys=KEYS,
        form=form,
        errors=errors,
    )


@routes.post("/imports")
@page("operator")
async def start_import(request: web.Request) -> web.Response:
    posted = await request.post()
    upload_id = str(posted.get("upload", ""))
    if not _ID.match(upload_id):
        raise web.HTTPNotFound()
    row = await request.app[POOL].fetchrow(auth.QUERIES["upload"], upload_id, request[USER].id)
    if row is None:
        raise web.HTTPNotFound()
    encoding = str(posted.get("encoding", "auto"))
    header = preview_rows(preview_text(row["content"], encoding))[:1]
    mapping: dict[str, str] = {}
    for i, heading in enumerate(header[0] if header else []):
        choice = posted.get(f"map{i}")
        if isinstance(choice, str) and choice != "auto":
            mapping[heading] = "" if choice == "skip" else choice
    form = aiohttp.FormData()
    form.add_field("file", row["content"], filename=row["filename"], content_type="text/csv")
    form.add_field("encoding", encoding)
    form.add_field("mode", str(posted.get("mode", "insert_or_update")))
    form.add_field("key", str(posted.get("key", "email")))
    if mapping:
        form.add_field("mapping", json.dumps(mapping, ensure_ascii=False))
    try:
        job = await api(request).call("contacts", "POST", "/v1/imports", data=form)
    except ApiProblem as problem:
        await auth.audit(request.app[POOL], request[USER], "import", None, problem.status)
        if problem.status not in (400, 413):
            raise
        errors: dict[str, list[str]] = {}
        for name, messages in problem.by_field().items():
            errors.setdefault(name, []).extend(messages)
        if not problem.errors:
            errors.setdefault("", []).append(problem.detail)
        values = {k: str(v) for k, v in posted.items() if k != "csrf"}
        return await _mapping_page(request, upload_id, encoding, values, errors, problem.status)
    await request.app[POOL].execute(auth.QUERIES["delete-upload"], upload_id)
    await auth.audit(
        request.app[POOL],
        request[USER],
        "import",
        f"import:{job['id']}",
        202,
        {"filename": row["filename"], "total": job.get("total")},
    )
    raise web.HTTPSeeOther(f"/imports/{job['id']}")


async def _job(request: web.Request) -> dict[str, Any]:
    job_id = request.match_info["id"]
    if not _ID.match(job_id):
        raise web.HTTPNotFound()
    return await api(request).get("contacts", f"/v1/imports/{job_id}")


@routes.get("/imports/{id}")
@page("viewer")
async def job_page(request: web.Request) -> web.Response:
    job = await _job(request)
    template = "import_job_body.html" if request.query.get("partial") == "1" else "import_job.html"
    return render(
        request,
        template,
        job=job,
        modes=MODES,
        keys=KEYS,
        live=job["status"] in ("queued", "running"),
    )


@routes.get("/imports/{id}/errors.csv")
@page("viewer")
async def errors_csv(request: web.Request) -> web.Response:
    job = await _job(request)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["行 / line", "項目 / column", "理由 / reason"])
    for error in job.get("errors", []):
        writer.writerow([error["line"], error.get("field") or "", error["message"]])
    return web.Response(
        body=("\ufeff" + out.getvalue()).encode("utf-8"),
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="import-{job["id"]}-errors.csv"',
        },
    )
