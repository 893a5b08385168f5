"""F-12 sync jobs: turning a switch on applies it to the data that already exists.

The job walks the contacts holding a membership in the trigger state (配信停止 for the
unsubscribe switch, 配信禁止 for the ban switch) in id order, one chunk per transaction:
their weaker memberships move to that state with method ``auto_sync``, the changes go
out on ``suppression.changes``, and the checkpoint, counts and a ``jobs.events`` progress
record commit with them — so a restarted service resumes exactly where it stopped. At
the end a completion mail goes to the operator address through ``mail.system``. The job
runs on :mod:`libs.common.jobrunner`: an outage pauses it, a bug fails it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.jobrunner import run_job
from libs.common.jobs import job_event
from libs.common.logging import get_logger
from libs.common.mail.states import MembershipState
from libs.common.topics import Topic
from services.suppression import store
from services.suppression.context import Context
from services.suppression.store import QUERIES

log = get_logger(__name__)

TRIGGER_STATE = {
    "unsubscribe": MembershipState.UNSUBSCRIBED.value,
    "ban": MembershipState.BANNED.value,
}
ACTIVE = ("queued", "running")
TITLES = {"unsubscribe": "配信停止の同期 (unsubscribe sync)", "ban": "配信禁止の同期 (ban sync)"}


def _event(job: asyncpg.Record, status: str, detail: str | None = None) -> dict[str, Any]:
    return job_event(
        job["id"],
        kind="sync",
        status=status,
        service="suppression",
        title=TITLES[job["kind"]],
        created_at=job["created_at"],
        requested_by=job["requested_by"],
        processed=job["contacts"],
        succeeded=job["changed"],
        detail=detail,
    )


async def create(conn: asyncpg.Connection, kind: str, requested_by: str | None) -> asyncpg.Record:
    """Queue a job in the caller's transaction (launch it after the commit)."""
    job = await conn.fetchrow(QUERIES["insert-sync-job"], str(uuid.uuid4()), kind, requested_by)
    await outbox.add(conn, Topic.JOBS_EVENTS, job["id"], _event(job, "queued"))
    return job


def launch(ctx: Context, job_id: str) -> asyncio.Task[None]:
    task = asyncio.ensure_future(run(ctx, job_id))
    task.set_name(f"sync-job:{job_id}")
    ctx.jobs.add(task)
    task.add_done_callback(ctx.jobs.discard)
    return task


async def resume(ctx: Context) -> None:
    """Continue every job a previous process left unfinished."""
    for row in await ctx.pool.fetch(QUERIES["unfinished-sync-jobs"]):
        launch(ctx, row["id"])


async def stop(ctx: Context) -> None:
    for task in list(ctx.jobs):
        task.cancel()
    await asyncio.gather(*ctx.jobs, return_exceptions=True)


async def run(ctx: Context, job_id: str) -> None:
    """Run the job on the shared job runner (:mod:`libs.common.jobrunner`)."""
    await run_job(ctx.pool, SyncSteps(ctx, job_id))


class SyncSteps:
    """A sync job for :func:`libs.common.jobrunner.run_job`: one chunk of contacts a step,
    the checkpoint ``after_contact``. No heartbeat: each step locks the job's row, so two
    runners of one job (a redelivered launch) take turns and neither repeats a chunk."""

    kind = "sync_job"  # the transient_retries label it always had
    service = "suppression"
    heartbeat_seconds: float | None = None

    def __init__(self, ctx: Context, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id

    async def claim(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        job = await conn.fetchrow(QUERIES["sync-job"], self.job_id)
        return job if job is not None and job["status"] in ACTIVE else None

    async def prepare(self, job: asyncpg.Record) -> None:
        """Nothing: a step is all in its transaction."""

    async def step(self, conn: asyncpg.Connection, job: asyncpg.Record) -> asyncpg.Record | None:
        """One chunk; None when the job is finished."""
        job = await conn.fetchrow(QUERIES["sync-job-for-update"], self.job_id)
        if job is None or job["status"] not in ACTIVE:
            return None
        state = TRIGGER_STATE[job["kind"]]
        contacts = [
            r["contact_id"]
            for r in await conn.fetch(
                QUERIES["sync-candidates"],
                state,
                job["after_contact"],
                self.ctx.settings.sync_chunk_contacts,
            )
        ]
        if not contacts:
            done = await conn.fetchrow(
                QUERIES["update-sync-job"], self.job_id, "done", job["after_contact"], 0, 0, None
            )
            await outbox.add(conn, Topic.JOBS_EVENTS, self.job_id, _event(done, "done"))
            await outbox.add(conn, Topic.MAIL_SYSTEM, self.job_id, completion_mail(self.ctx, done))
            log.info("sync_job_done", contacts=done["contacts"], changed=done["changed"])
            return None
        changed = await conn.fetch(QUERIES["sync-apply"], contacts, state, job["requested_by"])
        await store.publish(conn, [store.membership_change(r) for r in changed])
        progress = await conn.fetchrow(
            QUERIES["update-sync-job"],
            self.job_id,
            "running",
            contacts[-1],
            len(contacts),
            len(changed),
            None,
        )
        await outbox.add(conn, Topic.JOBS_EVENTS, self.job_id, _event(progress, "running"))
        return progress

    async def heartbeat(self, conn: asyncpg.Connection, job: asyncpg.Record) -> None:
        """Never called (``heartbeat_seconds`` is None)."""

    async def fail(self, conn: asyncpg.Connection, job_id: str, reason: str) -> None:
        failed = await conn.fetchrow(QUERIES["fail-sync-job"], job_id, reason)
        if failed is not None:
            await outbox.add(conn, Topic.JOBS_EVENTS, job_id, _event(failed, "failed", reason))


def completion_mail(ctx: Context, job: asyncpg.Record) -> dict[str, Any]:
    """The operator's notice that a sync job finished (F-12), in Japanese and English."""
    title = TITLES[job["kind"]]
    text = (
        f"配信状態の同期ジョブが完了しました。\n"
        f"The delivery-state sync job has finished.\n\n"
        f"ジョブ / job: {job['id']}\n"
        f"種類 / kind: {title}\n"
        f"対象の顧客 / contacts examined: {job['contacts']}\n"
        f"変更した配信状態 / memberships changed: {job['changed']}\n"
        f"完了 / finished: {job['updated_at'].astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC\n"
    )
    return {
        "mail_id": f"sync-done-{job['id']}",
        "job_id": job["id"],
        "kind": "sync_done",
        "to": [ctx.settings.operator_email],
        "subject": f"[Tayori] 同期が完了しました / sync finished: {title}",
        "text_body": text,
        "html_body": None,
        "created_at": dt.datetime.now(dt.UTC),
    }
