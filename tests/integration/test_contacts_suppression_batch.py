"""contacts' suppression.changes projection applies a whole batch at once (one delete for the
"left" changes, one upsert for the rest) with exactly the effect of applying its changes one
by one: newer changed_at wins (the later one on a tie), stale changes do nothing, "left"
removes whatever is held, a change after a "left" creates the membership again, unknown
contacts or groups are ignored, a redelivered change counts once; and a rejected change
rolls the whole batch back, claims included."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from libs.common.errors import InvalidMessage
from libs.common.kafka import Message
from libs.common.topics import Topic
from services.contacts.agents import handle_suppression_changes
from services.contacts.context import Context
from tests.integration.test_contacts_membership_flags import BANNED, MEMBER, UNSUBSCRIBED, flags
from tests.integration.test_contacts_projections import (
    consumed,
    membership_change,
    publish_together,
)


async def memberships(pool: Any) -> dict[tuple[int, int], tuple[str, str, dt.datetime]]:
    rows = await pool.fetch(
        "SELECT contact_id, group_id, state, method, changed_at FROM membership"
    )
    return {
        (r["contact_id"], r["group_id"]): (r["state"], r["method"], r["changed_at"]) for r in rows
    }


async def setup(contacts: Any) -> tuple[list[int], int, int, list[dt.datetime]]:
    api = contacts.api
    g1 = (await api.ok("POST", "/v1/groups", {"name": "メルマガ"}))["id"]
    g2 = (await api.ok("POST", "/v1/plans", {"name": "ステップ"}))["id"]
    p = [
        (await api.ok("POST", "/v1/contacts", {"email": f"b{i}@example.jp"}))["id"]
        for i in range(5)
    ]
    await api.ok("POST", f"/v1/groups/{g1}/members", {"contact_ids": p[:4]})
    await api.ok("POST", f"/v1/groups/{g2}/members", {"contact_ids": [p[0], p[1]]})
    base = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=5)
    return p, g1, g2, [base + dt.timedelta(minutes=k) for k in range(8)]


def batch_of(p: list[int], g1: int, g2: int, at: list[dt.datetime]) -> list[dict[str, Any]]:
    """Several changes of the same and of different memberships, in topic order."""
    return [
        # p0/g1: three changes, the newest in the middle; the last one is stale
        membership_change(p[0], g1, "unsubscribed", at[1], 2, method="form"),
        membership_change(p[0], g1, "banned", at[3], 3),
        membership_change(p[0], g1, "deliverable", at[2], 4),
        # p0/g2: "left" removes it although a change before it is newer
        membership_change(p[0], g2, "unsubscribed", at[5], 2),
        membership_change(p[0], g2, "left", at[4], 3),
        # p1/g1: "left", then a change (older than the left) creates it again
        membership_change(p[1], g1, "left", at[4], 2),
        membership_change(p[1], g1, "banned", at[2], 3, method="admin"),
        # p1/g2: two changes at the same time: the later one wins
        membership_change(p[1], g2, "banned", at[3], 2),
        membership_change(p[1], g2, "unsubscribed", at[3], 2, method="auto_sync"),
        # p2/g2: a membership not recorded yet is created
        membership_change(p[2], g2, "unsubscribed", at[1], 2, method="upstream"),
        # an unknown contact, an unknown group, another kind: nothing
        membership_change(p[4] + 1000, g1, "unsubscribed", at[1], 2),
        membership_change(p[3], g2 + 1000, "unsubscribed", at[1], 2),
        membership_change(p[3], None, "black", at[1], 1, kind="contact_black"),
    ]


def expected(p: list[int], g1: int, g2: int, at: list[dt.datetime]) -> dict:
    return {
        (p[0], g1): ("banned", "system", at[3]),
        (p[1], g1): ("banned", "admin", at[2]),
        (p[1], g2): ("unsubscribed", "auto_sync", at[3]),
        (p[2], g1): ("deliverable", None, None),  # as joined
        (p[2], g2): ("unsubscribed", "upstream", at[1]),
        (p[3], g1): ("deliverable", None, None),  # as joined
    }


def same(held: dict, wanted: dict) -> bool:
    return held.keys() == wanted.keys() and all(
        held[k][0] == wanted[k][0]
        and wanted[k][1] in (None, held[k][1])
        and wanted[k][2] in (None, held[k][2])
        for k in wanted
    )


async def test_a_batch_through_the_topic(contacts, kafka):
    p, g1, g2, at = await setup(contacts)
    pool = contacts.runtime.pool
    changes = batch_of(p, g1, g2, at)
    # one key for all: one partition, so they arrive in this order and tend to share a batch;
    # the first change is delivered twice and counts once
    records = [("batch", c) for c in [*changes, changes[0]]]
    await publish_together(kafka, Topic.SUPPRESSION_CHANGES, records)
    await consumed(contacts, [c["change_id"] for c in changes])

    held = await memberships(pool)
    assert same(held, expected(p, g1, g2, at)), held
    assert await flags(pool) == {
        p[0]: MEMBER | BANNED,
        p[1]: MEMBER | BANNED | UNSUBSCRIBED,
        p[2]: MEMBER | UNSUBSCRIBED,
        p[3]: MEMBER,
        p[4]: 0,
    }
    assert await kafka.read_to_end(Topic.SUPPRESSION_CHANGES.dlq) == []


def message(value: dict[str, Any], offset: int) -> Message:
    return Message(Topic.SUPPRESSION_CHANGES, "batch", value, 0, offset, 0)


async def test_one_batch_then_its_redelivery_and_a_rejected_batch(contacts):
    """The handler called with exactly one batch (no broker batching to rely on)."""
    p, g1, g2, at = await setup(contacts)
    runtime = contacts.runtime
    ctx = Context(runtime.settings, runtime.pool, runtime.publisher)
    changes = batch_of(p, g1, g2, at)
    batch = [message(c, i) for i, c in enumerate([*changes, changes[1]])]
    await handle_suppression_changes(ctx, batch)
    held = await memberships(runtime.pool)
    assert same(held, expected(p, g1, g2, at)), held

    # redelivered: every change was claimed, nothing changes (not even the stale ones)
    await handle_suppression_changes(ctx, batch)
    assert await memberships(runtime.pool) == held

    # a bad change in a batch: rejected, and the good change before it is not applied
    # nor claimed (the loop dead-letters the bad one and retries the rest)
    good = membership_change(p[3], g1, "unsubscribed", at[7], 2)
    bad = membership_change(p[3], g1, "paused", at[7], 3)
    with pytest.raises(InvalidMessage) as rejected:
        await handle_suppression_changes(ctx, [message(good, 20), message(bad, 21)])
    assert rejected.value.message.value is bad
    assert await memberships(runtime.pool) == held
    assert not await runtime.pool.fetchval(
        "SELECT count(*) FROM processed_event WHERE event_id = $1", good["change_id"]
    )
    await handle_suppression_changes(ctx, [message(good, 20)])
    assert (await memberships(runtime.pool))[(p[3], g1)][:2] == ("unsubscribed", "system")
    assert (await flags(runtime.pool))[p[3]] == MEMBER | UNSUBSCRIBED
