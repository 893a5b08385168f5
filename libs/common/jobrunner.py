"""The one loop of a resumable background job (an import, an export, a sync run).

A service describes its job with a :class:`JobSteps` object — its queries and one step —
and :func:`run_job` does the rest, the same way for every job:

1. **claim** — ``claim(conn)`` in a transaction takes the job for this run and returns it,
   or None when there is nothing to run (finished, cancelled, or another replica's runner
   holds it with a fresh heartbeat). A runner that died leaves a stale heartbeat; the
   service's claim query takes such a job over (``runner IS NULL OR heartbeat_at < now() -
   stale``), or simply locks the row when the job has no runner column.
2. **steps** — ``prepare(job)`` does the part of a step that needs no transaction (an
   export streams its file; most jobs do nothing there), then ``step(conn, job)`` runs the
   step from the job's committed checkpoint in a transaction the runner opens: the work,
   the new checkpoint and the ``jobs.events`` progress record (through the outbox) commit
   together. It returns the job as it now is (the next step starts from it), or None when
   the job is over: done, cancelled (the step sees a status that is no longer running) or
   no longer this runner's.
3. **heartbeat** — while a step (with its ``prepare``) runs, ``heartbeat(conn, job)`` is
   called every ``heartbeat_seconds`` (None: no heartbeat, the job is never taken over).
4. **transient failure** (:func:`libs.common.errors.classify`: the database or a source
   away) — the run pauses with backoff under :func:`libs.common.retry.supervise` and starts
   again at 1, from the committed checkpoint, for as long as the outage lasts.
5. **bug** (anything else, including :class:`~libs.common.errors.InvalidMessage` raised
   by a step) — logged as ``job_crashed`` with the traceback, and ``fail(conn, job_id,
   reason)`` records the job failed (with its ``jobs.events`` record), retried until the
   database answers. The service keeps running; the job does not run again.

Cancellation of the task (the service stopping) leaves the job as committed: the next
start, or another replica, resumes it from its checkpoint.

What a step counts (metrics: rows imported, exports done or failed) it hands to
:func:`after_commit`, called in the runner's transaction: the count is made once that
transaction has committed, and never for work whose commit failed — the run redoes that work
from the checkpoint and counts it then, once.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common.errors import InvalidMessage, is_transient
from libs.common.logging import get_logger
from libs.common.retry import RECONNECT, Backoff, retry, supervise

log = get_logger(__name__)

J = TypeVar("J")

#: at most this much of a bug's description goes into the job's record.
MAX_REASON = 2000


class JobSteps(Protocol[J]):
    """What a service supplies for one job (module docstring: the contract)."""

    #: the job in logs and its transient_retries label: "sync_job", "export", "import".
    kind: str
    service: str
    job_id: str
    #: None: no heartbeat (the job is never taken over from a live process).
    heartbeat_seconds: float | None

    async def claim(self, conn: asyncpg.Connection) -> J | None: ...

    async def prepare(self, job: J) -> None: ...

    async def step(self, conn: asyncpg.Connection, job: J) -> J | None: ...

    async def heartbeat(self, conn: asyncpg.Connection, job: J) -> None: ...

    async def fail(self, conn: asyncpg.Connection, job_id: str, reason: str) -> None: ...


class Fault(enum.Enum):
    """What the runner does with an exception out of a run."""

    PAUSE = "pause"  # transient: back off, resume from the checkpoint
    CRASH = "crash"  # a bug: record the job failed


#: the actions :func:`after_commit` queued in the runner's transaction under way.
_after_commit: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "jobrunner_after_commit", default=None
)


def after_commit(action: Callable[[], None]) -> None:
    """Run ``action`` once the runner's transaction this is called in (a claim, a step, the
    record of a failure) has committed; not at all if it does not commit."""
    pending = _after_commit.get()
    if pending is None:
        raise RuntimeError("after_commit outside a job runner's transaction")
    pending.append(action)


@asynccontextmanager
async def _transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a transaction; what :func:`after_commit` queued in it runs after the
    commit."""
    pending: list[Callable[[], None]] = []
    token = _after_commit.set(pending)
    try:
        async with pool.acquire() as conn, conn.transaction():
            yield conn
    finally:
        _after_commit.reset(token)
    for action in pending:
        action()


def fault(exc: BaseException) -> Fault:
    """The runner's one decision about a failure."""
    return Fault.PAUSE if is_transient(exc) else Fault.CRASH


def failure_reason(exc: BaseException) -> str:
    """What a failed job's record says about the bug that ended it."""
    reason = exc.reason if isinstance(exc, InvalidMessage) else repr(exc)
    return reason[:MAX_REASON]


async def run_job(pool: asyncpg.Pool, steps: JobSteps[Any], *, pause: Backoff = RECONNECT) -> None:
    """Run one job to its end (module docstring); ``pause``: the backoff of a transient
    failure. Cancellation propagates."""
    with bound_contextvars(job_id=steps.job_id):
        try:
            await supervise(
                lambda: _run_once(pool, steps),
                name=steps.kind,
                service=steps.service,
                strategy=pause,
            )
        except asyncio.CancelledError:
            log.info("job_interrupted", kind=steps.kind)
            raise
        except Exception as exc:  # the job's boundary: a bug fails the job, not the service
            log.error("job_crashed", kind=steps.kind, error=repr(exc), exc_info=exc)
            reason = failure_reason(exc)

            async def record() -> None:
                async with _transaction(pool) as conn:
                    await steps.fail(conn, steps.job_id, reason)

            try:
                await retry(record, name=f"{steps.kind}_fail", service=steps.service)
            except Exception as again:  # a bug there too: the job stays for a restart
                log.error(
                    "job_fail_record_failed", kind=steps.kind, error=repr(again), exc_info=again
                )


async def _run_once(pool: asyncpg.Pool, steps: JobSteps[Any]) -> None:
    """Claim, then steps until the job is over; an exception ends the pass."""
    async with _transaction(pool) as conn:
        job = await steps.claim(conn)
    while job is not None:
        async with _heartbeat(pool, steps, job):
            await steps.prepare(job)
            async with _transaction(pool) as conn:
                job = await steps.step(conn, job)


@asynccontextmanager
async def _heartbeat(pool: asyncpg.Pool, steps: JobSteps[Any], job: Any) -> AsyncIterator[None]:
    """Beat every ``heartbeat_seconds`` while the body runs. A beat that fails transiently
    is only skipped: the step's own commit tells whether the database is away."""
    if steps.heartbeat_seconds is None:
        yield
        return
    seconds = steps.heartbeat_seconds

    async def beat() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                async with pool.acquire() as conn:
                    await steps.heartbeat(conn, job)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("job_heartbeat_missed", kind=steps.kind, error=repr(exc))

    task = asyncio.create_task(beat(), name=f"heartbeat:{steps.job_id}")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    crash = None if task.cancelled() else task.exception()
    if crash is not None:  # a bug in the heartbeat is the job's bug
        raise crash
