"""F-04 bulk import: a CSV upload becomes a job that upserts contacts chunk by chunk.

``POST /v1/imports`` validates everything it can before accepting (options, and with
:mod:`services.contacts.importfile` the encoding, header mapping and CSV syntax), stores
the file in ``import_job.payload`` and answers 202; the job then runs in the background on
:mod:`libs.common.jobrunner` (:class:`ImportSteps`). Each chunk of ``import_chunk_rows``
records is one transaction: its upserts, its row errors, the job's counts, the
``next_line`` checkpoint and a ``jobs.events`` record (through the outbox) commit
together, so a restarted service resumes exactly where the last commit left off
(:func:`resume_jobs`) and a second runner of the same job (another replica) notices the
moved checkpoint and steps aside. An outage pauses a job: the run backs off and, once the
database answers, goes on from the committed checkpoint (a commit whose answer was lost is
found there too); a bug fails the job with the error (``job_crashed`` in the log).

Row semantics: an empty cell leaves the field unchanged (an import never clears a value);
a rejected row becomes ``{line, field, message}`` and never costs the valid rows around
it; rows apply in file order inside one transaction, so the same key twice in one file
means the later row updates the contact the earlier one created. A chunk's rows go through
the contacts ingest's batch upsert (:func:`apply_rows`): one INSERT and one UPDATE per run
of rows whose addresses and keys do not repeat, with the result of applying them one by one.
``line`` is the physical line in the file where the record starts (the header is line 1; a
quoted cell holding newlines spans several lines). ``next_line`` is that kind of line
number: records starting before it are committed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

import asyncpg
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ValidationError

from libs.common import outbox
from libs.common.errors import InvalidMessage, NotFound
from libs.common.http import ROLE, error, json_response
from libs.common.http.contract import InvalidRequest, contract, issues_of
from libs.common.jobrunner import after_commit, run_job
from libs.common.jobs import job_event
from libs.common.logging import get_logger
from libs.common.metrics import IMPORT_ROWS
from libs.common.topics import Topic
from services.contacts import store
from services.contacts.context import CONTEXT, Context
from services.contacts.importfile import (
    Records,
    decode,
    plan_import,
    records,
    resolve_columns,
    row_patch,
)
from services.contacts.models import FieldDefinition
from services.contacts.processor import ContactPatch
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
from services.contacts.store import QUERIES

log = get_logger(__name__)
routes = web.RouteTableDef()

KEYS = ("email", "external_id")
_OPTIONS = ("mode", "key", "encoding", "mapping", "filename")
ACTIVE = ("queued", "running")
MAX_ERRORS_SHOWN = 1000
_OUTCOMES = {"inserted": "imported", "updated": "updated", "skipped": "skipped", "failed": "error"}
_DB_REFUSALS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)
_UNIQUE_FIELDS = {
    "contact_email_key": "email",
    "contact_email_identity_key": "email",
    "contact_external_id_key": "external_id",
}
#: a row's error: its line, the field at fault (None: the row) and the message.
RowError = tuple[int, str | None, str]

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
            QUERIES["import-insert-job"],
            str(uuid.uuid4()),
            mode,
            key,
            encoding,
            raw.get("filename") or None,
            request[ROLE],  # who asked: the token's role
            resolved,
            payload,
            total,
        )
        await _publish(ctx, conn, job)
    log.info("import_queued", job_id=job["id"], total=total, mode=mode, key=key)
    launch(ctx, job["id"])
    return json_response(job_json(job), status=202)


@routes.get("/v1/imports")
@contract(query=ImportQuery, response=ImportJobList, tags=("imports",))
async def list_imports(request: web.Request, query: ImportQuery) -> web.Response:
    """Recent import jobs, newest first: ?limit= (≤ 500), ?status=."""
    ctx: Context = request.app[CONTEXT]
    limit = min(max(query.limit, 1), 500)
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["import-jobs"], query.status, limit)
    return json_response({"items": [job_json(r) for r in rows]})


@routes.get("/v1/imports/{id}")
@contract(path=ImportPath, response=ImportJobWithErrors, tags=("imports",))
async def get_import(request: web.Request, path: ImportPath) -> web.Response:
    """One import job: status, counts, timestamps and its first 1000 row errors."""
    ctx: Context = request.app[CONTEXT]
    job_id = path.id
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(QUERIES["import-job"], job_id)
        if row is None:
            raise NotFound(f"import job {job_id} does not exist")
        errors = await conn.fetch(QUERIES["import-errors"], job_id, MAX_ERRORS_SHOWN)
    return json_response({**job_json(row), "errors": [dict(e) for e in errors]})


# Jobs ----------------------------------------------------------------------------------------


def launch(ctx: Context, job_id: str) -> asyncio.Task[None]:
    """Run the job in the background unless this process runs it already."""
    running = ctx.import_jobs
    task = running.get(job_id)
    if task is None or task.done():
        task = asyncio.create_task(run(ctx, job_id), name=f"import:{job_id}")
        running[job_id] = task
        task.add_done_callback(lambda t: running.pop(job_id) if running.get(job_id) is t else None)
    return task


async def resume_jobs(ctx: Context) -> None:
    """At start: run every queued or running job from its checkpoint; returns when they end."""
    ids = [r["id"] for r in await ctx.pool.fetch(QUERIES["import-unfinished-jobs"])]
    if ids:
        log.info("imports_resuming", jobs=len(ids))
    await asyncio.gather(*(launch(ctx, job_id) for job_id in ids), return_exceptions=True)


async def stop_jobs(ctx: Context) -> None:
    """At shutdown: cancel running jobs; each resumes from its checkpoint at the next start."""
    tasks = list(ctx.import_jobs.values())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run(ctx: Context, job_id: str) -> None:
    """Run a job to its end on :mod:`libs.common.jobrunner` (module docstring), once a slot
    is free (``import_slots``: the others wait, queued)."""
    async with ctx.import_slots:
        await run_job(ctx.pool, ImportSteps(ctx, job_id))


async def _publish(ctx: Context, conn: asyncpg.Connection, job: Mapping[str, Any]) -> None:
    """Queue the job's whole state on jobs.events in the caller's transaction."""
    errors = await conn.fetch(QUERIES["import-errors"], job["id"], 100) if job["failed"] else []
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


@dataclass
class ImportRun:
    """One pass over a job: its file from the committed checkpoint on, a chunk at a time."""

    #: the job's row (its payload until the file is decoded).
    job: dict[str, Any]
    fields: Mapping[str, FieldDefinition]
    #: records starting before this line are committed.
    checkpoint: int
    #: the records from the checkpoint on, once :meth:`ImportSteps.prepare` decoded the file.
    rows: Records | None = None
    columns: list[str | None] = field(default_factory=list)
    #: the chunk :meth:`ImportSteps.step` applies: its valid rows, its rejected rows and
    #: the line after it (the next checkpoint). No rows: the file is done.
    patches: list[tuple[int, ContactPatch]] = field(default_factory=list)
    rejected: list[RowError] = field(default_factory=list)
    chunk_end: int = 0


class ImportSteps:
    """An import for :func:`libs.common.jobrunner.run_job`: one chunk a step, the checkpoint
    ``next_line``. :meth:`prepare` decodes the file (once a pass) and validates the next
    chunk's rows with no transaction open; :meth:`step` applies them and moves the
    checkpoint in the runner's transaction, after checking under the job's row lock that the
    checkpoint is where this pass left it (else another runner has the job: step aside).
    No heartbeat: that check is what keeps two runners of one job from repeating a chunk."""

    kind = "import"
    heartbeat_seconds: float | None = None

    def __init__(self, ctx: Context, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.service = ctx.settings.service

    async def claim(self, conn: asyncpg.Connection) -> ImportRun | None:
        """The job from its committed checkpoint (None: finished or gone)."""
        job = await conn.fetchrow(QUERIES["import-job-to-run"], self.job_id)
        if job is None:
            return None
        fields = await self.ctx.fields.get(conn, fresh=True)
        log.info("import_started", resume_from=job["next_line"], total=job["total"])
        return ImportRun(dict(job), fields, job["next_line"])

    async def prepare(self, run: ImportRun) -> None:
        """The next chunk, validated (the file decoded at a pass's first step)."""
        if run.rows is None:
            job = run.job
            header, records_left = await asyncio.to_thread(
                _records_from, job.pop("payload"), job["encoding"], run.checkpoint
            )
            run.columns = resolve_columns(header, job["mapping"], run.fields)
            run.rows = records_left
        rows = run.rows
        run.patches, run.rejected, run.chunk_end = [], [], run.checkpoint
        for line, after, cells in islice(rows, max(1, self.ctx.settings.import_chunk_rows)):
            try:
                run.patches.append((line, row_patch(cells, run.columns, run.fields)))
            except InvalidMessage as exc:
                run.rejected.append((line, exc.field, exc.reason))
            run.chunk_end = after

    async def step(self, conn: asyncpg.Connection, run: ImportRun) -> ImportRun | None:
        """Apply the chunk and move the checkpoint, or finish the job at the file's end;
        None when the job is over or no longer this pass's."""
        current = await conn.fetchrow(QUERIES["import-lock-job"], self.job_id)
        if current is None or current["status"] not in ACTIVE:
            return None
        if current["next_line"] != run.checkpoint:
            log.warning("import_taken_over", checkpoint=run.checkpoint)
            return None
        if run.chunk_end == run.checkpoint:  # no record left
            await self._finish(conn, "done", None)
            return None
        key, mode = run.job["key_field"], run.job["mode"]
        tally, refused = await apply_rows(conn, run.patches, key=key, mode=mode)
        errors = run.rejected + refused
        if errors:
            lines, names, messages = (list(c) for c in zip(*errors, strict=True))
            await conn.execute(QUERIES["import-insert-errors"], self.job_id, lines, names, messages)
        tally["failed"] = len(errors)
        job = await conn.fetchrow(
            QUERIES["import-advance-job"],
            self.job_id,
            run.chunk_end,
            tally["inserted"],
            tally["updated"],
            tally["skipped"],
            tally["failed"],
        )
        await _publish(self.ctx, conn, job)
        after_commit(lambda: _count(tally))  # a chunk whose commit failed is redone, counted then
        run.checkpoint = run.chunk_end
        return run

    async def heartbeat(self, conn: asyncpg.Connection, run: ImportRun) -> None:
        """Never called (``heartbeat_seconds`` is None)."""

    async def fail(self, conn: asyncpg.Connection, job_id: str, reason: str) -> None:
        """A bug ended the job: failed, with the error as its detail."""
        await self._finish(conn, "failed", reason)

    async def _finish(self, conn: asyncpg.Connection, status: str, detail: str | None) -> None:
        job = await conn.fetchrow(QUERIES["import-finish-job"], self.job_id, status, detail)
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


def _count(tally: Counter[str]) -> None:
    """A committed chunk's rows in IMPORT_ROWS, by outcome."""
    for effect, n in tally.items():
        IMPORT_ROWS.labels(_OUTCOMES[effect]).inc(n)


def _records_from(payload: bytes, encoding: str, checkpoint: int) -> tuple[list[str], Records]:
    """The header and the records starting at or after ``checkpoint`` (CPU: in a thread)."""
    text, _ = decode(payload, encoding)
    rows = records(text)
    header = next(rows)[2]
    for record in rows:
        if record[0] >= checkpoint:
            return header, chain([record], rows)
    return header, iter(())


# Chunk rows through the ingest's batch upsert ------------------------------------------------


async def apply_rows(
    conn: asyncpg.Connection, rows: list[tuple[int, ContactPatch]], *, key: str, mode: str
) -> tuple[Counter[str], list[RowError]]:
    """Upsert a chunk's valid rows as if one by one in file order, with the ingest's batch
    upsert (:func:`store.upsert_run` over :func:`store.batch_runs`), in the caller's
    transaction: the effects by kind, and the rows refused with {line, field, message}.

    A run of rows with distinct identities is decided against the contacts as they were
    before it. A row the run accepts would be accepted the same one by one (the rows before
    it set only their own addresses and keys), and so would a refusal with only refusals
    before it; a refusal after an accepted row may be that row's doing (it freed an address
    the refused row takes), so the run is cut there and the rest starts a new run, decided
    after the accepted rows are written. A refusal by the database itself (a concurrent
    writer took an address) undoes the run alone (a savepoint), which is then redone a row
    at a time, each under its own savepoint."""
    tally: Counter[str] = Counter()
    refused: list[RowError] = []
    pending = rows
    while pending:
        run = pending[: len(store.batch_runs([p for _, p in pending])[0])]
        try:
            async with conn.transaction():
                settled = await _apply_run(conn, run, key, mode, tally, refused)
        except _DB_REFUSALS:
            await _apply_one_by_one(conn, run, key, mode, tally, refused)
            settled = len(run)
        pending = pending[settled:]
    return tally, refused


async def _apply_run(
    conn: asyncpg.Connection,
    run: list[tuple[int, ContactPatch]],
    key: str,
    mode: str,
    tally: Counter[str],
    refused: list[RowError],
) -> int:
    """Write the rows of ``run`` whose outcome is the one-by-one outcome; how many are
    settled (a prefix of the run: the rest is decided again)."""
    outcomes = await store.upsert_run(conn, [p for _, p in run], keys=key, mode=mode)
    settled, accepted = len(outcomes), []
    for i, outcome in enumerate(outcomes):
        if not isinstance(outcome, InvalidMessage):
            accepted.append(i)
        elif accepted:  # maybe an accepted row's doing: decided again after it is written
            settled = i
            break
    if len(accepted) < len(outcomes):  # upsert_run wrote nothing: write the accepted alone
        patches = [run[i][1] for i in accepted]
        again = await store.upsert_run(conn, patches, keys=key, mode=mode) if patches else []
        for i, outcome in zip(accepted, again, strict=True):
            if isinstance(outcome, InvalidMessage):  # decided against the same locked rows
                raise RuntimeError(f"line {run[i][0]} accepted, then refused: {outcome.reason}")
            outcomes[i] = outcome
        for i in range(settled):
            exc = outcomes[i]
            if isinstance(exc, InvalidMessage):
                refused.append((run[i][0], exc.field, exc.reason))
    for i in accepted:
        effect, _ = outcomes[i]  # type: ignore[misc]
        tally[effect] += 1
    return settled


async def _apply_one_by_one(
    conn: asyncpg.Connection,
    run: list[tuple[int, ContactPatch]],
    key: str,
    mode: str,
    tally: Counter[str],
    refused: list[RowError],
) -> None:
    """The rows of a run the database refused, each under its own savepoint, so only the
    row it refuses fails."""
    for line, patch in run:
        try:
            async with conn.transaction():
                effect, _ = await store.upsert(conn, patch, key=key, mode=mode)
        except InvalidMessage as exc:
            refused.append((line, exc.field, exc.reason))
        except _DB_REFUSALS as exc:
            field = _UNIQUE_FIELDS.get(getattr(exc, "constraint_name", None) or "")
            refused.append((line, field, f"refused by the database: {exc}"))
        else:
            tally[effect] += 1
