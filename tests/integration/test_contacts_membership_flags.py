"""contact.membership_flags, the aggregate delivery state search reads (0003_membership_flags.sql),
follows every membership write: joins and leaves through the API, suppression.changes
(unsubscribe, ban, reset to deliverable, left), deleted contacts and groups, concurrent
writers of one contact, and the migration's backfill of memberships written before it."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from pathlib import Path

import asyncpg

from libs.common import db
from libs.common.topics import Topic
from services.contacts.app import MIGRATIONS, SCHEMA
from tests.conftest import Stack, eventually
from tests.integration.test_contacts_projections import (
    consumed,
    membership_change,
    publish_together,
    search_ids,
)

MEMBER, UNSUBSCRIBED, BANNED = 1, 2, 4
RECOMPUTED = (
    "SELECT c.id, c.membership_flags,"
    " coalesce((SELECT bit_or(CASE m.state WHEN 'unsubscribed' THEN 3"
    "                                      WHEN 'banned' THEN 5 ELSE 1 END)"
    "           FROM membership m WHERE m.contact_id = c.id), 0) AS expected"
    " FROM contact c ORDER BY c.id"
)


async def flags(conn: asyncpg.Connection | asyncpg.Pool) -> dict[int, int]:
    """Every contact's flags, checked against its memberships as they are now."""
    rows = await conn.fetch(RECOMPUTED)
    for row in rows:
        assert row["membership_flags"] == row["expected"], dict(row)
    return {row["id"]: row["membership_flags"] for row in rows}


async def test_flags_follow_joins_changes_leaves_and_deletes(contacts, kafka):
    api, pool = contacts.api, contacts.runtime.pool
    g1 = (await api.ok("POST", "/v1/groups", {"name": "メルマガ"}))["id"]
    g2 = (await api.ok("POST", "/v1/plans", {"name": "ステップ"}))["id"]
    p = [
        (await api.ok("POST", "/v1/contacts", {"email": f"f{i}@example.jp"}))["id"]
        for i in range(4)
    ]
    assert await flags(pool) == dict.fromkeys(p, 0)
    assert "membership_flags" not in await api.ok("GET", f"/v1/contacts/{p[0]}")

    # joins
    await api.ok("POST", f"/v1/groups/{g1}/members", {"contact_ids": p[:3]})
    await api.ok("POST", f"/v1/groups/{g2}/members", {"contact_ids": [p[1], p[2]]})
    assert await flags(pool) == {p[0]: MEMBER, p[1]: MEMBER, p[2]: MEMBER, p[3]: 0}
    assert await search_ids(api, {"delivery_state": "all_deliverable"}) == set(p[:3])

    base = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=5)
    at = [base + dt.timedelta(minutes=k) for k in range(6)]

    async def apply(*changes: dict) -> None:
        await publish_together(
            kafka, Topic.SUPPRESSION_CHANGES, [(c["contact_id"], c) for c in changes]
        )
        await consumed(contacts, [c["change_id"] for c in changes])

    # unsubscribe and ban; a change for a membership not recorded yet creates it
    await apply(
        membership_change(p[0], g1, "unsubscribed", at[0], 2, method="form"),
        membership_change(p[1], g2, "banned", at[0], 2),
        membership_change(p[3], g2, "unsubscribed", at[0], 2, method="upstream"),
    )
    assert await flags(pool) == {
        p[0]: MEMBER | UNSUBSCRIBED,
        p[1]: MEMBER | BANNED,
        p[2]: MEMBER,
        p[3]: MEMBER | UNSUBSCRIBED,
    }
    assert await search_ids(api, {"delivery_state": "any_unsubscribed"}) == {p[0], p[3]}
    assert await search_ids(api, {"delivery_state": "any_banned"}) == {p[1]}
    assert await search_ids(api, {"delivery_state": "all_deliverable"}) == {p[2]}

    # both kinds at once, then reset to deliverable; a stale change does nothing
    await apply(membership_change(p[1], g1, "unsubscribed", at[1], 3))
    assert (await flags(pool))[p[1]] == MEMBER | UNSUBSCRIBED | BANNED
    await apply(
        membership_change(p[0], g1, "deliverable", at[2], 3),
        membership_change(p[1], g2, "deliverable", at[2], 3),
        membership_change(p[1], g1, "deliverable", at[2], 4),
        membership_change(p[1], g1, "banned", at[0], 2),  # older than what is held
    )
    assert await flags(pool) == {
        p[0]: MEMBER,
        p[1]: MEMBER,
        p[2]: MEMBER,
        p[3]: MEMBER | UNSUBSCRIBED,
    }

    # leaving: the stopped membership goes (left on the topic), then the last one (API)
    await apply(membership_change(p[3], g2, "left", at[3], 3))
    assert (await flags(pool))[p[3]] == 0
    await apply(membership_change(p[2], g2, "banned", at[3], 2))
    assert (await flags(pool))[p[2]] == MEMBER | BANNED
    await api.ok("DELETE", f"/v1/groups/{g2}/members/{p[2]}")
    assert (await flags(pool))[p[2]] == MEMBER
    await api.ok("DELETE", f"/v1/groups/{g1}/members/{p[2]}")
    assert (await flags(pool))[p[2]] == 0
    assert await search_ids(api, {"not": {"delivery_state": "all_deliverable"}}) == {p[2], p[3]}

    # a deleted contact takes its memberships; the others keep theirs
    await api.ok("DELETE", f"/v1/contacts/{p[0]}")
    assert await flags(pool) == {p[1]: MEMBER, p[2]: 0, p[3]: 0}
    assert await search_ids(api, {"delivery_state": "all_deliverable"}) == {p[1]}
    assert await kafka.read_to_end(Topic.SUPPRESSION_CHANGES.dlq) == []


