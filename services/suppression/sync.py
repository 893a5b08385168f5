"""F-12 sync jobs: turning a switch on applies it to the data that already exists.

The job walks the contacts holding a membership in the trigger state (配信停止 for the
unsubscribe switch, 配信禁止 for the ban switch) in id order, one chunk per transaction:
their weaker memberships move to that state with method ``auto_sync``, the changes go
out on ``suppression.changes``, and the checkpoint, counts and a ``jobs.events`` progress
record commit with them — so a restarted service resumes exactly where it stopped. At
the end a completion mail goes to the operator address through ``mail.system``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common import outbox
from libs.common.jobs import job_event
from libs.common.logging import get_logger
from libs.common.mail.states import MembershipState
from libs.common.retry import retry
from libs.common.topics import Topic
from services.suppression import store
from services.suppression.context import Context
from services.suppression.store import QUERIES

log = get_logger(__name__)

TRIGGER_STATE = {
    "unsubscribe": MembershipState.UNSUBSCRIBED.value,
    "ban": MembershipState.BANNED.value,
}
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
    with bound_contextvars(job_id=job_id):
        while not await retry(lambda: _step(ctx, job_id), name="sync_job", service="suppression"):
            pass


async def _step(ctx: Context, job_id: str) -> bool:
    """One chunk; True when the job is finished."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        job = await conn.fetchrow(QUERIES["sync-job-for-update"], job_id)
        if job is None or job["status"] in ("done", "failed"):
            return True
        state = TRIGGER_STATE[job["kind"]]
        contacts = [
            r["contact_id"]
            for r in await conn.fetch(
                QUERIES["sync-candidates"],
                state,
                job["after_contact"],
                ctx.settings.sync_chunk_contacts,
            )
        ]
        if not contacts:
            done = await conn.fetchrow(
                QUERIES["update-sync-job"], job_id, "done", job["after_contact"], 0, 0, None
            )
            await outbox.add(conn, Topic.JOBS_EVENTS, job_id, _event(done, "done"))
            await outbox.add(conn, Topic.MAIL_SYSTEM, job_id, completion_mail(ctx, done))
            log.info("sync_job_done", contacts=done["contacts"], changed=done["changed"])
            return True
        changed = await conn.fetch(QUERIES["sync-apply"], contacts, state)
        await store.publish(conn, [store.membership_change(r) for r in changed])
        progress = await conn.fetchrow(
            QUERIES["update-sync-job"],
            job_id,
            "running",
            contacts[-1],
            len(contacts),
            len(changed),
            None,
        )
        await outbox.add(conn, Topic.JOBS_EVENTS, job_id, _event(progress, "running"))
        return False


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
