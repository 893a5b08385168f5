"""Export jobs (F-41): queued → running (rows done / estimated total) → done | failed.

A job is claimed in the database (so a redelivered request, or a second replica, never
runs it twice), its rows are streamed from the owning service into a ``.part`` file, and
the finished file is renamed into place before the job is marked done. Every change of
state is one transaction that also queues, through the outbox, the ``jobs.events`` record
and — at the end — ``export.completed`` and the requester's mail on ``mail.system``. A
process that dies mid-export leaves the job ``running`` with a stale heartbeat; the next
start (or another replica after ``EXPORT_STALE_SECONDS``) runs it again from the start.

Jobs run on :mod:`libs.common.jobrunner` (:class:`ExportSteps`). An outage pauses a job,
it does not fail it: when the database goes away (a progress record or the final commit
fails transiently) the run backs off and, once the database answers, takes its job up
again (``runner``: its own id in the row) and runs it from the start: an export is one
consistent read, so its checkpoint is its beginning. A row source that is away
(unreachable, 503, its stream broken off) is asked again the same way for
``EXPORT_SOURCE_PATIENCE_SECONDS``; then, or when the source refuses the request, or the
file cannot be written, the job fails with the reason. A bug fails the job with the error
(``job_crashed`` in the log).

Download links are signed (purpose ``download``) with the job id, the requester's role
and the expiry; the sweeper deletes files whose link expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.errors import TransientError
from libs.common.jobrunner import after_commit, run_job
from libs.common.logging import get_logger
from libs.common.metrics import (
    EXPORT_FAILURES,
    EXPORT_FILES_DELETED,
    EXPORT_JOB_SECONDS,
    EXPORT_ROWS,
)
from libs.common.retry import retry
from libs.common.topics import Topic
from services.exporter import processor
from services.exporter.context import Context
from services.exporter.csvfile import CannotWrite, ExportFile
from services.exporter.sources import SourceError, parse
from services.exporter.store import QUERIES

log = get_logger(__name__)


def file_path(ctx: Context, job_id: Any) -> Path:
    return ctx.settings.export_dir / f"{job_id}.csv"


def download_url(ctx: Context, job: asyncpg.Record) -> str:
    """The signed link of a finished job (valid until its ``expires_at``)."""
    token = ctx.signer.sign(
        {
            "job": str(job["id"]),
            "role": job["requested_by"],
            "until": int(job["expires_at"].timestamp()),
        }
    )
    base = ctx.settings.public_url.rstrip("/")
    return f"{base}/v1/exports/{job['id']}/download?token={token}"


async def create(conn: asyncpg.Connection, request: dict[str, Any]) -> asyncpg.Record:
    """Record a job from its request and queue the request and the 'queued' event, in the
    caller's transaction. None when the job exists already (a redelivered request)."""
    job = await conn.fetchrow(
        QUERIES["insert-job"],
        request["job_id"],
        {**request, "requested_at": request["requested_at"].isoformat()},
        request["requested_by"] or "viewer",
        request["notify_email"],
        request["requested_at"],
    )
    if job is not None:
        await outbox.add(
            conn, Topic.JOBS_EVENTS, str(job["id"]), processor.export_event(job, "queued")
        )
    return job


def launch(ctx: Context, job_id: Any) -> None:
    """Run a job in the background (a no-op if it is finished or running elsewhere)."""
    task = asyncio.ensure_future(run(ctx, str(job_id)))
    task.set_name(f"export:{job_id}")
    ctx.jobs.add(task)
    task.add_done_callback(ctx.jobs.discard)


async def resume(ctx: Context) -> None:
    """At start: run what a previous process left queued or running."""
    for row in await ctx.pool.fetch(QUERIES["unfinished-jobs"]):
        launch(ctx, row["id"])


async def stop(ctx: Context) -> None:
    """On shutdown: stop running exports; they stay 'running' and are taken over later."""
    for task in list(ctx.jobs):
        task.cancel()
    await asyncio.gather(*ctx.jobs, return_exceptions=True)
    await ctx.sources.close()