async def test_flags_under_concurrent_writers_and_bulk_statements(database: str):
    one, two = await db.connect(database, SCHEMA), await db.connect(database, SCHEMA)
    try:
        groups = [
            await one.fetchval("INSERT INTO contact_group (name) VALUES ($1) RETURNING id", name)
            for name in ("g1", "g2", "g3")
        ]
        ids = [
            await one.fetchval("INSERT INTO contact (email) VALUES ($1) RETURNING id", f"c{i}@x.jp")
            for i in range(3)
        ]
        join = (
            "INSERT INTO membership (contact_id, group_id, state, method) VALUES ($1, $2, $3, 'x')"
        )
        # Two open transactions write memberships of the same contact: each recomputes under
        # the contact's lock, so the later one sees the earlier one's committed row.
        first, second = one.transaction(), two.transaction()
        await first.start()
        await second.start()
        await one.execute(join, ids[0], groups[0], "unsubscribed")
        blocked = asyncio.ensure_future(two.execute(join, ids[0], groups[1], "banned"))
        waiting = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
        await eventually(lambda: one.fetchval(waiting, two.get_server_pid()))
        assert not blocked.done()  # waits for the first writer's lock on the contact
        await first.commit()
        await blocked
        await second.commit()
        assert (await flags(one))[ids[0]] == MEMBER | UNSUBSCRIBED | BANNED

        # one statement over many contacts and states
        await one.execute(
            "INSERT INTO membership (contact_id, group_id, state, method)"
            " SELECT c, g, 'deliverable', 'x' FROM unnest($1::bigint[]) c, unnest($2::bigint[]) g"
            " ON CONFLICT DO NOTHING",
            ids,
            groups,
        )
        await one.execute("UPDATE membership SET state = 'banned' WHERE group_id = $1", groups[2])
        assert await flags(one) == {
            i: MEMBER | BANNED | (UNSUBSCRIBED * (i == ids[0])) for i in ids
        }
        await one.execute(
            "UPDATE membership SET state = 'deliverable' WHERE state <> 'deliverable'"
        )
        assert await flags(one) == dict.fromkeys(ids, MEMBER)
        # a membership moved to another contact changes both
        await one.execute("DELETE FROM membership WHERE contact_id = $1", ids[2])
        await one.execute(
            "DELETE FROM membership WHERE contact_id = $1 AND group_id <> $2", ids[1], groups[0]
        )
        assert await flags(one) == {ids[0]: MEMBER, ids[1]: MEMBER, ids[2]: 0}
        await one.execute(
            "UPDATE membership SET contact_id = $1, state = 'unsubscribed' WHERE contact_id = $2",
            ids[2],
            ids[1],
        )
        assert await flags(one) == {ids[0]: MEMBER, ids[1]: 0, ids[2]: MEMBER | UNSUBSCRIBED}
        # a deleted group cascades to its memberships
        await one.execute("DELETE FROM contact_group WHERE id <> $1", groups[0])
        assert await flags(one) == {ids[0]: MEMBER, ids[1]: 0, ids[2]: MEMBER | UNSUBSCRIBED}
        await one.execute("DELETE FROM contact_group")
        assert await flags(one) == dict.fromkeys(ids, 0)
        await one.execute(
            join,
            ids[1],
            await one.fetchval("INSERT INTO contact_group (name) VALUES ('g4') RETURNING id"),
            "banned",
        )
        assert (await flags(one))[ids[1]] == MEMBER | BANNED
        await one.execute("TRUNCATE membership")
        assert await flags(one) == dict.fromkeys(ids, 0)
    finally:
        await one.close()
        await two.close()


