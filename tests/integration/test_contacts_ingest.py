"""contacts.events → PostgreSQL → contacts.changelog, through the real broker and database."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from libs.common import avro
from libs.common.topics import Topic
from services.contacts import store
from services.contacts.processor import ContactPatch
from tests.conftest import eventually

NOW = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)


def upserted(
    email: str | None = None,
    external_id: str | None = None,
    event_id: str | None = None,
    **contact: Any,
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "type": "ContactUpserted",
        "occurred_at": NOW,
        "source": "test",
        "external_id": external_id,
        "email": email,
        "contact": contact or None,
        "membership": None,
    }


async def _contact(service, email: str) -> dict[str, Any] | None:
    row = await service.runtime.pool.fetchrow("SELECT * FROM contact WHERE email = $1", email)
    return dict(row) if row else None


async def test_event_becomes_row_and_changelog(contacts, kafka):
    event = upserted(
        "Taro.Yamada@Example.CO.JP ",
        external_id="SYN-1",
        name="山田 太郎",
        name_kana="ヤマダ タロウ",
        tags=["vip", "展示会"],
        sales_status="返信済",
    )
    await kafka.send(Topic.CONTACTS_EVENTS, "SYN-1", event)

    row = await eventually(lambda: _contact(contacts, "Taro.Yamada@example.co.jp"))
    assert row["external_id"] == "SYN-1"
    assert row["name"] == "山田 太郎"
    assert row["tags"] == ["vip", "展示会"]
    assert row["sales_status"] == "replied"

    changes = await kafka.read(Topic.CONTACTS_CHANGELOG, until=lambda r: len(r) >= 1)
    assert changes[0]["contact_id"] == row["id"]
    assert changes[0]["op"] == "upserted"
    assert changes[0]["contact"]["email"] == "Taro.Yamada@example.co.jp"
    assert changes[0]["contact"]["name_kana"] == "ヤマダ タロウ"


async def test_same_event_twice_has_one_effect(contacts, kafka):
    event = upserted("hanako@example.jp", event_id="evt-dup-1", tags=["a"])
    await kafka.send(Topic.CONTACTS_EVENTS, "hanako@example.jp", event)
    await kafka.send(Topic.CONTACTS_EVENTS, "hanako@example.jp", event)
    # A later, different event for the same key proves both copies were consumed.
    await kafka.send(
        Topic.CONTACTS_EVENTS, "hanako@example.jp", upserted("hanako@example.jp", memo="後")
    )

    row = await eventually(lambda: _contact(contacts, "hanako@example.jp"))
    row = await eventually(
        lambda: _ready(contacts, "hanako@example.jp", lambda r: r["memo"] == "後")
    )
    assert row["version"] == 2  # created once, updated once: the duplicate did nothing
    changes = await kafka.read(Topic.CONTACTS_CHANGELOG, until=lambda r: len(r) >= 2)
    assert [c["version"] for c in changes] == [1, 2]


async def _ready(service, email, predicate):
    row = await _contact(service, email)
    return row if row and predicate(row) else None


async def test_poison_event_goes_to_dlq_and_next_is_processed(contacts, kafka):
    await kafka.send_raw(Topic.CONTACTS_EVENTS, "x", b"\x00not avro at all")
    await kafka.send(Topic.CONTACTS_EVENTS, "bad@", upserted("not-an-address"))
    await kafka.send(Topic.CONTACTS_EVENTS, "ok@example.jp", upserted("ok@example.jp", name="次"))

    row = await eventually(lambda: _contact(contacts, "ok@example.jp"))
    assert row["name"] == "次"
    dead = await kafka.read(Topic.CONTACTS_EVENTS.dlq, until=lambda r: len(r) >= 2)
    by_stage = {dict(r.headers)["dlq-stage"]: r for r in dead}  # two keys: two partitions
    assert by_stage.keys() == {b"decode", b"process"}
    assert by_stage[b"decode"].value == b"\x00not avro at all"
    process = dict(by_stage[b"process"].headers)
    assert b"is not an email address" in process["dlq-reason"]
    assert process["dlq-offset"].isdigit()
    assert process["dlq-topic"].endswith(b"contacts.events")


async def test_null_leaves_unchanged_and_empty_string_clears(contacts, kafka):
    await kafka.send(
        Topic.CONTACTS_EVENTS,
        "E-7",
        upserted(
            "keep@example.jp", external_id="E-7", company="株式会社テスト", phone="03-0000-0000"
        ),
    )
    await kafka.send(
        Topic.CONTACTS_EVENTS, "E-7", upserted(external_id="E-7", phone="", title="部長")
    )
    row = await eventually(
        lambda: _ready(contacts, "keep@example.jp", lambda r: r["title"] == "部長")
    )
    assert row["company"] == "株式会社テスト"
    assert row["phone"] is None


async def test_delete_and_membership_events(contacts, kafka):
    group = await contacts.api.ok("POST", "/v1/groups", {"name": "メルマガ"})
    await kafka.send(Topic.CONTACTS_EVENTS, "m@example.jp", upserted("m@example.jp"))
    await kafka.send(
        Topic.CONTACTS_EVENTS,
        "m@example.jp",
        {
            **upserted("m@example.jp"),
            "type": "MembershipRequested",
            "contact": None,
            "membership": {"group_id": group["id"], "auto_stop": True},
        },
    )
    await kafka.send(Topic.CONTACTS_EVENTS, "gone@example.jp", upserted("gone@example.jp"))
    await kafka.send(
        Topic.CONTACTS_EVENTS,
        "gone@example.jp",
        {**upserted("gone@example.jp"), "type": "ContactDeleted", "contact": None},
    )

    async def joined():
        return await contacts.runtime.pool.fetchrow(
            "SELECT m.* FROM membership m JOIN contact c ON c.id = m.contact_id WHERE c.email = $1",
            "m@example.jp",
        )

    membership = await eventually(joined)
    assert membership["state"] == "unsubscribed"
    assert membership["method"] == "auto_stop"
    commands = await kafka.read(Topic.SUPPRESSION_COMMANDS, until=lambda r: len(r) >= 1)
    assert commands[0]["type"] == "Join"
    assert commands[0]["group_id"] == group["id"]
    assert commands[0]["method"] == "auto_stop"

    async def deleted():
        changes = await kafka.read(
            Topic.CONTACTS_CHANGELOG, until=lambda r: any(c["op"] == "deleted" for c in r)
        )
        return changes

    changes = await deleted()
    assert await _contact(contacts, "gone@example.jp") is None
    gone = next(c["contact_id"] for c in changes if c["op"] == "deleted")
    assert [c["op"] for c in changes if c["contact_id"] == gone] == ["upserted", "deleted"]


async def test_a_batch_keeps_per_key_order_adopts_known_addresses_and_refuses_conflicts(
    contacts, kafka
):
    known = await contacts.api.ok(
        "POST", "/v1/contacts", {"email": "known@example.jp", "name": "既存"}
    )
    events = [
        ("K-1", upserted("first@example.jp", external_id="K-1", name="一")),
        ("K-1", upserted(external_id="K-1", name="二")),  # same key again: later wins
        ("K-2", upserted("known@example.jp", external_id="K-2")),  # adopts the API's contact
        ("K-3", upserted("known@example.jp", external_id="K-3")),  # address taken by K-2: refused
        ("K-1", {**upserted(external_id="K-1"), "type": "ContactDeleted"}),
        ("K-1", upserted("first@example.jp", external_id="K-1", name="三")),  # created anew
        ("K-4", upserted("last@example.jp", external_id="K-4")),
    ]
    for _key, event in events:
        await kafka.send(Topic.CONTACTS_EVENTS, "same-partition", event)  # one partition, in order

    await eventually(lambda: _contact(contacts, "last@example.jp"))
    adopted = await _contact(contacts, "known@example.jp")
    assert adopted["id"] == known["id"]
    assert adopted["external_id"] == "K-2"
    assert adopted["name"] == "既存"
    recreated = await _contact(contacts, "first@example.jp")
    assert recreated["name"] == "三"
    assert recreated["version"] == 1
    assert (
        await contacts.runtime.pool.fetchval(
            "SELECT count(*) FROM contact WHERE external_id = 'K-3'"
        )
        == 0
    )

    dead = await kafka.read(Topic.CONTACTS_EVENTS.dlq, until=lambda r: len(r) >= 1)
    assert len(dead) == 1
    assert b"K-2" in dict(dead[0].headers)["dlq-reason"]


async def test_a_rejected_event_rolls_back_its_batch_claims_and_the_rest_is_applied(
    contacts, kafka
):
    """The batch's ids are claimed while it is validated: the bad event in the middle
    must not leave the good ones around it claimed but unapplied."""
    first, bad, last = (str(uuid.uuid4()) for _ in range(3))
    events = [
        upserted("one@example.jp", event_id=first, name="一"),
        upserted("two@example.jp", event_id=bad, custom_fields={"nope": "x"}),
        upserted("three@example.jp", event_id=last, name="三"),
        upserted("one@example.jp", event_id=first, name="重複"),  # redelivered copy: no effect
        {**upserted("four@example.jp"), "event_id": "  "},  # no usable id: rejected too
    ]
    for event in events:
        await kafka.send(Topic.CONTACTS_EVENTS, "same-partition", event)

    dead = await kafka.read(Topic.CONTACTS_EVENTS.dlq, until=lambda r: len(r) >= 2)
    assert [dict(r.headers)["dlq-reason"] for r in dead] == [
        b"unknown custom field 'nope' (known: none defined)",
        b"event_id is required",
    ]
    assert (await _contact(contacts, "one@example.jp"))["name"] == "一"
    assert (await _contact(contacts, "one@example.jp"))["version"] == 1
    assert (await _contact(contacts, "three@example.jp"))["name"] == "三"
    assert await _contact(contacts, "two@example.jp") is None
    claimed = await contacts.runtime.pool.fetch(
        "SELECT event_id FROM processed_event WHERE event_id = ANY($1::text[])", [first, bad, last]
    )
    assert {r["event_id"] for r in claimed} == {first, last}


async def test_a_custom_field_defined_elsewhere_since_the_cache_was_read(contacts, kafka):
    """Another replica defined it (no invalidation here): the batch reads the fields again."""
    await kafka.send(Topic.CONTACTS_EVENTS, "k", upserted("warm@example.jp"))
    await eventually(lambda: _contact(contacts, "warm@example.jp"))  # fields are cached now
    await contacts.runtime.pool.execute(
        "INSERT INTO field_definition (key, label, type) VALUES ('rank', 'ランク', 'number')"
    )
    await kafka.send(
        Topic.CONTACTS_EVENTS, "k", upserted("ranked@example.jp", custom_fields={"rank": "3"})
    )
    row = await eventually(lambda: _contact(contacts, "ranked@example.jp"))
    assert row["custom"] == {"rank": 3}
    assert await kafka.read_to_end(Topic.CONTACTS_EVENTS.dlq) == []


async def test_new_contacts_inserted_in_chunks_each_get_their_row_and_changelog(
    contacts, monkeypatch
):
    """upsert_run inserts new contacts a chunk at a time, encoding the changelog of one chunk
    while the next is inserted: every patch gets its own row and one queued record, in order."""
    monkeypatch.setattr(store, "INSERT_CHUNK", 3)
    patches = [
        ContactPatch(columns={"email": f"c{i}@example.jp", "name": f"名{i}"}) for i in range(8)
    ]
    async with contacts.runtime.pool.acquire() as conn, conn.transaction():
        outcomes = await store.upsert_run(conn, patches)
        queued = await conn.fetch(
            "SELECT key, payload, schema_version FROM outbox"
            " WHERE topic = 'contacts.changelog' ORDER BY id"
        )
    assert [o[0] for o in outcomes] == ["inserted"] * 8
    assert [o[1]["email"] for o in outcomes] == [p.email for p in patches]
    assert [o[1]["name"] for o in outcomes] == [f"名{i}" for i in range(8)]
    records = [
        avro.decode(
            Topic.CONTACTS_CHANGELOG,
            r["payload"],
            [(avro.VERSION_HEADER, str(r["schema_version"]).encode())],
        )
        for r in queued
    ]
    assert [r["key"] for r in queued] == [str(o[1]["id"]) for o in outcomes]
    assert [r["contact"]["email"] for r in records] == [p.email for p in patches]