async def run(ctx: Context, job_id: str) -> None:
    """Run a job to its end on :mod:`libs.common.jobrunner`, through outages (module
    docstring); a bug fails the job."""
    async with ctx.slots:
        await run_job(ctx.pool, ExportSteps(ctx, job_id))


@dataclass(frozen=True)
class _Done:
    out: ExportFile
    size: int


@dataclass(frozen=True)
class _Failed:
    reason: str
    cause: str  # the export_failures label: source, file


class ExportSteps:
    """An export for :func:`libs.common.jobrunner.run_job`. Its checkpoint is its start (one
    consistent read), so it has one step: :meth:`prepare` streams the whole file (its
    progress records commit on their own, as the file grows) and :meth:`step` commits the
    end — done, or failed when the source refused or the file could not be written — in
    the runner's transaction. A source that is away is a transient failure (the run
    pauses and starts again) for ``EXPORT_SOURCE_PATIENCE_SECONDS``, then the job fails."""

    kind = "export"
    service = "exporter"

    def __init__(self, ctx: Context, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.runner = uuid.uuid4()
        self.heartbeat_seconds: float | None = ctx.settings.stale_seconds / 4
        self.started = time.monotonic()
        self.source_away_since: float | None = None
        self.outcome: _Done | _Failed | None = None

    async def claim(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        """The job, claimed for this run (None: finished, or running elsewhere)."""
        ctx = self.ctx
        job = await conn.fetchrow(
            QUERIES["claim-job"], self.job_id, ctx.settings.stale_seconds, ctx.clock(), self.runner
        )
        if job is not None:
            event = processor.export_event(job, "running")
            await outbox.add(conn, Topic.JOBS_EVENTS, self.job_id, event)
            log.info("export_started", source=job["request"]["source"])
            self.started = time.monotonic()
        return job

    async def prepare(self, job: asyncpg.Record) -> None:
        """Stream the file (no transaction open meanwhile); :meth:`step` commits the end."""
        self.outcome = None
        try:
            out, size = await _export(self.ctx, job)
        except SourceError as exc:
            now = time.monotonic()
            self.source_away_since = self.source_away_since or now
            waited = now - self.source_away_since
            if exc.transient and waited < self.ctx.settings.source_patience_seconds:
                raise TransientError(f"export source away: {exc}") from exc
            self.outcome = _Failed(str(exc), "source")
        except CannotWrite as exc:
            self.outcome = _Failed(f"cannot write the file: {exc}", "file")
        else:
            self.outcome = _Done(out, size)

    async def step(self, conn: asyncpg.Connection, job: asyncpg.Record) -> None:
        """The end of the export, in the runner's transaction; the job is over."""
        outcome = self.outcome
        if isinstance(outcome, _Done):
            await _finish(self.ctx, conn, job, outcome.out, outcome.size, self.started)
        elif isinstance(outcome, _Failed):
            await _fail(self.ctx, conn, job, outcome.reason, outcome.cause, self.started)
        return None

    async def heartbeat(self, conn: asyncpg.Connection, job: asyncpg.Record) -> None:
        await conn.execute(QUERIES["heartbeat"], self.job_id, self.runner)

    async def fail(self, conn: asyncpg.Connection, job_id: str, reason: str) -> None:
        """A bug ended the export: failed with the error (module docstring)."""
        job = await conn.fetchrow(QUERIES["job"], job_id)
        if job is not None:
            await _fail(self.ctx, conn, job, reason, "bug", self.started)


async def _export(ctx: Context, job: asyncpg.Record) -> tuple[ExportFile, int]:
    """Stream the job's rows into its file; the file and its size once it is in place."""
    request = job["request"]
    path = file_path(ctx, job["id"])
    with ExportFile(path, request["encoding"], safe=request.get("safe_csv", True)) as out:
        if request["header"]:
            out.header(processor.labels(request["columns"]))
        async with ctx.sources.open(request) as rows:
            await _progress(ctx, job, 0, rows.estimated_total)
            shape = rows.shape
            beat = time.monotonic()
            async for text in rows.chunks:
                if shape is None:
                    written = out.write_records(text)
                else:
                    written = out.write_rows(map(shape, parse(text)))
                EXPORT_ROWS.inc(written)
                if time.monotonic() - beat >= ctx.settings.progress_seconds:
                    beat = time.monotonic()
                    await _progress(ctx, job, out.rows, None)
        size = out.commit()
    return out, size


async def _progress(ctx: Context, job: asyncpg.Record, rows: int, total: int | None) -> None:
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES["progress"], job["id"], rows, total)
        if row is not None:
            event = processor.export_event(row, "running")
            await outbox.add(conn, Topic.JOBS_EVENTS, str(job["id"]), event)


async def _finish(
    ctx: Context,
    conn: asyncpg.Connection,
    job: asyncpg.Record,
    out: ExportFile,
    size: int,
    started: float,
) -> None:
    now = ctx.clock()
    expires = now + dt.timedelta(seconds=ctx.settings.link_ttl_seconds)
    name = f"export-{now.astimezone(ctx.time_zone):%Y%m%d-%H%M}-{str(job['id'])[:8]}.csv"
    done = await conn.fetchrow(
        QUERIES["finish-done"], job["id"], out.rows, out.replaced, name, size, now, expires
    )
    if done is None:  # taken over meanwhile: the other run reports
        return
    await _announce(ctx, conn, done, download_url(ctx, done), now)
    seconds = time.monotonic() - started

    def counted() -> None:  # once the runner's transaction committed: a retried end counts once
        EXPORT_JOB_SECONDS.labels("done").observe(seconds)
        log.info("export_done", rows=out.rows, size_bytes=size, replaced=out.replaced)

    after_commit(counted)


async def _fail(
    ctx: Context,
    conn: asyncpg.Connection,
    job: asyncpg.Record,
    reason: str,
    cause: str,
    started: float,
) -> None:
    """The job failed, in the runner's transaction (counted once it committed)."""
    now = ctx.clock()
    failed = await conn.fetchrow(QUERIES["finish-failed"], job["id"], 0, reason, now)
    if failed is None:
        return
    await _announce(ctx, conn, failed, None, now)
    seconds = time.monotonic() - started

    def counted() -> None:  # once the runner's transaction committed: a retried end counts once
        EXPORT_FAILURES.labels(cause).inc()
        EXPORT_JOB_SECONDS.labels("failed").observe(seconds)
        log.warning("export_failed", reason=reason)

    after_commit(counted)


async def _announce(
    ctx: Context, conn: asyncpg.Connection, job: asyncpg.Record, url: str | None, now: Any
) -> None:
    """The end of a job, on jobs.events, export.completed and mail.system (one commit)."""
    key = str(job["id"])
    await outbox.add_many(
        conn,
        [
            (Topic.JOBS_EVENTS, key, processor.export_event(job, job["status"])),
            (Topic.EXPORT_COMPLETED, key, processor.completed_record(job, url, now)),
            (Topic.MAIL_SYSTEM, key, processor.completion_mail(job, url, ctx.time_zone, now)),
        ],
    )


async def sweep(ctx: Context) -> int:
    """Delete the files whose link has expired; returns how many."""
    rows = await ctx.pool.fetch(QUERIES["expired-files"], ctx.clock())
    for row in rows:
        file_path(ctx, row["id"]).unlink(missing_ok=True)
    if rows:
        EXPORT_FILES_DELETED.inc(len(rows))
        log.info("export_files_deleted", count=len(rows))
    return len(rows)


async def sweeper(ctx: Context) -> None:
    """Background loop: sweep every EXPORT_SWEEP_SECONDS."""
    while True:
        await retry(lambda: sweep(ctx), name="export_sweep", service="exporter")
        await asyncio.sleep(ctx.settings.sweep_seconds)
