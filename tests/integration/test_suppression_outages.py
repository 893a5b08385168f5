"""Suppression through a PostgreSQL outage: its loops wait and come back by themselves, and a
sync job (F-12) goes on from its checkpoint."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from libs.common.metrics import sample_value
from libs.common.topics import Topic
from services.suppression import sync
from tests.conftest import Kafka, Stack, eventually, running
from tests.integration.outage import database_away
from tests.integration.test_suppression import wait_job_done

pytestmark = pytest.mark.integration


def retries(operation: str) -> float:
    return (
        sample_value(
            "tayori_transient_retries_total", {"service": "suppression", "operation": operation}
        )
        or 0
    )


async def test_a_sync_job_pauses_through_a_database_outage_and_goes_on_from_its_checkpoint(
    stack: Stack, database: str, prefix: str, kafka: Kafka
) -> None:
    """The database goes away while a sync job runs (a chunk of one contact per transaction)
    and while the outbox relay idles on its connection: both wait for it, the job finishes
    with every contact counted once, and the service never stopped."""
    count = 300
    conn = await asyncpg.connect(database, server_settings={"search_path": "suppression"})
    try:
        await conn.execute(
            "INSERT INTO membership (contact_id, group_id, state, method)"
            " SELECT c, g, CASE g WHEN 1 THEN 'unsubscribed' ELSE 'deliverable' END, 'system'"
            " FROM generate_series(1, $1) c, generate_series(1, 2) g",
            count,
        )
    finally:
        await conn.close()
    async with running(
        "suppression", stack, database, prefix, sync_chunk_contacts=1
    ) as suppression:
        api = suppression.api
        before = retries("sync_job")
        (job,) = (await api.ok("PUT", "/v1/sync-policy", {"unsubscribe": True}))["jobs"]

        async def under_way() -> bool:
            running = await api.ok("GET", f"/v1/sync-jobs/{job['id']}")
            assert running["status"] != "done", "the job ended before the outage"
            return bool(running["contacts"])

        await eventually(under_way, interval=0.01)
        async with database_away(stack, database):

            async def job_waits() -> bool:
                return retries("sync_job") > before

            await eventually(job_waits)
        done = await wait_job_done(api, job["id"])
        assert (done["contacts"], done["changed"]) == (count, count)
        healthy, detail = await suppression.runtime.health()
        assert healthy, detail

        async def published() -> bool:
            changes = await kafka.read_to_end(Topic.SUPPRESSION_CHANGES)
            synced = {c["contact_id"] for c in changes if c["method"] == "auto_sync"}
            return synced == set(range(1, count + 1))

        await eventually(published)


async def test_a_sync_job_that_meets_a_bug_is_failed_with_the_error(
    stack: Stack, database: str, prefix: str, kafka: Kafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a step (here: a trigger state that is missing) is not an outage: the job is
    recorded failed with the error, on jobs.events too, and the service stays up (the task
    used to die and leave the job running)."""
    monkeypatch.setattr(sync, "TRIGGER_STATE", {})
    async with running("suppression", stack, database, prefix) as suppression:
        api = suppression.api
        (job,) = (await api.ok("PUT", "/v1/sync-policy", {"unsubscribe": True}))["jobs"]

        async def failed() -> dict[str, Any] | None:
            row = await api.ok("GET", f"/v1/sync-jobs/{job['id']}")
            return row if row["status"] == "failed" else None

        row = await eventually(failed)
        assert row["detail"] == "KeyError('unsubscribe')"
        healthy, detail = await suppression.runtime.health()
        assert healthy, detail

        async def announced() -> bool:
            events = await kafka.read_to_end(Topic.JOBS_EVENTS)
            return any(e["job_id"] == job["id"] and e["status"] == "failed" for e in events)

        await eventually(announced)
