"""The shared job runner's decisions (libs/common/jobrunner.py), with a fake pool: a job runs
its steps to the end, pauses on a transient failure and resumes from its checkpoint, is
failed once on a bug, stops when a step finds it cancelled, and beats while a step runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from libs.common.errors import InvalidMessage, TransientError
from libs.common.jobrunner import Fault, after_commit, failure_reason, fault, run_job
from libs.common.retry import Backoff

QUICK = Backoff(initial=0.001, maximum=0.001, attempts=None)


class FakeConn:
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


class FakePool:
    def __init__(self) -> None:
        self.conn = FakeConn()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConn]:
        yield self.conn


class Counting:
    """A job of ``total`` steps; its committed checkpoint is ``self.done``."""

    kind = "test"
    service = "tests"
    job_id = "job-1"
    heartbeat_seconds: float | None = None

    def __init__(self, total: int, *, status: str = "running") -> None:
        self.total = total
        self.status = status
        self.done = 0
        self.claims = 0
        self.beats = 0
        self.failed: list[str] = []
        self.on_step: Any = None

    async def claim(self, conn: Any) -> int | None:
        self.claims += 1
        return self.done if self.status == "running" else None

    async def prepare(self, job: int) -> None:
        pass

    async def step(self, conn: Any, job: int) -> int | None:
        assert job == self.done, "a step starts from the committed checkpoint"
        if self.on_step is not None:
            await self.on_step(job)
        if self.status != "running" or self.done >= self.total:
            return None
        self.done += 1
        return self.done

    async def heartbeat(self, conn: Any, job: int) -> None:
        self.beats += 1

    async def fail(self, conn: Any, job_id: str, reason: str) -> None:
        self.failed.append(reason)
        self.status = "failed"


async def test_runs_steps_to_the_end() -> None:
    job = Counting(5)
    await run_job(FakePool(), job, pause=QUICK)
    assert (job.done, job.claims, job.failed) == (5, 1, [])


async def test_nothing_to_claim_runs_nothing() -> None:
    job = Counting(5, status="done")
    await run_job(FakePool(), job, pause=QUICK)
    assert (job.done, job.claims) == (0, 1)


async def test_transient_failure_pauses_and_resumes_from_the_checkpoint() -> None:
    job = Counting(5)
    outages = [2, 2, 4]  # the database goes away twice at step 2, once at step 4

    async def away(at: int) -> None:
        if outages and at == outages[0]:
            outages.pop(0)
            raise asyncpg.ConnectionDoesNotExistError("connection was closed")

    job.on_step = away
    await run_job(FakePool(), job, pause=QUICK)
    assert job.done == 5
    assert job.claims == 4  # the first claim and one after each outage
    assert job.failed == []


async def test_a_bug_fails_the_job_once() -> None:
    job = Counting(5)

    async def bug(at: int) -> None:
        if at == 3:
            raise KeyError("column")

    job.on_step = bug
    await run_job(FakePool(), job, pause=QUICK)
    assert job.done == 3
    assert job.failed == ["KeyError('column')"]


async def test_a_failure_that_cannot_be_recorded_yet_is_recorded_later() -> None:
    job = Counting(1)
    attempts = 0
    fail = job.fail

    async def flaky_fail(conn: Any, job_id: str, reason: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TransientError("database away")
        await fail(conn, job_id, reason)

    async def bug(at: int) -> None:
        raise ValueError("bad")

    job.on_step, job.fail = bug, flaky_fail  # type: ignore[method-assign]
    await run_job(FakePool(), job, pause=QUICK)
    assert (attempts, job.failed) == (2, ["ValueError('bad')"])


async def test_cancelled_job_stops_at_the_next_step() -> None:
    job = Counting(100)

    async def cancel_at_3(at: int) -> None:
        if at == 3:
            job.status = "cancelled"

    job.on_step = cancel_at_3
    await run_job(FakePool(), job, pause=QUICK)
    assert (job.done, job.failed) == (3, [])


async def test_heartbeat_while_a_step_runs() -> None:
    job = Counting(1)
    job.heartbeat_seconds = 0.01

    async def slow(at: int) -> None:
        await asyncio.sleep(0.1)

    job.on_step = slow
    await run_job(FakePool(), job, pause=QUICK)
    assert job.beats >= 2


async def test_stopping_the_task_leaves_the_job_as_committed() -> None:
    job = Counting(100)
    started = asyncio.Event()

    async def forever(at: int) -> None:
        started.set()
        await asyncio.Event().wait()

    job.on_step = forever
    task = asyncio.create_task(run_job(FakePool(), job, pause=QUICK))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (job.done, job.failed, job.status) == (0, [], "running")


def test_decisions() -> None:
    assert fault(asyncpg.CannotConnectNowError("starting up")) is Fault.PAUSE
    assert fault(TransientError("away")) is Fault.PAUSE
    assert fault(KeyError("x")) is Fault.CRASH
    assert fault(InvalidMessage("bad file", field="x")) is Fault.CRASH
    assert failure_reason(InvalidMessage("bad file")) == "bad file"
    assert failure_reason(RuntimeError("x" * 5000)).startswith("RuntimeError('xxx")
    assert len(failure_reason(RuntimeError("x" * 5000))) == 2000


class CommitFailingConn:
    """A connection whose next ``failures`` commits fail as a dropped connection does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield
        if self.failures:
            self.failures -= 1
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the commit")


