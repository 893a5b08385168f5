"""The contacts HTTP API end to end: real service, real PostgreSQL, real Kafka-protocol broker.

Contacts, custom fields, groups and plans with their members, saved filters (F-06), bulk
actions (F-07), roles, the operational endpoints, and search over HTTP (F-05).
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from typing import Any

import aiohttp

from libs.common.topics import Topic
from tests.conftest import ADMIN_TOKEN, OPERATOR_TOKEN, VIEWER_TOKEN, eventually

# Helpers (the projection and snapshot tests import them too) ----------------------------


async def outbox_drained(service: Any) -> None:
    """Until the service's outbox holds nothing: every committed change is on the broker."""

    async def empty() -> bool:
        return await service.runtime.pool.fetchval("SELECT count(*) = 0 FROM outbox")

    await eventually(empty)


async def published(service: Any, kafka: Any, topic: Topic) -> list[dict[str, Any]]:
    """What ``service`` has published on ``topic`` so far (through its outbox)."""
    await outbox_drained(service)
    return await kafka.read_to_end(topic)


def by_contact(changes: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Changelog records grouped by contact, in the order published (one key, one partition)."""
    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        grouped[change["contact_id"]].append(change)
    return dict(grouped)


async def define_fields(api: Any) -> None:
    await api.ok(
        "POST",
        "/v1/fields",
        {
            "key": "plan",
            "label": "プラン",
            "type": "choice",
            "choices": ["free", "premium", "business"],
        },
    )
    await api.ok("POST", "/v1/fields", {"key": "seats", "label": "席数", "type": "number"})


async def ids_of(api: Any, filter: Any, **extra: Any) -> list[int]:
    """Every contact id a search selects, in result order (one page of up to 1000)."""
    body = await api.ok("POST", "/v1/contacts/search", {"filter": filter, "limit": 1000, **extra})
    assert body["next_cursor"] is None
    assert body["total"] == len(body["items"])
    return [item["id"] for item in body["items"]]


# Contacts and custom fields ---------------------------------------------------------------


async def test_contact_lifecycle_validation_and_changelog(contacts, kafka):
    api = contacts.api
    await define_fields(api)
    await api.ok("POST", "/v1/fields", {"key": "member_since", "label": "入会日", "type": "date"})

    status, created = await api.call(
        "POST",
        "/v1/contacts",
        {
            "email": " Hanako.Yamada@Example.CO.JP ",
            "external_id": "SYN-1",
            "name": "山田 花子",
            "company": "株式会社さくら",
            "phone": "03-1234-5678",
            "tags": ["vip", "展示会"],
            "sales_status": "返信済",
            "star": True,
            "custom_fields": {"plan": "premium", "seats": "25", "member_since": "2024/04/01"},
        },
    )
    assert status == 201, created
    contact_id = created["id"]
    assert created["email"] == "Hanako.Yamada@example.co.jp"
    assert created["sales_status"] == "replied"
    assert created["tags"] == ["vip", "展示会"]
    assert created["custom_fields"] == {
        "plan": "premium",
        "seats": 25,
        "member_since": "2024-04-01",
    }
    assert (created["score"], created["delivery_status"], created["version"]) == (
        0,
        "unconfirmed",
        1,
    )

    fetched = await api.ok("GET", f"/v1/contacts/{contact_id}")
    assert fetched["memberships"] == []
    assert {k: fetched[k] for k in ("email", "name", "company", "star")} == {
        "email": "Hanako.Yamada@example.co.jp",
        "name": "山田 花子",
        "company": "株式会社さくら",
        "star": True,
    }

    # 409: the same address (the domain compares lower-cased) or the same external id
    for body in (
        {"email": "Hanako.Yamada@EXAMPLE.co.jp"},
        {"email": "other@example.jp", "external_id": "SYN-1"},
    ):
        status, answer = await api.call("POST", "/v1/contacts", body)
        assert status == 409, (body, answer)
    other = await api.ok("POST", "/v1/contacts", {"email": "other@example.jp"})
    status, _ = await api.call(
        "PATCH", f"/v1/contacts/{other['id']}", {"email": "Hanako.Yamada@example.co.jp"}
    )
    assert status == 409

    # 400 names the field at fault
    bad_bodies = {
        "email": {"email": "not-an-address"},
        "nickname": {"email": "n@example.jp", "nickname": "はな"},
        "score": {"email": "n@example.jp", "score": 100},
        "custom_fields.seats": {"email": "n@example.jp", "custom_fields": {"seats": "many"}},
        "custom_fields.plan": {"email": "n@example.jp", "custom_fields": {"plan": "gold"}},
        "custom_fields.member_since": {
            "email": "n@example.jp",
            "custom_fields": {"member_since": "2024-13-40"},
        },
        "custom_fields.unknown": {"email": "n@example.jp", "custom_fields": {"unknown": "x"}},
        "custom_fields": {"email": "n@example.jp", "custom_fields": ["premium"]},
        "star": {"email": "n@example.jp", "star": "maybe"},
        "tags": {"email": "n@example.jp", "tags": 5},
        "name": {"email": "n@example.jp", "name": ["山田"]},
        "sales_status": {"email": "n@example.jp", "sales_status": "won"},
    }
    for field, body in bad_bodies.items():
        status, answer = await api.call("POST", "/v1/contacts", body)
        assert (status, answer.get("field")) == (400, field), (body, answer)
    status, answer = await api.call("POST", "/v1/contacts", {"name": "no address"})
    assert (status, answer["field"]) == (400, "email")
    status, answer = await api.call("GET", "/v1/contacts/abc")
    assert (status, answer["field"]) == (400, "id")
    assert await contacts.runtime.pool.fetchval("SELECT count(*) FROM contact") == 2

    # PATCH: absent fields stay, "" clears, custom_fields merge key by key
    patched = await api.ok(
        "PATCH",
        f"/v1/contacts/{contact_id}",
        {"phone": "", "title": "課長", "custom_fields": {"seats": 30, "plan": ""}},
    )
    assert patched["phone"] is None
    assert patched["title"] == "課長"
    assert patched["company"] == "株式会社さくら"
    assert patched["custom_fields"] == {"seats": 30, "member_since": "2024-04-01"}
    assert patched["version"] == 2
    patched = await api.ok(
        "PATCH",
        f"/v1/contacts/{contact_id}",
        {"custom_fields": {"plan": "business"}, "tags": "vip,新規"},
    )
    assert patched["custom_fields"] == {
        "seats": 30,
        "member_since": "2024-04-01",
        "plan": "business",
    }
    assert patched["tags"] == ["vip", "新規"]
    status, answer = await api.call("PATCH", f"/v1/contacts/{contact_id}", {"seats": 3})
    assert (status, answer["field"]) == (400, "seats")

    # unknown ids
    for method, body in (("GET", None), ("PATCH", {"name": "x"}), ("DELETE", None)):
        status, _ = await api.call(method, "/v1/contacts/999999", body)
        assert status == 404, method

    status, _ = await api.call("DELETE", f"/v1/contacts/{contact_id}")
    assert status == 204
    status, _ = await api.call("GET", f"/v1/contacts/{contact_id}")
    assert status == 404
    status, _ = await api.call("DELETE", f"/v1/contacts/{contact_id}")
    assert status == 404

    history = by_contact(await published(contacts, kafka, Topic.CONTACTS_CHANGELOG))
    assert set(history) == {contact_id, other["id"]}
    mine = history[contact_id]
    assert [(c["op"], c["version"]) for c in mine] == [
        ("upserted", 1),
        ("upserted", 2),
        ("upserted", 3),
        ("deleted", 4),
    ]
    assert mine[0]["contact"]["custom_fields"] == {
        "plan": "premium",
        "seats": "25",
        "member_since": "2024-04-01",
    }
    assert mine[1]["contact"]["phone"] is None
    assert mine[1]["contact"]["title"] == "課長"
    assert mine[2]["contact"]["custom_fields"] == {
        "seats": "30",
        "member_since": "2024-04-01",
        "plan": "business",
    }
    assert mine[3]["contact"] is None


async def test_custom_field_definitions_need_admin(contacts):
    api = contacts.api
    field = {"key": "rank", "label": "ランク", "type": "choice", "choices": ["A", "B"]}
    for token in (OPERATOR_TOKEN, VIEWER_TOKEN):
        status, _ = await api.call("POST", "/v1/fields", field, token=token)
        assert status == 403
    status, created = await api.call("POST", "/v1/fields", field)
    assert status == 201
    assert created == field
    status, _ = await api.call("POST", "/v1/fields", {**field, "label": "別名"})
    assert status == 409

    bad = {
        "type": {"key": "budget", "label": "予算", "type": "money"},
        "key": {"key": "Budget", "label": "予算", "type": "number"},
        "label": {"key": "budget", "label": " ", "type": "number"},
        "choices": {"key": "size", "label": "規模", "type": "choice", "choices": []},
    }
    for name, body in bad.items():
        status, answer = await api.call("POST", "/v1/fields", body)
        assert (status, answer.get("field")) == (400, name), body

    await api.ok("POST", "/v1/fields", {"key": "budget", "label": "予算", "type": "number"})
    listed = await api.ok("GET", "/v1/fields", token=VIEWER_TOKEN)
    assert [f["key"] for f in listed["items"]] == ["rank", "budget"]

    # a field is usable as soon as it is defined
    contact = await api.ok(
        "POST",
        "/v1/contacts",
        {"email": "f@example.jp", "custom_fields": {"rank": "B", "budget": "1,500,000"}},
    )
    assert contact["custom_fields"] == {"rank": "B", "budget": 1500000}


# Groups, plans, members ------------------------------------------------------------------


async def test_groups_plans_and_members(contacts, kafka):
    api = contacts.api
    people = [await api.ok("POST", "/v1/contacts", {"email": f"m{i}@example.jp"}) for i in range(3)]
    m0, m1, m2 = (p["id"] for p in people)

    status, group = await api.call(
        "POST", "/v1/groups", {"name": "ニュース", "description": "週刊"}
    )
    assert status == 201
    assert (group["kind"], group["name"], group["description"]) == ("group", "ニュース", "週刊")
    status, _ = await api.call("POST", "/v1/groups", {"name": " ニュース "})
    assert status == 409
    status, plan = await api.call("POST", "/v1/plans", {"name": "ニュース"})  # another kind
    assert (status, plan["kind"]) == (201, "plan")
    status, _ = await api.call("POST", "/v1/plans", {"name": "ニュース"})
    assert status == 409
    status, answer = await api.call("POST", "/v1/groups", {"name": ""})
    assert (status, answer["field"]) == (400, "name")

    members = f"/v1/groups/{group['id']}/members"
    assert await api.ok("POST", members, {"contact_ids": [m0, m1]}) == {
        "group_id": group["id"],
        "joined": 2,
        "already_members": 0,
    }
    assert await api.ok("POST", members, {"contact_ids": [m0, m1, m2]}) == {
        "group_id": group["id"],
        "joined": 1,
        "already_members": 2,
    }
    assert await api.ok("POST", members, {"contact_ids": [m0, m1, m2]}) == {
        "group_id": group["id"],
        "joined": 0,
        "already_members": 3,
    }
    status, _ = await api.call("POST", members, {"contact_ids": [m0, 999999]})
    assert status == 404
    status, _ = await api.call("POST", "/v1/groups/999999/members", {"contact_ids": [m0]})
    assert status == 404
    status, answer = await api.call("POST", members, {"contact_ids": []})
    assert (status, answer["field"]) == (400, "contact_ids")
    assert await api.ok(
        "POST", f"/v1/groups/{plan['id']}/members", {"contact_ids": [m2], "auto_stop": True}
    ) == {"group_id": plan["id"], "joined": 1, "already_members": 0}

    groups = await api.ok("GET", "/v1/groups", token=VIEWER_TOKEN)
    assert [(g["id"], g["name"], g["members"]) for g in groups["items"]] == [
        (group["id"], "ニュース", 3)
    ]
    plans = await api.ok("GET", "/v1/plans")
    assert [(p["id"], p["members"]) for p in plans["items"]] == [(plan["id"], 1)]
    names = await api.ok("GET", "/v1/groups?members=false", token=VIEWER_TOKEN)
    assert [(g["id"], g["name"], g["members"]) for g in names["items"]] == [
        (group["id"], "ニュース", None)
    ]
    fetched = await api.ok("GET", f"/v1/contacts/{m2}")
    assert [
        (m["group_id"], m["kind"], m["state"], m["method"]) for m in fetched["memberships"]
    ] == [
        (group["id"], "group", "deliverable", "system"),
        (plan["id"], "plan", "unsubscribed", "auto_stop"),
    ]

    # one Join command per new membership, none for the repeated joins or the refused call
    commands = await published(contacts, kafka, Topic.SUPPRESSION_COMMANDS)
    assert sorted(
        (c["type"], c["contact_id"], c["email"], c["group_id"], c["state"], c["method"], c["actor"])
        for c in commands
    ) == sorted(
        [
            ("Join", m0, "m0@example.jp", group["id"], "deliverable", "system", "operator"),
            ("Join", m1, "m1@example.jp", group["id"], "deliverable", "system", "operator"),
            ("Join", m2, "m2@example.jp", group["id"], "deliverable", "system", "operator"),
            ("Join", m2, "m2@example.jp", plan["id"], "unsubscribed", "auto_stop", "operator"),
        ]
    )
    assert len({c["command_id"] for c in commands}) == 4


async def test_saved_filters_global_and_group_scoped(contacts):
    api = contacts.api
    group = await api.ok("POST", "/v1/groups", {"name": "セミナー"})
    other_group = await api.ok("POST", "/v1/groups", {"name": "展示会"})
    vip_member = await api.ok("POST", "/v1/contacts", {"email": "a@example.jp", "tags": ["vip"]})
    vip_outside = await api.ok("POST", "/v1/contacts", {"email": "b@example.jp", "tags": ["vip"]})
    await api.ok("POST", "/v1/contacts", {"email": "c@example.jp"})
    await api.ok("POST", f"/v1/groups/{group['id']}/members", {"contact_ids": [vip_member["id"]]})

    vip = {"field": "tags", "op": "include_any", "value": ["vip"]}
    status, global_filter = await api.call("POST", "/v1/filters", {"name": "VIP", "filter": vip})
    assert status == 201
    assert (global_filter["group_id"], global_filter["filter"]) == (None, vip)
    in_group = {"all": [{"membership": {"group_id": group["id"]}}, vip]}
    status, scoped = await api.call(
        "POST", "/v1/filters", {"name": "VIP", "group_id": group["id"], "filter": in_group}
    )  # same name, other scope
    assert status == 201
    status, _ = await api.call("POST", "/v1/filters", {"name": "VIP", "filter": vip})
    assert status == 409
    status, _ = await api.call(
        "POST", "/v1/filters", {"name": "x", "group_id": 999999, "filter": vip}
    )
    assert status == 404
    status, answer = await api.call(
        "POST",
        "/v1/filters",
        {"name": "bad", "filter": {"field": "tags", "op": "eq", "value": "vip"}},
    )
    assert (status, answer["field"]) == (400, "filter.op")
    # a global filter cannot lean on a group-scoped one
    status, answer = await api.call(
        "POST", "/v1/filters", {"name": "wrapper", "filter": {"saved_filter": scoped["id"]}}
    )
    assert (status, answer["field"]) == (400, "filter.saved_filter")

    listed = await api.ok("GET", "/v1/filters", token=VIEWER_TOKEN)
    assert [f["id"] for f in listed["items"]] == [global_filter["id"]]
    listed = await api.ok("GET", f"/v1/filters?group_id={group['id']}")
    assert [f["id"] for f in listed["items"]] == [global_filter["id"], scoped["id"]]
    listed = await api.ok("GET", f"/v1/filters?group_id={other_group['id']}")
    assert [f["id"] for f in listed["items"]] == [global_filter["id"]]
    assert (await api.ok("GET", f"/v1/filters/{scoped['id']}"))["filter"] == in_group

    # the global filter works anywhere, with or without a group
    expected = sorted([vip_member["id"], vip_outside["id"]])
    assert await ids_of(api, {"saved_filter": global_filter["id"]}) == expected
    assert (
        await ids_of(api, {"saved_filter": global_filter["id"]}, group_id=group["id"]) == expected
    )

    # the scoped one only inside its group
    for extra in ({}, {"group_id": other_group["id"]}):
        status, answer = await api.call(
            "POST",
            "/v1/contacts/search",
            {"filter": {"all": [{"saved_filter": scoped["id"]}]}, **extra},
        )
        assert status == 400, extra
        assert answer["field"] == "filter.all[0].saved_filter"
        assert f"scoped to group {group['id']}" in answer["error"]
    assert await ids_of(api, {"saved_filter": scoped["id"]}, group_id=group["id"]) == [
        vip_member["id"]
    ]

    status, answer = await api.call(
        "POST", "/v1/contacts/search", {"filter": {"saved_filter": 999999}}
    )
    assert status == 400
    status, _ = await api.call("DELETE", f"/v1/filters/{global_filter['id']}")
    assert status == 204
    status, _ = await api.call("GET", f"/v1/filters/{global_filter['id']}")
    assert status == 404


# Bulk actions (F-07) ---------------------------------------------------------------------


async def test_bulk_actions_by_ids_and_by_filter(contacts, kafka):
    api = contacts.api
    seed = [["a"], [], ["a", "x"], ["x"], []]
    b0, b1, b2, b3, b4 = [
        (await api.ok("POST", "/v1/contacts", {"email": f"b{i}@example.jp", "tags": tags}))["id"]
        for i, tags in enumerate(seed)
    ]

    async def bulk(body: dict[str, Any], token: str = ADMIN_TOKEN) -> tuple[int, Any]:
        return await api.call("POST", "/v1/contacts/bulk", body, token=token)

    async def state() -> dict[int, tuple[list[str], bool]]:
        rows = await contacts.runtime.pool.fetch("SELECT id, tags, star FROM contact ORDER BY id")
        return {r["id"]: (list(r["tags"]), r["star"]) for r in rows}

    tagged = lambda tag: {"field": "tags", "op": "include_any", "value": [tag]}  # noqa: E731

    assert await bulk({"action": "add_tag", "tag": " a ", "ids": [b0, b1, b4]}) == (
        200,
        {"action": "add_tag", "selected": 3, "affected": 2},
    )
    assert await bulk(
        {"action": "remove_tag", "tag": "x", "filter": tagged("x")}, OPERATOR_TOKEN
    ) == (200, {"action": "remove_tag", "selected": 2, "affected": 2})
    assert await bulk({"action": "star", "filter": tagged("a")}) == (
        200,
        {"action": "star", "selected": 4, "affected": 4},
    )
    assert await bulk({"action": "unstar", "ids": [b0, b3]}) == (
        200,
        {"action": "unstar", "selected": 2, "affected": 1},
    )
    assert await state() == {
        b0: (["a"], False),
        b1: (["a"], True),
        b2: (["a"], True),
        b3: ([], False),
        b4: (["a"], True),
    }

    starred = {"field": "star", "op": "eq", "value": True}
    status, _ = await bulk({"action": "delete", "filter": starred}, OPERATOR_TOKEN)
    assert status == 403
    status, _ = await bulk({"action": "star", "ids": [b0]}, VIEWER_TOKEN)
    assert status == 403
    for body, field in (
        ({"action": "explode", "ids": [b0]}, "action"),
        ({"action": "add_tag", "ids": [b0]}, "tag"),
        ({"action": "star", "ids": [b0], "filter": starred}, "ids"),
        ({"action": "star"}, "ids"),
        ({"action": "star", "ids": [str(b0)]}, "ids"),
        (
            {"action": "star", "filter": {"field": "stars", "op": "eq", "value": True}},
            "filter.field",
        ),
    ):
        status, answer = await bulk(body)
        assert (status, answer.get("field")) == (400, field), body
    assert await state() == {
        b0: (["a"], False),
        b1: (["a"], True),
        b2: (["a"], True),
        b3: ([], False),
        b4: (["a"], True),
    }

    assert await bulk({"action": "delete", "filter": starred}) == (
        200,
        {"action": "delete", "selected": 3, "affected": 3},
    )
    assert await state() == {b0: (["a"], False), b3: ([], False)}

    # contacts.changelog: one record per affected contact and action, none for the others
    history = by_contact(await published(contacts, kafka, Topic.CONTACTS_CHANGELOG))

    def summary(change: dict[str, Any]) -> tuple[Any, ...]:
        contact = change["contact"]
        return (
            change["op"],
            change["version"],
            None if contact is None else (contact["tags"], contact["star"]),
        )

    assert {cid: [summary(c) for c in changes] for cid, changes in history.items()} == {
        b0: [
            ("upserted", 1, (["a"], False)),
            ("upserted", 2, (["a"], True)),
            ("upserted", 3, (["a"], False)),
        ],
        b1: [
            ("upserted", 1, ([], False)),
            ("upserted", 2, (["a"], False)),
            ("upserted", 3, (["a"], True)),
            ("deleted", 4, None),
        ],
        b2: [
            ("upserted", 1, (["a", "x"], False)),
            ("upserted", 2, (["a"], False)),
            ("upserted", 3, (["a"], True)),
            ("deleted", 4, None),
        ],
        b3: [("upserted", 1, (["x"], False)), ("upserted", 2, ([], False))],
        b4: [
            ("upserted", 1, ([], False)),
            ("upserted", 2, (["a"], False)),
            ("upserted", 3, (["a"], True)),
            ("deleted", 4, None),
        ],
    }


# Roles and operational endpoints ------------------------------------------------------------


async def test_roles_health_metrics_and_openapi(contacts):
    api = contacts.api
    created = await api.ok(
        "POST", "/v1/contacts", {"email": "r@example.jp", "name": "閲覧"}, token=OPERATOR_TOKEN
    )
    path = f"/v1/contacts/{created['id']}"

    for token in (None, "no-such-token"):
        for method, target, body in (
            ("GET", path, None),
            ("POST", "/v1/contacts/search", {}),
            ("GET", "/v1/fields", None),
        ):
            status, answer = await api.call(method, target, body, token=token)
            assert status == 401, (token, method, target, answer)

    status, fetched = await api.call("GET", path, token=VIEWER_TOKEN)
    assert (status, fetched["name"]) == (200, "閲覧")
    status, found = await api.call(
        "POST",
        "/v1/contacts/search",
        {"filter": {"field": "name", "op": "eq", "value": "閲覧"}},
        token=VIEWER_TOKEN,
    )
    assert status == 200, found
    assert [c["id"] for c in found["items"]] == [created["id"]]
    for method, target, body in (
        ("POST", "/v1/contacts", {"email": "v@example.jp"}),
        ("PATCH", path, {"name": "x"}),
        ("DELETE", path, None),
        ("POST", "/v1/groups", {"name": "g"}),
        ("POST", "/v1/filters", {"name": "f", "filter": {}}),
    ):
        status, _ = await api.call(method, target, body, token=VIEWER_TOKEN)
        assert status == 403, (method, target)
    assert await contacts.runtime.pool.fetchval("SELECT count(*) FROM contact") == 1
    status, _ = await api.call("DELETE", path, token=OPERATOR_TOKEN)
    assert status == 204

    for target in ("/healthz", "/readyz"):
        status, body = await api.call("GET", target, token=None)
        assert status == 200, (target, body)
    status, metrics = await api.call("GET", "/metrics", token=None)
    assert status == 200
    served = [
        line
        for line in metrics.splitlines()
        if line.startswith("tayori_http_requests_total{")
        and all(
            label in line
            for label in (
                'service="contacts"',
                'method="GET"',
                'route="/v1/contacts/{id}"',
                'status="200"',
            )
        )
    ]
    assert len(served) == 1, served
    assert float(served[0].rsplit(" ", 1)[1]) >= 1
    status, document = await api.call("GET", "/openapi.json", token=None)
    assert status == 200
    assert document["openapi"].startswith("3.")
    assert {
        "/v1/contacts",
        "/v1/contacts/{id}",
        "/v1/contacts/search",
        "/v1/contacts/bulk",
        "/v1/fields",
        "/v1/groups",
        "/v1/plans",
        "/v1/groups/{id}/members",
        "/v1/filters",
    } <= set(document["paths"])
    assert "post" in document["paths"]["/v1/contacts/search"]


# Search over HTTP (F-05) ---------------------------------------------------------------------

#: (name, tags, plan, seats, star, groups) — index i is the contact s{i:02d}@example.jp
SEED: list[tuple[str | None, list[str], str | None, int | None, bool, str]] = [
    ("相川", ["vip", "展示会"], "premium", 10, True, "1"),
    ("伊藤", ["vip", "展示会"], "premium", 5, False, "1"),
    ("上田", ["vip"], "premium", 20, True, "2"),
    (None, ["vip", "展示会"], "free", 1, True, ""),
    ("遠藤", ["展示会"], "premium", 3, True, "12"),
    ("小川", ["vip", "展示会", "休眠"], "premium", 8, True, ""),
    ("加藤", [], None, None, False, ""),
    (None, ["休眠"], "business", 50, False, "2"),
    ("木村", ["vip", "展示会"], "business", 12, True, "1"),
    ("工藤", ["展示会"], "free", 2, False, ""),
    ("小林", ["vip"], None, 7, True, "2"),
    ("斎藤", ["vip", "展示会"], "premium", 30, True, "1"),
    (None, [], "free", None, False, ""),
    ("佐藤", ["休眠"], "premium", 15, True, ""),
    ("鈴木", ["vip", "展示会"], "premium", None, False, "2"),
]


async def test_search_over_http(contacts):
    api = contacts.api
    await define_fields(api)
    g1 = (await api.ok("POST", "/v1/groups", {"name": "東京セミナー"}))["id"]
    g2 = (await api.ok("POST", "/v1/groups", {"name": "大阪セミナー"}))["id"]
    ids: list[int] = []
    for i, (name, tags, plan, seats, star, _) in enumerate(SEED):
        custom = {k: v for k, v in (("plan", plan), ("seats", seats)) if v is not None}
        body = {
            "email": f"s{i:02d}@example.jp",
            "name": name,
            "tags": tags,
            "star": star,
            "custom_fields": custom,
        }
        ids.append((await api.ok("POST", "/v1/contacts", body))["id"])
    for group, digit in ((g1, "1"), (g2, "2")):
        members = [ids[i] for i, row in enumerate(SEED) if digit in row[5]]
        await api.ok("POST", f"/v1/groups/{group}/members", {"contact_ids": members})

    def pick(*indexes: int) -> list[int]:
        return sorted(ids[i] for i in indexes)

    vip = {"field": "tags", "op": "include_any", "value": ["vip"]}
    in_g1, in_g2 = {"membership": {"group_id": g1}}, {"membership": {"group_id": g2}}
    cases = [
        (
            {
                "all": [
                    {"field": "tags", "op": "include_all", "value": ["vip", "展示会"]},
                    {"field": "custom.plan", "op": "eq", "value": "premium"},
                    {"field": "star", "op": "eq", "value": True},
                ]
            },
            pick(0, 5, 11),
        ),
        ({"any": [in_g1, in_g2]}, pick(0, 1, 2, 4, 7, 8, 10, 11, 14)),
        (
            {
                "all": [
                    in_g1,
                    {"membership": {"group_id": g2, "state": "not_member"}},
                    {"field": "star", "op": "eq", "value": True},
                ]
            },
            pick(0, 8, 11),
        ),
        (
            {"not": {"any": [vip, {"field": "custom.seats", "op": "gte", "value": 10}]}},
            pick(4, 6, 9, 12),
        ),
        (
            {
                "all": [
                    {"field": "custom.plan", "op": "in", "value": ["free", "business"]},
                    {"field": "tags", "op": "exclude_any", "value": ["休眠"]},
                ]
            },
            pick(3, 8, 9, 12),
        ),
        (
            {
                "all": [
                    {"field": "name", "op": "empty"},
                    {"field": "custom.seats", "op": "between", "value": [1, 50]},
                ]
            },
            pick(3, 7),
        ),
        ({"field": "custom.seats", "op": "lt", "value": 10}, pick(1, 3, 4, 5, 9, 10)),
        (None, sorted(ids)),
    ]
    for filter, expected in cases:
        body = await api.ok("POST", "/v1/contacts/search", {"filter": filter, "limit": 100})
        assert sorted(c["id"] for c in body["items"]) == expected, filter
        assert body["total"] == len(expected), filter

    # keyset paging with limit 4 visits every match once, in the requested order
    any_group = {"any": [in_g1, in_g2]}
    for filter, sort in (
        (any_group, None),
        (any_group, ["name"]),
        (None, ["-name", "-created_at"]),
        (None, [{"field": "email", "direction": "desc"}]),
    ):
        whole = await api.ok(
            "POST", "/v1/contacts/search", {"filter": filter, "sort": sort, "limit": 100}
        )
        seen: list[int] = []
        cursor = None
        pages = 0
        while True:
            page = await api.ok(
                "POST",
                "/v1/contacts/search",
                {"filter": filter, "sort": sort, "limit": 4, "cursor": cursor},
            )
            pages += 1
            assert page["total"] == whole["total"]
            assert len(page["items"]) <= 4
            seen += [c["id"] for c in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 10, "paging does not end"
        assert seen == [c["id"] for c in whole["items"]], (filter, sort)
        assert len(set(seen)) == len(seen) == whole["total"]
    by_name = await api.ok(
        "POST", "/v1/contacts/search", {"filter": any_group, "sort": ["name"], "limit": 100}
    )
    names = [c["name"] for c in by_name["items"]]
    assert names[-1] is None and None not in names[:-1]  # NULLs last

    # refusals name the field
    for body, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 5000}, "limit"),
        ({"limit": True}, "limit"),
        (
            {"filter": {"all": [vip, {"field": "nickname", "op": "eq", "value": "x"}]}},
            "filter.all[1].field",
        ),
        (
            {"filter": {"any": [{"field": "custom.rank", "op": "eq", "value": "A"}]}},
            "filter.any[0].field",
        ),
        ({"filter": {"field": "star", "op": "contains", "value": "t"}}, "filter.op"),
        ({"filter": {"membership": {"group_id": g1, "state": "gone"}}}, "filter.membership.state"),
        ({"sort": ["phone"]}, "sort[0]"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"filter": vip, "page": 2}, "page"),
    ):
        status, answer = await api.call("POST", "/v1/contacts/search", body)
        assert (status, answer.get("field")) == (400, field), (body, answer)
    first = await api.ok("POST", "/v1/contacts/search", {"filter": vip, "limit": 2})
    status, answer = await api.call(
        "POST",
        "/v1/contacts/search",
        {"filter": any_group, "limit": 2, "cursor": first["next_cursor"]},
    )
    assert (status, answer["field"]) == (400, "cursor")


async def test_leaving_a_group_asks_suppression_to_end_the_membership(contacts, kafka):
    api = contacts.api
    group = await api.ok("POST", "/v1/groups", {"name": "退会テスト"})
    contact = await api.ok("POST", "/v1/contacts", {"email": "leave@example.jp"})
    await api.ok("POST", f"/v1/groups/{group['id']}/members", {"contact_ids": [contact["id"]]})
    status, _ = await api.call("DELETE", f"/v1/groups/{group['id']}/members/{contact['id']}")
    assert status == 204
    status, body = await api.call("DELETE", f"/v1/groups/{group['id']}/members/{contact['id']}")
    assert status == 404 and "not a member" in body["error"]
    commands = await kafka.read(Topic.SUPPRESSION_COMMANDS, until=lambda r: len(r) >= 2)
    assert [(c["type"], c["group_id"]) for c in commands] == [
        ("Join", group["id"]),
        ("Leave", group["id"]),
    ]
    got = await api.ok("GET", f"/v1/contacts/{contact['id']}")
    assert got["memberships"] == []


# Inputs that once answered 500 (issue 17): each is a 400 problem naming the value --------

BIG = "99999999999999999999"  # beyond 64 bits


def _problem(status: int, body: Any, pointer: str | None = None) -> None:
    """``body`` is an RFC 9457 problem with ``status`` (and its first failing value at
    ``pointer``)."""
    assert isinstance(body, dict) and body["status"] == status, body
    assert body["title"] and body["detail"] and body["error"], body
    if pointer is not None:
        assert body["errors"][0]["pointer"] == pointer, body


_LEAF = '{"field": "star", "op": "eq", "value": true}'


def _nested_not(levels: int) -> str:
    """A filter of ``levels`` nested nots, as JSON text (json.dumps would recurse)."""
    return '{"not":' * levels + _LEAF + "}" * levels


def _deep_all(levels: int) -> str:
    return '{"all":[' * levels + _LEAF + "]}" * levels


async def test_a_body_nested_5000_levels_is_a_400_on_every_json_route(contacts):
    api = contacts.api
    deep = "[" * 5000 + "]" * 5000
    nested_object = '{"a":' * 5000 + "1" + "}" * 5000
    for method, path in (
        ("POST", "/v1/contacts"),
        ("PATCH", "/v1/contacts/1"),
        ("POST", "/v1/contacts/search"),
        ("POST", "/v1/contacts/bulk"),
        ("POST", "/v1/contacts/stream"),
        ("POST", "/v1/fields"),
        ("POST", "/v1/groups"),
        ("POST", "/v1/plans"),
        ("POST", "/v1/groups/1/members"),
        ("POST", "/v1/filters"),
    ):
        for data in (deep, nested_object):
            status, body = await api.call(
                method, path, data=data, headers={"Content-Type": "application/json"}
            )
            assert status == 400, (method, path, body)
            _problem(400, body)


async def test_deep_filters_cursors_and_mappings_are_refused(contacts):
    api = contacts.api
    for filter in (_nested_not(499), _nested_not(1000), _deep_all(17)):
        for path, body in (
            ("/v1/contacts/search", '{"filter": FILTER}'),
            ("/v1/contacts/bulk", '{"action": "star", "filter": FILTER}'),
            ("/v1/filters", '{"name": "deep", "filter": FILTER}'),
            ("/v1/contacts/stream", '{"columns": ["id"], "filter": FILTER}'),
        ):
            data = body.replace("FILTER", filter)
            status, answer = await api.call("POST", path, data=data, headers=_JSON)
            assert status == 400, (path, answer)
            # past the parser's nesting limit the body as a whole is refused
            _problem(400, answer, "/filter" if len(filter) < 2000 else "")
    # 16 levels of all/any/not are a filter still
    status, answer = await api.call(
        "POST", "/v1/contacts/search", data=f'{{"filter": {_deep_all(15)}}}', headers=_JSON
    )
    assert status == 200, answer

    # a cursor whose JSON is nested deeply (or is no cursor at all)
    nested_cursor = b'{"f":"x","v":' + b"[" * 3000 + b"]" * 3000 + b"}"
    for raw in (nested_cursor, b"[" * 3000 + b"]" * 3000, b'{"f":"x","v":[{"a":1}]}'):
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        status, answer = await api.call("POST", "/v1/contacts/search", {"cursor": cursor})
        assert (status, answer["field"]) == (400, "cursor"), answer

    # an import mapping nested deeply: multipart field and text/csv query parameter
    mapping = '{"email":' * 3000 + '"email"' + "}" * 3000
    form = aiohttp.FormData()
    form.add_field("mapping", mapping)
    form.add_field("file", b"email\na@example.jp\n", filename="a.csv", content_type="text/csv")
    status, answer = await api.call("POST", "/v1/imports", data=form)
    _problem(400, answer, "/mapping")
    mapping = '{"email":' * 200 + '"email"' + "}" * 200  # a query line is at most 8 kB
    status, answer = await api.call(
        "POST",
        "/v1/imports",
        data=b"email\na@example.jp\n",
        params={"mapping": mapping},
        headers={"Content-Type": "text/csv"},
    )
    assert status == 400
    _problem(400, answer, "/mapping")


async def test_integers_beyond_64_bits_are_a_400(contacts):
    api = contacts.api
    for method, path in (
        ("GET", f"/v1/contacts/{BIG}"),
        ("DELETE", f"/v1/contacts/{BIG}"),
        ("GET", f"/v1/groups/{BIG}"),
        ("GET", f"/v1/plans/{BIG}"),
        ("GET", f"/v1/filters/{BIG}"),
        ("DELETE", f"/v1/filters/{BIG}"),
        ("DELETE", f"/v1/groups/{BIG}/members/1"),
        ("DELETE", f"/v1/groups/1/members/{BIG}"),
        ("GET", f"/v1/filters?group_id={BIG}"),
        ("GET", f"/v1/imports?limit={BIG}"),
    ):
        status, body = await api.call(method, path)
        assert status == 400, (method, path, body)
        _problem(400, body)
        assert body["errors"][0]["location"] in ("path", "query"), body
    status, body = await api.call("PATCH", f"/v1/contacts/{BIG}", {"name": "x"})
    _problem(400, body, "/id")
    status, body = await api.call("POST", f"/v1/groups/{BIG}/members", {"contact_ids": [1]})
    _problem(400, body, "/id")
    big = int(BIG)
    for path, body in (
        ("/v1/groups/1/members", {"contact_ids": [big]}),
        ("/v1/contacts/bulk", {"action": "star", "ids": [big]}),
        ("/v1/contacts/search", {"group_id": big}),
        ("/v1/filters", {"name": "x", "filter": {}, "group_id": big}),
        ("/v1/contacts/stream", {"columns": ["id"], "saved_filter_id": big}),
        ("/v1/contacts/stream", {"columns": ["id"], "ids": [big]}),
    ):
        status, answer = await api.call("POST", path, body)
        assert status == 400, (path, answer)
        _problem(400, answer)
    for filter in (
        {"saved_filter": big},
        {"membership": {"group_id": big}},
        {"field": "id", "op": "eq", "value": big},
    ):
        status, answer = await api.call("POST", "/v1/contacts/search", {"filter": filter})
        assert status in (200, 400), (filter, answer)
        if status == 400:
            _problem(400, answer)
    cursor = base64.urlsafe_b64encode(f'{{"f":"x","v":[{BIG}]}}'.encode()).decode()
    status, answer = await api.call("POST", "/v1/contacts/search", {"cursor": cursor})
    assert (status, answer["field"]) == (400, "cursor"), answer


async def test_nul_long_names_and_odd_values_are_a_400(contacts):
    api = contacts.api
    for path in ("/v1/groups", "/v1/plans"):
        for body, pointer in (
            ({"name": "a\u0000b"}, "/name"),
            ({"name": "n" * 20_000}, "/name"),
            ({"name": "ok", "description": 5}, "/description"),
            ({"name": "ok", "description": {"a": 1}}, "/description"),
            ({"name": "ok", "description": "a\u0000b"}, "/description"),
        ):
            status, answer = await api.call("POST", path, body)
            assert status == 400, (path, body, answer)
            _problem(400, answer, pointer)
            assert answer["errors"][0]["location"] == "body"
    status, answer = await api.call("POST", "/v1/groups", {"name": "a\u0000b"})
    assert answer["errors"][0]["label"] == "グループ名", answer
    for body in ({"name": "a\u0000b", "filter": {}}, {"name": "n" * 20_000, "filter": {}}):
        status, answer = await api.call("POST", "/v1/filters", body)
        _problem(400, answer, "/name")
    for body, pointer in (
        ({"key": "k", "label": "a\u0000b", "type": "text"}, "/label"),
        ({"key": "k\u0000", "label": "l", "type": "text"}, "/key"),
        ({"key": "k", "label": "l", "type": "choice", "choices": ["a\u0000"]}, "/choices/0"),
    ):
        status, answer = await api.call("POST", "/v1/fields", body)
        _problem(400, answer, pointer)
    # unknown keys are named, never ignored
    status, answer = await api.call("POST", "/v1/groups", {"name": "g", "colour": "red"})
    _problem(400, answer, "/colour")
    status, answer = await api.call("GET", "/v1/imports?colour=red")
    _problem(400, answer, "/colour")
    assert await contacts.runtime.pool.fetchval("SELECT count(*) FROM contact_group") == 0

    # an out-of-range date in a search, as a value and inside a cursor
    for value in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        status, answer = await api.call(
            "POST",
            "/v1/contacts/search",
            {"filter": {"field": "created_at", "op": "gt", "value": value}},
        )
        assert (status, answer["field"]) == (400, "filter.value"), answer
    search = {"sort": ["created_at"], "limit": 1}
    first = await api.ok("POST", "/v1/contacts", {"email": "d@example.jp"})
    await api.ok("POST", "/v1/contacts", {"email": "e@example.jp"})
    page = await api.ok("POST", "/v1/contacts/search", search)
    assert page["items"][0]["id"] == first["id"] and page["next_cursor"]
    fingerprint = json.loads(_unb64(page["next_cursor"]))["f"]
    forged = json.dumps({"f": fingerprint, "v": ["0001-01-01T00:00:00+14:00", 1]})
    cursor = base64.urlsafe_b64encode(forged.encode()).decode()
    status, answer = await api.call("POST", "/v1/contacts/search", {**search, "cursor": cursor})
    assert (status, answer["field"]) == (400, "cursor"), answer


async def test_import_filename_nul_and_a_multipart_without_boundary_are_a_400(contacts):
    api = contacts.api
    status, answer = await api.call(
        "POST",
        "/v1/imports",
        data=b"email\na@example.jp\n",
        params={"filename": "a\u0000b.csv"},
        headers={"Content-Type": "text/csv"},
    )
    _problem(400, answer, "/filename")
    for control in (b"\x00", b"\x01"):
        form = (
            b"--zz\r\n"
            b'Content-Disposition: form-data; name="file"; filename="a' + control + b'b.csv"\r\n'
            b"Content-Type: text/csv\r\n\r\n"
            b"email\na@example.jp\n\r\n"
            b"--zz--\r\n"
        )
        status, answer = await api.call(
            "POST",
            "/v1/imports",
            data=form,
            headers={"Content-Type": "multipart/form-data; boundary=zz"},
        )
        # a control character in a part header: the form cannot be read
        assert (status, answer["field"]) == (400, "file"), answer
    status, answer = await api.call(
        "POST",
        "/v1/imports",
        data=b"--x\r\n\r\n",
        headers={"Content-Type": "multipart/form-data"},
    )
    assert (status, answer["field"]) == (400, "file"), answer
    status, answer = await api.call(
        "POST",
        "/v1/imports",
        data=b"garbage without parts",
        headers={"Content-Type": "multipart/form-data; boundary=zz"},
    )
    assert status == 400, answer
    _problem(400, answer)
    assert await contacts.runtime.pool.fetchval("SELECT count(*) FROM import_job") == 0


async def test_a_chunked_search_body_past_the_limit_is_a_413(contacts):
    api = contacts.api

    async def chunks() -> Any:
        yield b'{"filter": {"field": "name", "op": "in", "value": ['
        for _ in range(3 * 1024):  # 3 MB, sent chunked (no Content-Length)
            yield b'"' + b"x" * 1020 + b'",'
        yield b'"x"]}}'

    status, answer = await api.call(
        "POST", "/v1/contacts/search", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert status == 413, answer
    _problem(413, answer)


_JSON = {"Content-Type": "application/json"}


def _unb64(cursor: str) -> bytes:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