async def test_flags_kept_by_a_writer_without_the_schema_on_its_search_path(database: str):
    plain = await asyncpg.connect(database)  # search_path: the server's default
    try:
        group = await plain.fetchval(
            f"INSERT INTO {SCHEMA}.contact_group (name) VALUES ('g') RETURNING id"
        )
        contact = await plain.fetchval(
            f"INSERT INTO {SCHEMA}.contact (email) VALUES ('p@x.jp') RETURNING id"
        )
        await plain.execute(
            f"INSERT INTO {SCHEMA}.membership (contact_id, group_id, state, method)"
            " VALUES ($1, $2, 'banned', 'x')",
            contact,
            group,
        )
        assert await plain.fetchval(
            f"SELECT membership_flags FROM {SCHEMA}.contact WHERE id = $1", contact
        ) == (MEMBER | BANNED)
    finally:
        await plain.close()


async def test_migration_backfills_flags_of_existing_memberships(stack: Stack, tmp_path: Path):
    before = tmp_path / "before"
    before.mkdir()
    files = db.migration_files(MIGRATIONS)
    flag_migration = next(p for _, _, p in files if p.name.endswith("_membership_flags.sql"))
    for _, _, path in files:
        if path.name < flag_migration.name:
            shutil.copy(path, before / path.name)
    dsn = await stack.postgres.create_database("t_membership_flags_backfill")
    await db.migrate(dsn, SCHEMA, before)
    conn = await db.connect(dsn, SCHEMA)
    try:
        groups = [
            await conn.fetchval("INSERT INTO contact_group (name) VALUES ($1) RETURNING id", name)
            for name in ("g1", "g2")
        ]
        states = [[], ["deliverable"], ["unsubscribed", "deliverable"], ["banned", "unsubscribed"]]
        ids = []
        for i, held in enumerate(states):
            ids.append(
                await conn.fetchval(
                    "INSERT INTO contact (email) VALUES ($1) RETURNING id", f"b{i}@x.jp"
                )
            )
            for group_id, state in zip(groups, held, strict=False):
                await conn.execute(
                    "INSERT INTO membership (contact_id, group_id, state, method)"
                    " VALUES ($1, $2, $3, 'x')",
                    ids[-1],
                    group_id,
                    state,
                )
        applied = await db.migrate(dsn, SCHEMA, MIGRATIONS)
        assert applied[0] == flag_migration.name
        assert await flags(conn) == {
            ids[0]: 0,
            ids[1]: MEMBER,
            ids[2]: MEMBER | UNSUBSCRIBED,
            ids[3]: MEMBER | UNSUBSCRIBED | BANNED,
        }
    finally:
        await conn.close()
