"""F-08 upkeep: points older than 90 days leave the score; old idempotency ids are forgotten."""

from __future__ import annotations

from libs.common.topics import Topic
from services.contacts import maintenance
from services.contacts.context import CONTEXT


async def test_expired_points_leave_the_score_and_old_event_ids_are_forgotten(contacts, kafka):
    contact = await contacts.api.ok("POST", "/v1/contacts", {"email": "score@example.jp"})
    pool = contacts.runtime.pool
    await pool.execute(
        "INSERT INTO engagement (event_id, contact_id, campaign_id, kind, points, occurred_at)"
        " VALUES"
        " ('old', $1, 'c1', 'click', 3, now() - interval '91 days'),"
        " ('new', $1, 'c1', 'open', 1, now() - interval '1 day')",
        contact["id"],
    )
    await pool.execute("UPDATE contact SET score = 4 WHERE id = $1", contact["id"])
    await pool.execute(
        "INSERT INTO processed_event (event_id, processed_at) VALUES"
        " ('ancient', now() - interval '30 days'), ('recent', now())"
    )

    changed = await maintenance.run_once(contacts.runtime.app[CONTEXT])

    assert changed == 1
    assert await pool.fetchval("SELECT score FROM contact WHERE id = $1", contact["id"]) == 1
    assert await pool.fetchval("SELECT array_agg(event_id) FROM engagement") == ["new"]
    assert await pool.fetchval(
        "SELECT array_agg(event_id ORDER BY event_id) FROM processed_event"
        " WHERE event_id IN ('ancient', 'recent')"
    ) == ["recent"]
    changes = await kafka.read(
        Topic.CONTACTS_CHANGELOG, until=lambda r: any(c["contact"]["score"] == 1 for c in r)
    )
    assert changes[-1]["contact_id"] == contact["id"]
    assert await maintenance.run_once(contacts.runtime.app[CONTEXT]) == 0  # nothing left to expire
