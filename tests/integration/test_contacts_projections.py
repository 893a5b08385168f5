"""What contacts learns from other services' topics, as the F-05 search filters see it.

suppression.changes → membership state and aggregate delivery state; delivery.results and
feedback.events → delivery history and the score (F-08); bounce.events → delivery_status
(F-32). Events are schema-valid records built as in ``schemas/avro/*.avsc``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

from libs.common.topics import Topic
from services.suppression.store import change_record
from tests.conftest import eventually
from tests.integration.test_contacts_api import by_contact, published


async def consumed(service: Any, event_ids: list[str]) -> None:
    """Until every id was claimed: its effect is committed, and so are those of every
    earlier record of its partition."""

    async def done() -> bool:
        found = await service.runtime.pool.fetchval(
            "SELECT count(*) FROM processed_event WHERE event_id = ANY($1::text[])", event_ids
        )
        return found == len(set(event_ids))

    await eventually(done)


async def publish_together(
    kafka: Any, topic: Topic, records: list[tuple[Any, dict[str, Any]]]
) -> None:
    """Send without waiting in between, so that records tend to share a consumed batch."""
    futures = [await kafka.publisher.send(topic, key, value) for key, value in records]
    await asyncio.gather(*futures)


def membership_change(
    contact_id: int,
    group_id: int | None,
    state: str,
    changed_at: dt.datetime,
    version: int,
    *,
    kind: str = "membership",
    method: str | None = "system",
    email: str | None = None,
) -> dict[str, Any]:
    return change_record(
        kind,
        state=state,
        version=version,
        contact_id=contact_id,
        group_id=group_id,
        email=email,
        method=method,
        changed_at=changed_at,
    )


def delivery_result(
    contact_id: int,
    campaign_id: str,
    outcome: str,
    occurred_at: dt.datetime,
    result_id: str | None = None,
) -> dict[str, Any]:
    return {
        "result_id": result_id or str(uuid.uuid4()),
        "campaign_id": campaign_id,
        "contact_id": contact_id,
        "email": f"{contact_id}@example.jp",
        "outcome": outcome,
        "smtp_code": {"sent": 250, "permanent_error": 550, "temporary_error": 452}.get(outcome),
        "enhanced_code": None,
        "diagnostic": None,
        "relay": None,
        "message_id": None,
        "step_id": None,
        "suppressed_reason": "bounced" if outcome == "suppressed" else None,
        "occurred_at": occurred_at,
    }


def feedback(
    contact_id: int,
    campaign_id: str,
    kind: str,
    occurred_at: dt.datetime,
    event_id: str | None = None,
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "type": kind,
        "campaign_id": campaign_id,
        "contact_id": contact_id,
        "url": "https://shop.example.jp/sale" if kind == "click" else None,
        "user_agent": "Mozilla/5.0",
        "occurred_at": occurred_at,
    }


def bounce(
    contact_id: int,
    delivery_status: str | None,
    occurred_at: dt.datetime,
    *,
    action: str = "bounced",
    event_id: str | None = None,
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "contact_id": contact_id,
        "email": f"{contact_id}@example.jp",
        "campaign_id": None,
        "classification": delivery_status or "temporary_error",
        "hard": delivery_status in ("invalid_address", "error"),
        "action": action,
        "delivery_status": delivery_status,
        "diagnostic": None,
        "occurred_at": occurred_at,
    }


async def search_ids(api: Any, filter: Any) -> set[int]:
    body = await api.ok("POST", "/v1/contacts/search", {"filter": filter, "limit": 1000})
    assert body["total"] == len(body["items"])
    return {item["id"] for item in body["items"]}


async def test_membership_changes_answer_membership_and_delivery_state(contacts, kafka):
    api = contacts.api
    g1 = (await api.ok("POST", "/v1/groups", {"name": "メルマガ"}))["id"]
    g2 = (await api.ok("POST", "/v1/plans", {"name": "ステップ"}))["id"]
    p = [
        (await api.ok("POST", "/v1/contacts", {"email": f"p{i}@example.jp"}))["id"]
        for i in range(7)
    ]
    await api.ok("POST", f"/v1/groups/{g1}/members", {"contact_ids": p[:5]})
    await api.ok("POST", f"/v1/groups/{g2}/members", {"contact_ids": [p[2], p[3]]})
    # later than the joins: suppression answers after contacts asked it
    base = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=5)
    at = [base + dt.timedelta(minutes=k) for k in range(5)]

    changes = [
        membership_change(p[0], g1, "unsubscribed", at[1], 2, method="form"),
        membership_change(p[1], g1, "banned", at[1], 2),
        membership_change(p[2], g1, "unsubscribed", at[1], 2, method="form"),
        membership_change(p[2], g1, "deliverable", at[3], 4),
        membership_change(p[2], g1, "banned", at[2], 3),  # stale: older than what is held
        membership_change(p[2], g2, "unsubscribed", at[4], 2, method="auto_sync"),
        # other kinds are not about memberships and change none
        membership_change(p[3], None, "black", at[1], 1, kind="contact_black"),
        membership_change(p[3], g1, "bounced", at[1], 1, kind="address", email="p3@example.jp"),
        membership_change(p[3], g2, "left", at[2], 2),
        # a change for a membership contacts had not recorded yet creates it
        membership_change(p[5], g2, "unsubscribed", at[1], 2, method="upstream"),
    ]
    await publish_together(
        kafka, Topic.SUPPRESSION_CHANGES, [(c["contact_id"], c) for c in changes]
    )
    await consumed(contacts, [c["change_id"] for c in changes])

    state = {
        (r["contact_id"], r["group_id"]): (r["state"], r["method"], r["changed_at"])
        for r in await contacts.runtime.pool.fetch("SELECT * FROM membership")
    }
    assert {key: value[0] for key, value in state.items()} == {
        (p[0], g1): "unsubscribed",
        (p[1], g1): "banned",
        (p[2], g1): "deliverable",
        (p[3], g1): "deliverable",
        (p[4], g1): "deliverable",
        (p[2], g2): "unsubscribed",
        (p[5], g2): "unsubscribed",
    }
    assert state[(p[0], g1)][1:] == ("form", at[1])
    assert state[(p[2], g1)][1:] == ("system", at[3])
    fetched = await api.ok("GET", f"/v1/contacts/{p[5]}")
    assert [(m["group_id"], m["state"], m["method"]) for m in fetched["memberships"]] == [
        (g2, "unsubscribed", "upstream")
    ]
    dead = await kafka.read_to_end(Topic.SUPPRESSION_CHANGES.dlq)
    assert dead == []

    expected = [
        ({"membership": {"group_id": g1, "state": "unsubscribed"}}, {p[0]}),
        ({"membership": {"group_id": g1, "state": "banned"}}, {p[1]}),
        ({"membership": {"group_id": g1, "state": "deliverable"}}, {p[2], p[3], p[4]}),
        ({"membership": {"group_id": g1}}, set(p[:5])),
        ({"membership": {"group_id": g2, "state": "member"}}, {p[2], p[5]}),
        ({"membership": {"group_id": g2, "state": "not_member"}}, {p[0], p[1], p[3], p[4], p[6]}),
        ({"delivery_state": "all_deliverable"}, {p[3], p[4]}),
        ({"delivery_state": "any_unsubscribed"}, {p[0], p[2], p[5]}),
        ({"delivery_state": "any_banned"}, {p[1]}),
        ({"not": {"delivery_state": "all_deliverable"}}, {p[0], p[1], p[2], p[5], p[6]}),
        (
            {
                "all": [
                    {"membership": {"group_id": g1, "state": "deliverable"}},
                    {"delivery_state": "any_unsubscribed"},
                ]
            },
            {p[2]},
        ),
    ]
    for filter, ids in expected:
        assert await search_ids(api, filter) == ids, filter
    status, answer = await api.call(
        "POST", "/v1/contacts/search", {"filter": {"delivery_state": "some_deliverable"}}
    )
    assert (status, answer["field"]) == (400, "filter.delivery_state")


async def test_history_score_and_delivery_status(contacts, kafka):
    api = contacts.api
    h = [
        (await api.ok("POST", "/v1/contacts", {"email": f"h{i}@example.jp"}))["id"]
        for i in range(5)
    ]
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ago = lambda **kw: now - dt.timedelta(**kw)  # noqa: E731
    a, b = str(uuid.uuid4()), str(uuid.uuid4())

    results = [
        delivery_result(h[0], a, "sent", ago(days=1), result_id="r-h0-a"),
        delivery_result(h[1], a, "permanent_error", ago(days=1)),
        delivery_result(h[1], b, "temporary_error", ago(days=40)),
        delivery_result(h[2], b, "sent", ago(days=40)),
        delivery_result(h[3], a, "suppressed", ago(days=1)),  # never reached the reader
        delivery_result(h[3], b, "policy_error", ago(days=1)),  # after it on the same key
        delivery_result(h[4], a, "sent", ago(days=1)),
        delivery_result(h[0], a, "sent", ago(days=1), result_id="r-h0-a"),  # redelivered
    ]
    await publish_together(kafka, Topic.DELIVERY_RESULTS, [(r["contact_id"], r) for r in results])
    events = [
        feedback(h[0], a, "open", ago(hours=2), event_id="open-1"),
        feedback(h[0], a, "open", ago(hours=1)),
        feedback(h[0], a, "click", ago(hours=1)),
        feedback(h[0], a, "open", ago(hours=2), event_id="open-1"),  # the same open again
        feedback(h[2], b, "open", ago(days=100)),  # outside the 90-day score window
        feedback(h[2], b, "click", ago(days=40)),
        feedback(h[4], a, "open", ago(days=2)),
    ]
    await publish_together(kafka, Topic.FEEDBACK_EVENTS, [(e["contact_id"], e) for e in events])
    bounces = [
        bounce(h[1], "invalid_address", ago(days=1)),
        bounce(h[1], "invalid_address", ago(days=1)),  # already so: no change to publish
        bounce(h[3], None, ago(days=1), action="counted"),  # status unchanged
        bounce(h[4], "temporary_error", ago(days=1), action="counted"),
        bounce(h[4], "ok", ago(hours=1), action="reset"),
    ]
    await publish_together(kafka, Topic.BOUNCE_EVENTS, [(e["contact_id"], e) for e in bounces])
    # a suppressed result is not history and claims nothing; the next one on its key does
    await consumed(
        contacts,
        [r["result_id"] for r in results if r["outcome"] != "suppressed"]
        + [e["event_id"] for e in events]
        + [e["event_id"] for e in bounces],
    )

    # F-08: 1 point per open, 3 per click, last 90 days, each event once
    scores = {
        r["id"]: r["score"]
        for r in await contacts.runtime.pool.fetch("SELECT id, score FROM contact")
    }
    assert scores == {h[0]: 1 + 1 + 3, h[1]: 0, h[2]: 3, h[3]: 0, h[4]: 1}
    assert (await api.ok("GET", f"/v1/contacts/{h[0]}"))["score"] == 5
    assert await search_ids(api, {"field": "score", "op": "gte", "value": 3}) == {h[0], h[2]}

    def history(event: str, **spec: Any) -> dict[str, Any]:
        return {"history": {"event": event, **spec}}

    expected = [
        (history("received", campaign_id=a), {h[0], h[4]}),
        (history("received"), {h[0], h[2], h[4]}),
        (history("received", within_days=30), {h[0], h[4]}),
        (history("received", campaign_ids=[b]), {h[2]}),
        (history("received", campaign_id=a, negate=True), {h[1], h[2], h[3]}),
        (history("errored", campaign_id=a), {h[1]}),
        (history("errored", campaign_id=b), {h[1], h[3]}),
        (history("errored", within_days=30), {h[1], h[3]}),
        (history("errored", negate=True), {h[0], h[2], h[4]}),
        (history("opened", campaign_id=a), {h[0], h[4]}),
        (history("opened"), {h[0], h[2], h[4]}),
        (history("opened", within_days=30), {h[0], h[4]}),
        # h[2] clicked campaign b 40 days ago: a click implies an open
        (history("opened", campaign_id=b, within_days=90), {h[2]}),
        (history("opened", within_days=30, negate=True), {h[1], h[2], h[3]}),
        (history("clicked"), {h[0], h[2]}),
        (history("clicked", within_days=7), {h[0]}),
        (history("clicked", campaign_id=a, negate=True), {h[1], h[2], h[3], h[4]}),
        (
            {
                "all": [
                    history("received", campaign_id=a),
                    history("clicked", campaign_id=a, negate=True),
                ]
            },
            {h[4]},
        ),
    ]
    for filter, ids in expected:
        assert await search_ids(api, filter) == ids, filter
    rows = await contacts.runtime.pool.fetch(
        "SELECT contact_id, kind, count FROM delivery_history WHERE campaign_id = $1", a
    )
    assert sorted((r["contact_id"], r["kind"], r["count"]) for r in rows) == sorted(
        [
            (h[0], "received", 1),
            (h[0], "opened", 2),
            (h[0], "clicked", 1),
            (h[1], "errored", 1),
            (h[4], "received", 1),
            (h[4], "opened", 1),
        ]
    )
    status, answer = await api.call("POST", "/v1/contacts/search", {"filter": history("bounced")})
    assert (status, answer["field"]) == (400, "filter.history.event")

    # F-32: delivery_status as bounce_processor decides it, published on the changelog
    statuses = {
        r["id"]: r["delivery_status"]
        for r in await contacts.runtime.pool.fetch("SELECT id, delivery_status FROM contact")
    }
    assert statuses == {
        h[0]: "unconfirmed",
        h[1]: "invalid_address",
        h[2]: "unconfirmed",
        h[3]: "unconfirmed",
        h[4]: "ok",
    }
    assert await search_ids(
        api, {"field": "delivery_status", "op": "eq", "value": "アドレス不正"}
    ) == {h[1]}
    changes = by_contact(await published(contacts, kafka, Topic.CONTACTS_CHANGELOG))
    assert [
        (c["version"], c["contact"]["delivery_status"], c["contact"]["score"])
        for c in changes[h[1]]
    ] == [(1, "unconfirmed", 0), (2, "invalid_address", 0)]
    assert [c["version"] for c in changes[h[3]]] == [1]
    for contact_id in h:  # the last record holds the final state
        last = changes[contact_id][-1]["contact"]
        assert (last["score"], last["delivery_status"]) == (
            scores[contact_id],
            statuses[contact_id],
        ), contact_id
    assert [c["version"] for c in changes[h[4]]] == list(range(1, len(changes[h[4]]) + 1))
    assert {"temporary_error", "ok"} <= {c["contact"]["delivery_status"] for c in changes[h[4]]}


async def test_a_click_counts_as_an_open_for_the_opened_conditions(contacts, kafka):
    """Images blocked, link clicked: the reader opened the mail. Opened / not-opened see the
    click (a not_opened re-send must not go to people who clicked), while the history keeps
    the raw number of pixel loads."""
    api = contacts.api
    reader, pixel, nobody = [
        (await api.ok("POST", "/v1/contacts", {"email": f"c{i}@example.jp"}))["id"]
        for i in range(3)
    ]
    campaign = str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC)
    results = [delivery_result(c, campaign, "sent", now) for c in (reader, pixel, nobody)]
    await publish_together(kafka, Topic.DELIVERY_RESULTS, [(r["contact_id"], r) for r in results])
    events = [
        feedback(reader, campaign, "click", now),
        feedback(pixel, campaign, "open", now),
    ]
    await publish_together(kafka, Topic.FEEDBACK_EVENTS, [(e["contact_id"], e) for e in events])
    await consumed(contacts, [r["result_id"] for r in results] + [e["event_id"] for e in events])
    opened = {"history": {"event": "opened", "campaign_id": campaign}}
    assert await search_ids(api, opened) == {reader, pixel}
    not_opened = {"history": {"event": "opened", "campaign_id": campaign, "negate": True}}
    received = {"history": {"event": "received", "campaign_id": campaign}}
    assert await search_ids(api, {"all": [received, not_opened]}) == {nobody}

    later = feedback(reader, campaign, "open", now)  # the images loaded after all
    await publish_together(kafka, Topic.FEEDBACK_EVENTS, [(reader, later)])
    await consumed(contacts, [later["event_id"]])
    counts = {
        (r["contact_id"], r["kind"]): r["count"]
        for r in await contacts.runtime.pool.fetch(
            "SELECT contact_id, kind, count FROM delivery_history WHERE campaign_id = $1",
            campaign,
        )
    }
    assert counts[(reader, "opened")] == 1 and counts[(reader, "clicked")] == 1
    assert counts[(pixel, "opened")] == 1 and (nobody, "opened") not in counts


async def test_delivery_results_count_each_result_once_across_batches(contacts, kafka):
    """The result ids are claimed in the statement that records them: a result redelivered
    in a later batch, or twice in one, adds nothing; a new result of the same contact and
    campaign counts."""
    contact = (await contacts.api.ok("POST", "/v1/contacts", {"email": "once@example.jp"}))["id"]
    campaign = str(uuid.uuid4())
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=3)
    first = delivery_result(contact, campaign, "sent", at, result_id="r-once-1")
    await kafka.send(Topic.DELIVERY_RESULTS, contact, first)
    await consumed(contacts, ["r-once-1"])
    again = [
        first,
        delivery_result(contact, campaign, "sent", at + dt.timedelta(hours=1), "r-once-2"),
        delivery_result(contact, campaign, "sent", at + dt.timedelta(hours=1), "r-once-2"),
    ]
    await publish_together(kafka, Topic.DELIVERY_RESULTS, [(contact, r) for r in again])
    await consumed(contacts, ["r-once-2"])
    row = await contacts.runtime.pool.fetchrow(
        "SELECT count, first_at, last_at FROM delivery_history"
        " WHERE contact_id = $1 AND campaign_id = $2 AND kind = 'received'",
        contact,
        campaign,
    )
    assert dict(row) == {"count": 2, "first_at": at, "last_at": at + dt.timedelta(hours=1)}