class CommitFailingPool(FakePool):
    def __init__(self, failures: int) -> None:
        self.conn = CommitFailingConn(failures)  # type: ignore[assignment]


class CountingAfterCommit(Counting):
    """Counts each step it makes through after_commit; its checkpoint moves only when the
    step's transaction commits (as a database would have it)."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.counted: list[int] = []

    async def step(self, conn: Any, job: int) -> int | None:
        if job >= self.total:
            return None
        after_commit(lambda: self.counted.append(job + 1))
        return job + 1

    async def claim(self, conn: Any) -> int | None:
        self.claims += 1
        return len(self.counted)  # the committed checkpoint


async def test_what_a_step_counts_is_counted_after_its_commit_once() -> None:
    """A step whose commit fails is redone from the checkpoint: counted once, after the commit
    that held (the exporter's done/failed and the import's rows used to count twice)."""
    job = CountingAfterCommit(3)
    await run_job(CommitFailingPool(0), job, pause=QUICK)
    assert job.counted == [1, 2, 3]
    job = CountingAfterCommit(3)
    pool = CommitFailingPool(2)  # the claim's commit and the first step's fail
    await run_job(pool, job, pause=QUICK)
    assert job.counted == [1, 2, 3]
    assert job.claims == 3


async def test_a_failure_is_counted_once_its_record_committed() -> None:
    counted: list[str] = []

    class Crashing(Counting):
        async def step(self, conn: Any, job: int) -> int | None:
            raise KeyError("bug")

        async def fail(self, conn: Any, job_id: str, reason: str) -> None:
            after_commit(lambda: counted.append(reason))
            await super().fail(conn, job_id, reason)

    pool = CommitFailingPool(0)
    job = Crashing(1)
    await run_job(pool, job, pause=QUICK)
    assert counted == ["KeyError('bug')"]
    counted.clear()

    class CrashingBeforeAnOutage(Crashing):
        async def step(self, conn: Any, job: int) -> int | None:
            pool.conn.failures = 1  # type: ignore[attr-defined]  # the failure's first record
            raise KeyError("bug")

    await run_job(pool, CrashingBeforeAnOutage(1), pause=QUICK)
    assert counted == ["KeyError('bug')"]
    assert pool.conn.failures == 0  # type: ignore[attr-defined]  # the record's commit did fail


def test_after_commit_belongs_in_a_runner_transaction() -> None:
    with pytest.raises(RuntimeError, match="outside a job runner's transaction"):
        after_commit(lambda: None)
