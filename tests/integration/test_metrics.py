"""What the services export on /metrics, on the real stack.

- Each service, running side by side in one process, serves the common families and its
  own (``Runtime(metrics=...)``), and none of another service's.
- Series alerts rely on exist from the start, at zero: dead letters per topic and stage, the
  sender's sent count per relay; the database pool's connections are there by state.
- A consumer exports its lag per partition (end offset minus committed offset) and the
  seconds since its last commit, and both move: lag while a batch is stuck (the loop does
  not publish it, a watcher of its own does), back to zero once committed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from libs.common import db, metrics
from libs.common.kafka import Message
from libs.common.topics import Topic
from tayori.services import SERVICES
from tests.conftest import Kafka, Service, Stack, eventually, running_all
from tests.integration.test_consumer_loop import _result
from tests.integration.test_consumer_loop import running as consuming

pytestmark = pytest.mark.integration

#: deliverability keeps its figures in faust's tables: no database, no pool.
WITHOUT_DATABASE = {"deliverability"}


def _names(families: Iterable[MetricWrapperBase]) -> set[str]:
    return {described.name for family in families for described in family.describe()}


def _exported(text: str) -> dict[str, list[Any]]:
    """Family name → its samples, from a /metrics answer (without the ``<family>_created``
    timestamps, which the text format shows as families of their own)."""
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    return {
        name: samples
        for name, samples in families.items()
        if not (name.endswith("_created") and name.removesuffix("_created") in families)
    }


def _value(exported: dict[str, list[Any]], family: str, **labels: str) -> float | None:
    for sample in exported.get(family, []):
        if sample.name == family or sample.name == f"{family}_total":
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def test_each_service_exports_the_common_families_and_only_its_own(
    stack: Stack, database: str, prefix: str, tmp_path: Path
) -> None:
    common = _names(metrics.COMMON)
    assert {"tayori_consumer_lag_records", "tayori_db_pool_connections"} <= common
    async with running_all(stack, database, prefix, tmp_path) as services:
        assert set(services) == set(SERVICES)
        for name, service in services.items():
            text = await service.api.ok("GET", "/metrics", token=None)
            exported = _exported(text)
            tayori = {family for family in exported if family.startswith("tayori_")}
            own = _names(metrics.OWNED[name])
            others = set().union(*(_names(f) for s, f in metrics.OWNED.items() if s != name))
            assert own, name
            assert common <= tayori, f"{name} lacks {sorted(common - tayori)}"
            assert own <= tayori, f"{name} lacks its own {sorted(own - tayori)}"
            assert not tayori & others, f"{name} exports {sorted(tayori & others)}"
            assert tayori == common | own, sorted(tayori - common - own)
            # The process's own collectors stay (memory, CPU).
            assert "process_resident_memory_bytes" in exported, name

            pool = "tayori_db_pool_connections"
            if name in WITHOUT_DATABASE:
                assert _value(exported, pool, service=name, state="max") is None, name
            else:
                size = float(service.runtime.settings.db_pool_size)
                assert _value(exported, pool, service=name, state="max") == size
                in_use = _value(exported, pool, service=name, state="in_use")
                idle = _value(exported, pool, service=name, state="idle")
                assert in_use is not None and idle is not None and in_use + idle <= size, name
            assert _value(exported, "tayori_producer_pending_records", service=name) is not None
            for spec in service.runtime.consumers:
                assert (
                    _value(exported, "tayori_consumer_seconds_since_commit", group=spec.group)
                    is not None
                ), spec.group
                for topic in spec.topics:
                    for stage in ("decode", "process"):
                        dead = _value(
                            exported,
                            "tayori_messages_dead_lettered",
                            service=name,
                            topic=topic.value,
                            stage=stage,
                        )
                        # present from the start (other tests of this process may have
                        # dead-lettered on the same topic: the counters are the process's)
                        assert dead is not None and dead >= 0, (name, topic, stage)

        # Every partition of every consumer's topics shows its lag once fetched (nothing
        # was published: 0), each on the member holding it, here the only one.
        for service in services.values():

            async def lag_of_every_partition(service: Service = service) -> bool:
                exported = _exported(await service.api.ok("GET", "/metrics", token=None))
                return all(
                    _value(
                        exported,
                        "tayori_consumer_lag_records",
                        group=spec.group,
                        topic=topic.value,
                        partition=str(partition),
                    )
                    == 0
                    for spec in service.runtime.consumers
                    for topic in spec.topics
                    for partition in (0, 1)
                )

            await eventually(lag_of_every_partition)

        sender = _exported(await services["sender"].api.ok("GET", "/metrics", token=None))
        relay = services["sender"].runtime.settings.smtp_relays
        sent = _value(sender, "tayori_sender_sends", kind="campaign", outcome="sent", relay=relay)
        assert sent == 0


async def test_consumer_lag_and_seconds_since_commit(
    stack: Stack, kafka: Kafka, prefix: str
) -> None:
    release = asyncio.Event()
    handled: list[Message] = []

    async def handler(batch: list[Message]) -> None:
        await release.wait()  # the first batch is stuck until the test lets it go
        handled.extend(batch)

    def lag(group: str) -> float | None:
        values = [
            metrics.sample_value(
                "tayori_consumer_lag_records",
                {"group": group, "topic": Topic.DELIVERY_RESULTS.value, "partition": str(p)},
            )
            for p in (0, 1)
        ]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def since_commit(group: str) -> float | None:
        return metrics.sample_value("tayori_consumer_seconds_since_commit", {"group": group})

    for _ in range(3):  # one key: one partition
        await kafka.send(Topic.DELIVERY_RESULTS, 7, _result(str(uuid.uuid4())))
    async with consuming(stack, kafka, prefix, handler) as consumer:
        group = consumer.group
        # Stuck in its first batch: what came meanwhile adds to the lag it shows.
        for _ in range(2):
            await kafka.send(Topic.DELIVERY_RESULTS, 7, _result(str(uuid.uuid4())))

        async def five_behind() -> bool:
            return lag(group) == 5

        await eventually(five_behind)
        stuck = since_commit(group)
        assert stuck is not None

        async def growing() -> bool:
            return (since_commit(group) or 0) > stuck

        await eventually(growing)  # counted from the start while nothing was committed

        release.set()
        released = time.monotonic()

        async def caught_up() -> bool:
            return lag(group) == 0 and len(handled) == 5

        await eventually(caught_up)

        async def committed() -> bool:
            # Counted from a commit made after the release, not from the start before it
            # (the gauge reads the same monotonic clock).
            since = since_commit(group)
            return since is not None and since < time.monotonic() - released

        await eventually(committed)
    # A stopped consumer's series go: its partitions are someone else's now.
    assert lag(group) is None
    assert since_commit(group) is None


async def test_database_pool_connections_and_waiting_callers(database: str) -> None:
    service = f"pool-{uuid.uuid4().hex[:6]}"
    pool = await db.create_pool(database, "contacts", size=1)
    db.observe_pool(pool, service)

    def value(family: str, **labels: str) -> float | None:
        return metrics.sample_value(family, {"service": service, **labels})

    try:
        assert value("tayori_db_pool_connections", state="max") == 1
        assert value("tayori_db_pool_waiting") == 0
        async with pool.acquire() as held:
            assert value("tayori_db_pool_connections", state="in_use") == 1
            assert value("tayori_db_pool_connections", state="idle") == 0
            # Two more callers queue for the one connection: asyncpg's own fetchval and an
            # awaited acquire.
            queued = asyncio.ensure_future(pool.fetchval("SELECT 1"))
            taken = asyncio.ensure_future(pool.acquire())

            async def two_waiting() -> bool:
                return value("tayori_db_pool_waiting") == 2

            await eventually(two_waiting)
            assert await held.fetchval("SELECT 2") == 2
        assert await queued == 1
        await pool.release(await taken)
        assert value("tayori_db_pool_waiting") == 0
        assert value("tayori_db_pool_connections", state="in_use") == 0
    finally:
        await pool.close()
