"""F-04 bulk import: a CSV upload becomes a job that upserts contacts chunk by chunk.

``POST /v1/imports`` validates everything it can before accepting (options, encoding,
header mapping, CSV syntax), stores the file in ``import_job.payload`` and answers 202;
the job then runs in the background. Each chunk of ``import_chunk_rows`` records is one
transaction: its upserts, its row errors, the job's counts, the ``next_line`` checkpoint
and a ``jobs.events`` record (through the outbox) commit together, so a restarted service
resumes exactly where the last commit left off (:func:`resume_jobs`) and a second runner
of the same job (another replica) notices the moved checkpoint and steps aside.

Row semantics: an empty cell leaves the field unchanged (an import never clears a value);
a rejected row becomes ``{line, field, message}`` and never costs the valid rows around
it; rows apply in file order inside one transaction, so the same key twice in one file
means the later row updates the contact the earlier one created. ``line`` is the physical
line in the file where the record starts (the header is line 1; a quoted cell holding
newlines spans several lines). ``next_line`` is that kind of line number: records
starting before it are committed.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import asyncpg
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ValidationError
from structlog.contextvars import bound_contextvars

from libs.common import outbox
from libs.common.errors import InvalidMessage, NotFound
from libs.common.http import error, json_response
from libs.common.http.contract import InvalidRequest, contract, issues_of
from libs.common.jobrunner import failure_reason
from libs.common.jobs import job_event
from libs.common.logging import get_logger
from libs.common.metrics import IMPORT_ROWS
from libs.common.retry import Backoff, retry, supervise
from libs.common.topics import Topic
from services.contacts import store
from services.contacts.context import CONTEXT, Context
from services.contacts.models import JAPANESE_ALIASES, WRITABLE, FieldDefinition
from services.contacts.processor import ContactPatch, contact_patch
from services.contacts.schemas import (
    IMPORT_FORM,
    ImportJob,
    ImportJobList,
    ImportJobWithErrors,
    ImportOptions,
    ImportPath,
    ImportQuery,
    ImportQueryOptions,
)

log = get_logger(__name__)
routes = web.RouteTableDef()

KEYS = ("email", "external_id")
ENCODINGS = ("auto", "utf-8", "utf-8-sig", "cp932", "shift_jis")
_ENCODING_ALIASES = {
    "utf8": "utf-8",
    "utf-8-bom": "utf-8-sig",
    "sjis": "shift_jis",
    "shift-jis": "shift_jis",
    "windows-31j": "cp932",
    "ms932": "cp932",
}
_OPTIONS = ("mode", "key", "encoding", "mapping", "filename")
_BOM = b"\xef\xbb\xbf"
ACTIVE = ("queued", "running")
MAX_ERRORS_SHOWN = 1000
#: jobs running at once per process; the others wait (status queued) for a slot.
MAX_PARALLEL_JOBS = 2
_CHUNK_RETRY = Backoff(initial=0.2, maximum=10.0, attempts=10)
_OUTCOMES = {"inserted": "imported", "updated": "updated", "skipped": "skipped", "failed": "error"}
_DB_REFUSALS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)
_UNIQUE_FIELDS = {"contact_email_key": "email", "contact_external_id_key": "external_id"}

# SQL of this module (kept here rather than in queries.sql so the job lives in one file).
_JOB_COLUMNS = (
    "id, status, mode, key_field, encoding, filename, requested_by, mapping, next_line,"
    " total, inserted, updated, skipped, failed, detail, created_at, updated_at"
)
SQL_INSERT_JOB = (
    "INSERT INTO import_job (id, status, mode, key_field, encoding, filename, requested_by,"
    " mapping, payload, total) VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9)"
    f" RETURNING {_JOB_COLUMNS}"
)
SQL_JOB = f"SELECT {_JOB_COLUMNS} FROM import_job WHERE id = $1"
SQL_JOB_PAYLOAD = f"SELECT {_JOB_COLUMNS}, payload FROM import_job WHERE id = $1"
SQL_JOBS = (
    f"SELECT {_JOB_COLUMNS} FROM import_job WHERE ($1::text IS NULL OR status = $1)"
    " ORDER BY created_at DESC, id LIMIT $2"
)
SQL_ACTIVE_JOBS = (
    "SELECT id FROM import_job WHERE status IN ('queued', 'running') ORDER BY created_at"
)
SQL_LOCK_JOB = "SELECT status, next_line FROM import_job WHERE id = $1 FOR UPDATE"
SQL_ADVANCE_JOB = (
    "UPDATE import_job SET status = 'running', next_line = $2, inserted = inserted + $3,"
    " updated = updated + $4, skipped = skipped + $5, failed = failed + $6, updated_at = now()"
    f" WHERE id = $1 RETURNING {_JOB_COLUMNS}"
)
SQL_FINISH_JOB = (
    "UPDATE import_job SET status = $2, detail = $3, updated_at = now()"
    f" WHERE id = $1 AND status IN ('queued', 'running') RETURNING {_JOB_COLUMNS}"
)
SQL_INSERT_ERRORS = (
    "INSERT INTO import_error (job_id, line, field, message)"
    " SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[])"
)
SQL_ERRORS = (
    "SELECT line, field, message FROM import_error WHERE job_id = $1 ORDER BY line LIMIT $2"
)


# Pure parts: decoding, records, header mapping, rows ----------------------------------------


def decode(payload: bytes, encoding: str) -> tuple[str, str]:
    """The file's text and the encoding used; ``auto``: BOM → utf-8-sig, UTF-8, else cp932.

    Undecodable bytes raise InvalidMessage naming the line of the first bad byte. A UTF-8
    BOM is dropped whatever the encoding chosen.
    """
    encoding = _ENCODING_ALIASES.get(encoding.strip().lower(), encoding.strip().lower())
    if encoding not in ENCODINGS:
        raise InvalidMessage(f"encoding must be one of {', '.join(ENCODINGS)}", field="encoding")
    bom = payload.startswith(_BOM)
    if encoding == "auto":
        if bom:
            encoding = "utf-8-sig"
        else:
            try:
                return payload.decode("utf-8"), "utf-8"
            except UnicodeDecodeError as exc:
                # Valid multi-byte UTF-8 before the bad byte: a damaged UTF-8 file, not CP932.
                if not payload[: exc.start].isascii():
                    raise _undecodable(payload, exc, "utf-8") from None
            encoding = "cp932"
    body = payload[len(_BOM) :] if bom and encoding.startswith("utf-8") else payload
    try:
        text = body.decode("utf-8" if encoding == "utf-8-sig" else encoding)
    except UnicodeDecodeError as exc:
        raise _undecodable(body, exc, encoding) from None
    return text.removeprefix("\ufeff"), encoding


def _undecodable(body: bytes, exc: UnicodeDecodeError, encoding: str) -> InvalidMessage:
    ending = b"\n" if b"\n" in body else b"\r"  # a file may end its lines with CR alone
    line = body.count(ending, 0, exc.start) + 1
    return InvalidMessage(
        f"line {line}: byte 0x{body[exc.start]:02x} is not valid {encoding}; choose the file's"
        " encoding (utf-8, utf-8-sig, cp932 or shift_jis)",
        field="encoding",
    )


def records(text: str) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, line after it, cells) of each non-blank record, RFC 4180, CRLF or LF."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidMessage(f"line {line}: malformed CSV ({exc})", field="file") from None
        start, line = line, reader.line_num + 1
        if any(cell.strip() for cell in cells):
            yield start, line, cells


def match_header(header: str, fields: Mapping[str, FieldDefinition]) -> str | None:
    """The field a column heading names: a field name, a Japanese alias, a custom key or label."""
    name = header.strip().removeprefix("\ufeff")
    lower = name.lower()
    if lower in WRITABLE:
        return lower
    if name in JAPANESE_ALIASES:
        return JAPANESE_ALIASES[name]
    key = lower.removeprefix("custom.")
    if key in fields:
        return f"custom.{key}"
    for definition in fields.values():
        if definition.label.strip() == name:
            return f"custom.{definition.key}"
    return None


def _target(value: Any, fields: Mapping[str, FieldDefinition], column: str) -> str | None:
    if value == "":
        return None
    if isinstance(value, str) and (
        value in WRITABLE
        or (value.startswith("custom.") and value.removeprefix("custom.") in fields)
    ):
        return value
    raise InvalidMessage(
        f"mapping of {column!r}: {value!r} is not a writable field, custom.<key> of a defined"
        ' custom field, or "" to ignore the column',
        field="mapping",
    )


def resolve_columns(
    header: list[str], mapping: Mapping[str, Any] | None, fields: Mapping[str, FieldDefinition]
) -> list[str | None]:
    """The target of each column (``name``, ``custom.<key>`` or None = ignored).

    ``mapping`` (heading → target) wins; other headings are matched by :func:`match_header`.
    """
    mapping = mapping or {}
    names = [h.strip().removeprefix("\ufeff") for h in header]
    for column in mapping:
        if column not in names:
            raise InvalidMessage(
                f"mapping names column {column!r}, which the file does not have", field="mapping"
            )
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidMessage(f"column {twice!r} appears twice in the header", field="file")
    columns: list[str | None] = []
    seen: dict[str, str] = {}
    for name in names:
        if name in mapping:
            target = _target(mapping[name], fields, name)
        else:
            target = match_header(name, fields)
            if target is None:
                raise InvalidMessage(
                    f'column {name!r} matches no field; map it to a field, or to "" to ignore it',
                    field="mapping",
                )
        if target is not None:
            if target in seen:
                raise InvalidMessage(
                    f"columns {seen[target]!r} and {name!r} both map to {target}", field="mapping"
                )
            seen[target] = name
        columns.append(target)
    return columns


def row_patch(
    cells: list[str], columns: list[str | None], fields: Mapping[str, FieldDefinition]
) -> ContactPatch:
    """Validate one record; empty cells are left out, so they leave the field unchanged."""
    if any(cell.strip() for cell in cells[len(columns) :]):
        raise InvalidMessage(f"the row has {len(cells)} cells but the header {len(columns)}")
    data: dict[str, Any] = {}
    custom: dict[str, str] = {}
    for target, cell in zip(columns, cells, strict=False):
        if target is None or not cell.strip():
            continue
        if target.startswith("custom."):
            custom[target.removeprefix("custom.")] = cell
        else:
            data[target] = cell
    if custom:
        data["custom_fields"] = custom
    try:
        return contact_patch(data, fields)
    except InvalidMessage as exc:
        field = exc.field or ""
        if field.startswith("custom_fields."):
            field = "custom." + field.removeprefix("custom_fields.")
        raise InvalidMessage(exc.reason, field=field or None) from None


def plan_import(
    text: str,
    mapping: Mapping[str, Any] | None,
    fields: Mapping[str, FieldDefinition],
    *,
    key: str,
    mode: str,
) -> tuple[dict[str, str], int]:
    """Check a decoded file before accepting it: header, mapping, key column, CSV syntax.

    Returns the resolved mapping (heading → target, "" ignored) and the number of records.
    """
    rows = records(text)
    first = next(rows, None)
    if first is None:
        raise InvalidMessage("the file is empty; expected a header row", field="file")
    header = first[2]
    columns = resolve_columns(header, mapping, fields)
    if key not in columns:
        raise InvalidMessage(f"the file has no column for the key field {key}", field="key")
    if mode != "update_only" and "email" not in columns:
        raise InvalidMessage(
            "creating contacts needs an email column; use mode update_only", field="mode"
        )
    total = sum(1 for _ in rows)
    names = [h.strip().removeprefix("\ufeff") for h in header]
    return {n: c or "" for n, c in zip(names, columns, strict=True)}, total


# HTTP ------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_limited(read: Callable[[int], Awaitable[bytes]], limit: int) -> bytes:
    buffer = bytearray()
    while chunk := await read(1 << 16):
        buffer += chunk
        if len(buffer) > limit:
            raise _TooLarge
    return bytes(buffer)


async def _upload(request: web.Request, limit: int) -> tuple[bytes, dict[str, str]]:
    if request.content_type == "multipart/form-data":
        payload: bytes | None = None
        options: dict[str, str] = {}
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader) or part.name not in ("file", *_OPTIONS):
                raise InvalidMessage(
                    f"unexpected form part {getattr(part, 'name', None)!r}", field="file"
                )
            if part.name == "file":
                payload = await _read_limited(part.read_chunk, limit)
                options.setdefault("filename", part.filename or "")
            else:
                options[part.name] = (await _read_limited(part.read_chunk, 1 << 20)).decode()
        if payload is None:
            raise InvalidMessage("the form has no file part", field="file")
        return payload, options
    if request.content_type in ("text/csv", "text/plain", "application/octet-stream"):
        options = {k: v for k, v in request.query.items()}
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise InvalidMessage(
                f"unknown query parameter {sorted(unknown)[0]!r}", field=sorted(unknown)[0]
            )
        if request.charset and "encoding" not in options:
            options["encoding"] = request.charset
        return await _read_limited(request.content.read, limit), options
    raise InvalidMessage(
        "send multipart/form-data with a file part, or a text/csv body", field="file"
    )


def _options(raw: Mapping[str, str]) -> tuple[str, str, str, dict[str, Any] | None]:
    mode = raw.get("mode") or "insert_or_update"
    if mode not in store.MODES:
        raise InvalidMessage(f"mode must be one of {', '.join(store.MODES)}", field="mode")
    key = raw.get("key") or "email"
    if key not in KEYS:
        raise InvalidMessage(f"key must be one of {', '.join(KEYS)}", field="key")
    mapping = None
    if raw.get("mapping"):
        try:
            mapping = json.loads(raw["mapping"])
        except ValueError:
            mapping = None
        if not isinstance(mapping, dict):
            raise InvalidMessage("mapping must be a JSON object: column → field", field="mapping")
    return mode, key, raw.get("encoding") or "auto", mapping


def job_json(row: Mapping[str, Any]) -> dict[str, Any]:
    body = dict(row)
    body["key"] = body.pop("key_field")
    body["processed"] = sum(body[k] for k in ("inserted", "updated", "skipped", "failed"))
    return body


@routes.post("/v1/imports")
@contract(
    query=ImportQueryOptions,
    raw_body={
        "multipart/form-data": IMPORT_FORM,
        "text/csv": {"type": "string", "description": "the CSV file itself"},
    },
    response=ImportJob,
    status=202,
    errors=(413,),
    tags=("imports",),
    links={"get_import": {"id": "$response.body#/id"}},
)
async def create_import(request: web.Request, query: ImportQueryOptions) -> web.Response:
    """Start a CSV import (F-04); 202 with the job, 400 naming what is wrong, 413 if too big.

    multipart/form-data with part ``file`` and fields mode, key, encoding, mapping (JSON
    column → field, "" ignores a column); or a text/csv body with those as query parameters.
    """
    ctx: Context = request.app[CONTEXT]
    limit = ctx.settings.import_max_bytes
    too_large = error(413, f"the file is larger than {limit} bytes", "file")
    if request.content_length and request.content_length > limit + (1 << 20):
        return too_large
    multipart = request.content_type == "multipart/form-data"
    if multipart and request.query:
        raise InvalidMessage(
            "with multipart/form-data the options are form fields, not query parameters",
            field=next(iter(request.query)),
        )
    if multipart and "boundary" not in request.headers.get("Content-Type", ""):
        raise InvalidMessage("multipart/form-data needs its boundary parameter", field="file")
    try:
        payload, raw = await _upload(request, limit)
    except _TooLarge:
        return too_large
    except (ValueError, AssertionError, HttpProcessingError) as exc:  # a malformed form
        reason = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise InvalidMessage(f"the form cannot be read: {reason}", field="file") from None
    if multipart:  # what _options leaves unchecked: the mapping's shape, the filename
        try:
            ImportOptions.model_validate(
                {name: raw[name] for name in ("mapping", "filename") if name in raw}
            )
        except ValidationError as exc:
            raise InvalidRequest(issues_of(exc, "body", ImportOptions)) from None
    mode, key, encoding, mapping = _options(raw)
    text, encoding = await asyncio.to_thread(decode, payload, encoding)
    async with ctx.pool.acquire() as conn:
        fields = await ctx.fields.get(conn, fresh=True)
    resolved, total = await asyncio.to_thread(
        plan_import, text, mapping, fields, key=key, mode=mode
    )
    del text
    async with ctx.pool.acquire() as conn, conn.transaction():
        job = await conn.fetchrow(
            SQL_INSERT_JOB,
            str(uuid.uuid4()),
            mode,
            key,
            encoding,
            raw.get("filename") or None,
            request.get("role"),
            resolved,
            payload,
            total,
        )
        await _publish(ctx, conn, job)
    log.info("import_queued", job_id=job["id"], total=total, mode=mode, key=key)
    _start(ctx, job["id"])
    return json_response(job_json(job), status=202)


@routes.get("/v1/imports")
@contract(query=ImportQuery, response=ImportJobList, tags=("imports",))
async def list_imports(request: web.Request, query: ImportQuery) -> web.Response:
    """Recent import jobs, newest first: ?limit= (≤ 500), ?status=."""
    ctx: Context = request.app[CONTEXT]
    limit = min(max(query.limit, 1), 500)
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(SQL_JOBS, query.status, limit)
    return json_response({"items": [job_json(r) for r in rows]})


@routes.get("/v1/imports/{id}")
@contract(path=ImportPath, response=ImportJobWithErrors, tags=("imports",))
async def get_import(request: web.Request, path: ImportPath) -> web.Response:
    """One import job: status, counts, timestamps and its first 1000 row errors."""
    ctx: Context = request.app[CONTEXT]
    job_id = path.id
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(SQL_JOB, job_id)
        if row is None:
            raise NotFound(f"import job {job_id} does not exist")
        errors = await conn.fetch(SQL_ERRORS, job_id, MAX_ERRORS_SHOWN)
    return json_response({**job_json(row), "errors": [dict(e) for e in errors]})


# Jobs ----------------------------------------------------------------------------------------

_tasks: dict[str, asyncio.Task[None]] = {}
_slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None


def _slot() -> asyncio.Semaphore:
    global _slots
    loop = asyncio.get_running_loop()
    if _slots is None or _slots[0] is not loop:
        _slots = (loop, asyncio.Semaphore(MAX_PARALLEL_JOBS))
    return _slots[1]


def _start(ctx: Context, job_id: str) -> asyncio.Task[None]:
    """Run the job unless this process already runs it; the registry keeps the task alive."""
    task = _tasks.get(job_id)
    if task is None or task.done():
        task = asyncio.create_task(_run_job(ctx, job_id), name=f"import:{job_id}")
        _tasks[job_id] = task
        task.add_done_callback(lambda t: _tasks.pop(job_id) if _tasks.get(job_id) is t else None)
    return task


async def resume_jobs(ctx: Context) -> None:
    """Re-run every queued or running job from its checkpoint; returns when they end."""
    async with ctx.pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch(SQL_ACTIVE_JOBS)]
    if ids:
        log.info("imports_resuming", jobs=len(ids))
    await asyncio.gather(*(_start(ctx, job_id) for job_id in ids), return_exceptions=True)


async def stop_jobs() -> None:
    """Cancel running jobs at shutdown; each resumes from its last checkpoint at next start."""
    tasks = list(_tasks.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _publish(ctx: Context, conn: asyncpg.Connection, job: Mapping[str, Any]) -> None:
    """Queue the job's whole state on jobs.events in the caller's transaction."""
    errors = await conn.fetch(SQL_ERRORS, job["id"], 100) if job["failed"] else []
    ok = job["inserted"] + job["updated"] + job["skipped"]
    await outbox.add(
        conn,
        Topic.JOBS_EVENTS,
        job["id"],
        job_event(
            job["id"],
            kind="import",
            status=job["status"],
            service=ctx.settings.service,
            title=f"CSV import {job['filename'] or job['id']}",
            created_at=job["created_at"],
            requested_by=job["requested_by"],
            total=job["total"],
            processed=ok + job["failed"],
            succeeded=ok,
            failed=job["failed"],
            errors=[dict(e) for e in errors],
            detail=job["detail"],
        ),
    )


async def _run_job(ctx: Context, job_id: str) -> None:
    """Run the job to its end. A transient failure (the database away) pauses it: it is run
    again from its committed checkpoint once the database answers, for as long as that
    takes. Anything else fails the job, recorded (once the database answers)."""
    service = ctx.settings.service
    with bound_contextvars(job_id=job_id):
        async with _slot():
            try:
                await supervise(lambda: _Runner(ctx, job_id).run(), name="import", service=service)
            except asyncio.CancelledError:
                log.info("import_interrupted")
                raise
            except Exception as exc:  # the job's boundary: record the failure, keep the service
                # the one way of libs.common.jobrunner, which this loop does not use yet
                log.error("job_crashed", kind="import", error=repr(exc), exc_info=exc)
                reason = failure_reason(exc)

                async def record() -> None:
                    await _Runner(ctx, job_id).finish("failed", reason, checked=False)

                try:
                    await retry(record, name="import_fail", service=service)
                except Exception as again:  # a bug there too: the job stays for a restart
                    log.error("import_fail_record_failed", error=repr(again), exc_info=again)


class _Runner:
    """One pass over one job, from its committed checkpoint to the end."""

    def __init__(self, ctx: Context, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.checkpoint = 0
        self.columns: list[str | None] = []
        self.fields: Mapping[str, FieldDefinition] = {}
        self.mode = self.key = ""

    async def run(self) -> None:
        ctx = self.ctx
        async with ctx.pool.acquire() as conn:
            row = await conn.fetchrow(SQL_JOB_PAYLOAD, self.job_id)
            if row is None or row["status"] not in ACTIVE:
                return
            fields = await ctx.fields.get(conn, fresh=True)
        job = dict(row)
        del row
        text, _ = await asyncio.to_thread(decode, job.pop("payload"), job["encoding"])
        rows = records(text)
        header = next(rows)[2]
        self.columns = resolve_columns(header, job["mapping"], fields)
        self.fields, self.mode, self.key = fields, job["mode"], job["key_field"]
        self.checkpoint = job["next_line"]
        log.info("import_started", resume_from=self.checkpoint, total=job["total"])
        chunk: list[tuple[int, list[str]]] = []
        passed, after = 0, self.checkpoint
        for start, after, cells in rows:
            if start < self.checkpoint:
                passed += 1
                if passed % 10_000 == 0:
                    await asyncio.sleep(0)
                continue
            chunk.append((start, cells))
            if len(chunk) >= max(1, ctx.settings.import_chunk_rows):
                if not await self.commit(chunk, after):
                    return
                chunk = []
        if chunk and not await self.commit(chunk, after):
            return
        await self.finish("done", None)

    async def commit(self, chunk: list[tuple[int, list[str]]], next_line: int) -> bool:
        """Apply one chunk and advance the checkpoint in one transaction; False: not ours."""

        attempts = 0

        async def attempt() -> Counter[str] | None:
            nonlocal attempts
            attempts += 1
            again = attempts > 1
            try:
                return await self._transaction(chunk, next_line, careful=False, again=again)
            except _DB_REFUSALS:
                # A row the checks let through hit the database (a concurrent writer took
                # its email): redo the chunk with a savepoint per row so only that row fails.
                return await self._transaction(chunk, next_line, careful=True, again=again)

        result = await retry(
            attempt, name="import_chunk", service=self.ctx.settings.service, strategy=_CHUNK_RETRY
        )
        if result is None:
            log.warning("import_taken_over", checkpoint=self.checkpoint)
            return False
        for effect, n in result.items():
            IMPORT_ROWS.labels(_OUTCOMES[effect]).inc(n)
        self.checkpoint = next_line
        return True

    async def _transaction(
        self,
        chunk: list[tuple[int, list[str]]],
        next_line: int,
        *,
        careful: bool,
        again: bool = False,
    ) -> Counter[str] | None:
        """One chunk in one transaction; None when the job is no longer this runner's.
        ``again``: an earlier attempt failed, maybe after its commit went through (the
        connection lost before the answer): a checkpoint at this chunk's end is that commit,
        and the runner goes on from there (an empty tally)."""
        tally: Counter[str] = Counter()
        errors: list[tuple[int, str | None, str]] = []
        key, mode = self.key, self.mode
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(SQL_LOCK_JOB, self.job_id)
            if (
                again
                and current is not None
                and current["status"] in ACTIVE
                and current["next_line"] == next_line
            ):
                log.info("import_chunk_committed_before", next_line=next_line)
                return tally
            if (
                current is None
                or current["status"] not in ACTIVE
                or current["next_line"] != self.checkpoint
            ):
                return None
            for line, cells in chunk:
                try:
                    patch = row_patch(cells, self.columns, self.fields)
                    if careful:
                        async with conn.transaction():
                            effect, _ = await store.upsert(conn, patch, key=key, mode=mode)
                    else:
                        effect, _ = await store.upsert(conn, patch, key=key, mode=mode)
                except InvalidMessage as exc:
                    errors.append((line, exc.field, exc.reason))
                except _DB_REFUSALS as exc:
                    if not careful:
                        raise
                    field = _UNIQUE_FIELDS.get(getattr(exc, "constraint_name", None) or "")
                    errors.append((line, field, f"refused by the database: {exc}"))
                else:
                    tally[effect] += 1
            if errors:
                lines, names, messages = (list(c) for c in zip(*errors, strict=True))
                await conn.execute(SQL_INSERT_ERRORS, self.job_id, lines, names, messages)
            tally["failed"] = len(errors)
            await _publish(
                self.ctx,
                conn,
                await conn.fetchrow(
                    SQL_ADVANCE_JOB,
                    self.job_id,
                    next_line,
                    tally["inserted"],
                    tally["updated"],
                    tally["skipped"],
                    tally["failed"],
                ),
            )
        return tally

    async def finish(self, status: str, detail: str | None, *, checked: bool = True) -> None:
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(SQL_LOCK_JOB, self.job_id)
            if current is None or (checked and current["next_line"] != self.checkpoint):
                return
            job = await conn.fetchrow(SQL_FINISH_JOB, self.job_id, status, detail)
            if job is None:
                return
            await _publish(self.ctx, conn, job)
        log.info(
            "import_finished",
            status=status,
            inserted=job["inserted"],
            updated=job["updated"],
            skipped=job["skipped"],
            failed=job["failed"],
        )
