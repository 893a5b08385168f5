"""Export jobs (F-41): queued → running (rows done / estimated total) → done | failed.

A job is claimed in the database (so a redelivered request, or a second replica, never
runs it twice), its rows are streamed from the owning service into a ``.part`` file, and
the finished file is renamed into place before the job is marked done. Every change of
state is one transaction that also queues, through the outbox, the ``jobs.events`` record
and — at the end — ``export.completed`` and the requester's mail on ``mail.system``. A
process that dies mid-export leaves the job ``running`` with a stale heartbeat; the next
start (or another replica after ``EXPORT_STALE_SECONDS``) runs it again from the start.

An outage pauses a job, it does not fail it. When the database goes away (a heartbeat, a
progress record or the final commit fails transiently) the run backs off and, once the
database answers, takes its job up again (``runner``: its own id in the row) and runs it
from the start: an export is one consistent read, so its checkpoint is its beginning.
A row source that is away (unreachable, 503, its stream broken off) is asked again the
same way for ``EXPORT_SOURCE_PATIENCE_SECONDS``; then, or when the source refuses the
request, or the file cannot be written, the job fails with the reason.

Download links are signed (purpose ``download``) with the job id, the requester's role
and the expiry; the sweeper deletes files whose link expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common import outbox
from libs.common.errors import is_transient
from libs.common.logging import get_logger
from libs.common.metrics import (
    EXPORT_FAILURES,
    EXPORT_FILES_DELETED,
    EXPORT_JOB_SECONDS,
    EXPORT_ROWS,
    TRANSIENT_RETRIES,
)
from libs.common.retry import RECONNECT, retry
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
    task.add_done_callback(_report_bug)


def _report_bug(task: asyncio.Task[None]) -> None:
    """A job that ended with an unexpected error stays 'running' and is taken over when
    its heartbeat is stale; the error is a bug, so it is logged loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.error("export_crashed", task=task.get_name(), exc_info=task.exception())


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
    """Run a job to its end, through outages (module docstring); a bug propagates."""
    runner = uuid.uuid4()
    delays = RECONNECT.delays()
    source_away_since: float | None = None
    async with ctx.slots:
        with bound_contextvars(job_id=job_id):
            while True:
                job = await _claim(ctx, job_id, runner)
                if job is None:
                    return
                started = time.monotonic()
                try:
                    await _export(ctx, job)
                    return
                except SourceError as exc:
                    now = time.monotonic()
                    source_away_since = source_away_since or now
                    waited = now - source_away_since
                    if not exc.transient or waited >= ctx.settings.source_patience_seconds:
                        await _fail(ctx, job, str(exc), "source", started)
                        return
                    reason = str(exc)
                except CannotWrite as exc:
                    await _fail(ctx, job, f"cannot write the file: {exc}", "file", started)
                    return
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    reason = repr(exc)
                delay = next(delays)
                TRANSIENT_RETRIES.labels("exporter", "export").inc()
                log.warning("export_paused", reason=reason[:500], delay=round(delay, 2))
                await asyncio.sleep(delay)


async def _claim(ctx: Context, job_id: str, runner: uuid.UUID) -> asyncpg.Record | None:
    """The job, claimed for ``runner`` (None: finished, or running elsewhere)."""

    async def claim() -> asyncpg.Record | None:
        async with ctx.pool.acquire() as conn, conn.transaction():
            job = await conn.fetchrow(
                QUERIES["claim-job"], job_id, ctx.settings.stale_seconds, ctx.clock(), runner
            )
            if job is not None:
                await outbox.add(
                    conn, Topic.JOBS_EVENTS, job_id, processor.export_event(job, "running")
                )
            return job

    job = await retry(claim, name="export_claim", service="exporter")
    if job is not None:
        log.info("export_started", source=job["request"]["source"])
    return job


async def _export(ctx: Context, job: asyncpg.Record) -> None:
    request = job["request"]
    started = time.monotonic()
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
    await _finish(ctx, job, out, size, started)


async def _progress(ctx: Context, job: asyncpg.Record, rows: int, total: int | None) -> None:
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(QUERIES["progress"], job["id"], rows, total)
        if row is not None:
            event = processor.export_event(row, "running")
            await outbox.add(conn, Topic.JOBS_EVENTS, str(job["id"]), event)


async def _finish(
    ctx: Context, job: asyncpg.Record, out: ExportFile, size: int, started: float
) -> None:
    now = ctx.clock()
    expires = now + dt.timedelta(seconds=ctx.settings.link_ttl_seconds)
    name = f"export-{now.astimezone(ctx.time_zone):%Y%m%d-%H%M}-{str(job['id'])[:8]}.csv"
    async with ctx.pool.acquire() as conn, conn.transaction():
        done = await conn.fetchrow(
            QUERIES["finish-done"], job["id"], out.rows, out.replaced, name, size, now, expires
        )
        if done is None:  # taken over meanwhile: the other run reports
            return
        await _announce(ctx, conn, done, download_url(ctx, done), now)
    EXPORT_JOB_SECONDS.labels("done").observe(time.monotonic() - started)
    log.info("export_done", rows=out.rows, size_bytes=size, replaced=out.replaced)


async def _fail(ctx: Context, job: asyncpg.Record, reason: str, kind: str, started: float) -> None:
    """The job failed (recorded once the database answers)."""
    now = ctx.clock()

    async def record() -> asyncpg.Record | None:
        async with ctx.pool.acquire() as conn, conn.transaction():
            failed = await conn.fetchrow(QUERIES["finish-failed"], job["id"], 0, reason, now)
            if failed is not None:
                await _announce(ctx, conn, failed, None, now)
            return failed

    if await retry(record, name="export_fail", service="exporter") is None:
        return
    EXPORT_FAILURES.labels(kind).inc()
    EXPORT_JOB_SECONDS.labels("failed").observe(time.monotonic() - started)
    log.warning("export_failed", reason=reason)


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
