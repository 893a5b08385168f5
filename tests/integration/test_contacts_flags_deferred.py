"""contacts' suppression.changes projection recomputes contact.membership_flags once per
batch (migration 0006): its statements defer the membership row triggers for their
transaction, then the handler recomputes the contacts they wrote, locked in id order. The
flags stay equal to a recompute from the memberships after any batches; every other writer
keeps the triggers (also on a connection the projection used before); and a projection and
a trigger-path writer of the same contacts wait for each other in the right order, without
deadlocking."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from typing import Any

import asyncpg

from libs.common import db
from libs.common.kafka import Message
from libs.common.topics import Topic
from services.contacts.agents import handle_suppression_changes
from services.contacts.app import SCHEMA
from services.contacts.context import Context
from services.contacts.store import QUERIES
from tests.conftest import eventually
from tests.integration.test_contacts_membership_flags import BANNED, MEMBER, UNSUBSCRIBED, flags
from tests.integration.test_contacts_projections import membership_change

STATES = ("deliverable", "unsubscribed", "banned", "left")


async def setup(contacts: Any, n: int = 6) -> tuple[Context, list[int], list[int]]:
    api, runtime = contacts.api, contacts.runtime
    groups = [(await api.ok("POST", "/v1/groups", {"name": f"g{i}"}))["id"] for i in range(3)]
    ids = [
        (await api.ok("POST", "/v1/contacts", {"email": f"d{i}@example.jp"}))["id"]
        for i in range(n)
    ]
    # several groups per contact, one contact in none
    await api.ok("POST", f"/v1/groups/{groups[0]}/members", {"contact_ids": ids[:-1]})
    await api.ok("POST", f"/v1/groups/{groups[1]}/members", {"contact_ids": ids[: n // 2]})
    return Context(runtime.settings, runtime.pool, runtime.publisher), ids, groups


def as_batch(changes: list[dict[str, Any]]) -> list[Message]:
    return [Message(Topic.SUPPRESSION_CHANGES, None, c, 0, i, 0) for i, c in enumerate(changes)]


def random_changes(
    rng: random.Random, ids: list[int], groups: list[int], base: dt.datetime, size: int
) -> list[dict[str, Any]]:
    """Changes of a few memberships, often the same one several times, with ties and
    stale times: leave, rejoin (a change after a "left"), unsubscribe, ban, reset."""
    return [
        membership_change(
            rng.choice(ids[:3]) if rng.random() < 0.6 else rng.choice(ids),
            rng.choice(groups),
            rng.choice(STATES),
            base + dt.timedelta(seconds=rng.randrange(20)),
            2,
        )
        for _ in range(size)
    ]


async def test_flags_equal_a_recompute_after_any_batches(contacts):
    ctx, ids, groups = await setup(contacts)
    rng = random.Random(20261126)
    base = dt.datetime.now(dt.UTC).replace(microsecond=0)
    seen_states: set[int] = set()
    for round_ in range(60):
        changes = random_changes(
            rng, ids, groups, base + dt.timedelta(seconds=round_), 1 + round_ % 12
        )
        batch = as_batch(changes)
        await handle_suppression_changes(ctx, batch)
        seen_states.update((await flags(ctx.pool)).values())  # asserts flags == recompute
        if round_ % 7 == 0:  # redelivered: claimed already, nothing changes
            before = await flags(ctx.pool)
            await handle_suppression_changes(ctx, batch)
            assert await flags(ctx.pool) == before
    # the batches went through every combination the flags can hold
    assert {0, MEMBER, MEMBER | UNSUBSCRIBED, MEMBER | BANNED} <= seen_states
    assert MEMBER | UNSUBSCRIBED | BANNED in seen_states


async def test_statements_defer_the_triggers_for_their_transaction_only(contacts):
    ctx, ids, groups = await setup(contacts)
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    pool = ctx.pool
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.fetch(
                QUERIES["apply-membership-changes"],
                [ids[0], ids[1]],
                [groups[0], groups[0]],
                ["unsubscribed", "banned"],
                ["form", "admin"],
                [at, at],
            )
            await conn.fetch(QUERIES["leave-memberships"], [ids[2]], [groups[1]])
            # not recomputed yet: the row triggers queued nothing
            held = dict(await conn.fetch("SELECT id, membership_flags FROM contact"))
            assert held[ids[0]] == held[ids[1]] == held[ids[2]] == MEMBER
            await conn.execute(QUERIES["refresh-membership-flags"], [ids[0], ids[1], ids[2]])
            assert (await flags(conn))[ids[0]] == MEMBER | UNSUBSCRIBED
        # committed: on this same connection a plain write has its trigger again
        await conn.execute(
            "INSERT INTO membership (contact_id, group_id, state, method)"
            " VALUES ($1, $2, 'banned', 'x')",
            ids[-1],
            groups[2],
        )
    assert await flags(pool) == {
        ids[0]: MEMBER | UNSUBSCRIBED,
        ids[1]: MEMBER | BANNED,
        ids[2]: MEMBER,
        ids[3]: MEMBER,
        ids[4]: MEMBER,
        ids[5]: MEMBER | BANNED,
    }


async def _waiting_for_a_lock(observer: asyncpg.Connection, pid: int) -> bool:
    return bool(
        await observer.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
    )


async def test_projection_waits_for_a_trigger_writer_then_sees_its_rows(contacts, database):
    ctx, ids, groups = await setup(contacts)
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    writer = await db.connect(database, SCHEMA)
    try:
        writing = writer.transaction()
        await writing.start()
        # the trigger path: the row, then its contact locked and recomputed (uncommitted)
        await writer.execute(
            "INSERT INTO membership (contact_id, group_id, state, method)"
            " VALUES ($1, $2, 'banned', 'x')",
            ids[1],
            groups[2],
        )
        projecting = asyncio.ensure_future(
            handle_suppression_changes(
                ctx,
                as_batch(
                    [
                        membership_change(ids[0], groups[0], "unsubscribed", at, 2),
                        membership_change(ids[1], groups[0], "unsubscribed", at, 2),
                        membership_change(ids[2], groups[0], "left", at, 2),
                    ]
                ),
            )
        )
        pids = {
            r["pid"]
            for r in await writer.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
        }

        async def projection_waits() -> bool:
            for pid in pids:
                if await _waiting_for_a_lock(writer, pid):
                    return True
            return False

        await eventually(projection_waits)
        assert not projecting.done()  # its recompute waits for the writer's contact lock
        await writing.commit()
        await projecting
    finally:
        await writer.close()
    # the projection's recompute saw the writer's committed ban
    assert await flags(ctx.pool) == {
        ids[0]: MEMBER | UNSUBSCRIBED,
        ids[1]: MEMBER | UNSUBSCRIBED | BANNED,
        ids[2]: MEMBER,
        ids[3]: MEMBER,
        ids[4]: MEMBER,
        ids[5]: 0,
    }


async def test_trigger_writer_waits_for_the_projection_then_sees_its_rows(contacts, database):
    ctx, ids, groups = await setup(contacts)
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    projection = await db.connect(database, SCHEMA)
    writer = await db.connect(database, SCHEMA)
    try:
        # the handler's statements, stopped before its commit
        projecting = projection.transaction()
        await projecting.start()
        await projection.fetch(
            QUERIES["apply-membership-changes"],
            [ids[0]],
            [groups[0]],
            ["unsubscribed"],
            ["form"],
            [at],
        )
        await projection.execute(QUERIES["refresh-membership-flags"], [ids[0]])
        writing = asyncio.ensure_future(
            writer.execute(
                "INSERT INTO membership (contact_id, group_id, state, method)"
                " VALUES ($1, $2, 'banned', 'x')",
                ids[0],
                groups[2],
            )
        )
        await eventually(lambda: _waiting_for_a_lock(projection, writer.get_server_pid()))
        assert not writing.done()  # its trigger waits for the projection's contact lock
        await projecting.commit()
        await writing
    finally:
        await projection.close()
        await writer.close()
    assert (await flags(ctx.pool))[ids[0]] == MEMBER | UNSUBSCRIBED | BANNED


async def test_projection_and_trigger_writers_on_the_same_contacts(contacts, database):
    """Batches of the projection while other writers (one membership per transaction,
    through the triggers: joins, leaves, state changes) write the same contacts' and even
    the same memberships: no deadlock (PostgreSQL would abort one of them), right flags."""
    ctx, ids, groups = await setup(contacts)
    rng = random.Random(7)
    base = dt.datetime.now(dt.UTC).replace(microsecond=0)
    writers = [await db.connect(database, SCHEMA) for _ in range(3)]

    async def trigger_writes(conn: asyncpg.Connection, seed: int) -> None:
        own = random.Random(seed)
        for _ in range(40):
            contact, group = own.choice(ids), own.choice(groups)
            if own.random() < 0.3:
                await conn.execute(
                    "DELETE FROM membership WHERE contact_id = $1 AND group_id = $2",
                    contact,
                    group,
                )
            else:
                await conn.execute(
                    "INSERT INTO membership (contact_id, group_id, state, method)"
                    " VALUES ($1, $2, $3, 'x') ON CONFLICT (contact_id, group_id)"
                    " DO UPDATE SET state = EXCLUDED.state",
                    contact,
                    group,
                    own.choice(STATES[:3]),
                )

    async def projection() -> None:
        for round_ in range(40):
            changes = random_changes(rng, ids, groups, base + dt.timedelta(seconds=round_), 8)
            await handle_suppression_changes(ctx, as_batch(changes))

    try:
        await asyncio.gather(projection(), *(trigger_writes(w, i) for i, w in enumerate(writers)))
    finally:
        for w in writers:
            await w.close()
    await flags(ctx.pool)  # equal to the recompute
