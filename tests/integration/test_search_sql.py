"""Contact search (F-05, F-06) against a real PostgreSQL: every operator, membership, delivery
history, saved filters and keyset pagination, with the expected ids computed in Python from
the seed data."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import pytest_asyncio

from libs.common.errors import InvalidMessage
from services.contacts.models import DELIVERY_STATUSES, SALES_STATUSES, FieldDefinition
from services.contacts.search import (
    MAX_LIMIT,
    SavedFilterRef,
    compile_filter,
    compile_search,
    referenced_saved_filters,
)

#: one worker runs this module: its data set is loaded once for all its tests.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("search_sql")]

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "contacts" / "migrations"
JST = ZoneInfo("Asia/Tokyo")
UTC = dt.UTC
FIELDS = {
    "plan": FieldDefinition("plan", "プラン", "choice", ("free", "pro", "enterprise")),
    "seats": FieldDefinition("seats", "席数", "number"),
    "renewal": FieldDefinition("renewal", "更新日", "date"),
    "vip": FieldDefinition("vip", "VIP", "boolean"),
    "note": FieldDefinition("note", "備考", "text"),
}
FAMILY = ["山田", "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "中村"]
GIVEN = ["太郎", "花子", "一郎", "美咲", "健"]
KANA = ["ヤマダ", "サトウ", "スズキ", "タカハシ", "タナカ"]
COMPANIES = ["株式会社あおば", "Acme Corp", "100%_off商事", "ACME 株式会社", None, "やまと運輸"]
DOMAINS = ["example.jp", "Example.COM", "mail.example.jp"]
BASE = dt.datetime(2024, 1, 1, tzinfo=UTC)
N = 40


def seed_contact(i: int) -> dict[str, Any]:
    """Contact number ``i``: varied values, NULLs, ties and a few awkward ones."""
    custom: dict[str, Any] = {}
    if i % 4 != 1:
        custom["plan"] = ["free", "pro", "enterprise"][i % 3]
    if i % 6 != 5:
        custom["seats"] = i * 3
    if i % 4 != 2:
        custom["renewal"] = (dt.date(2024, 1, 1) + dt.timedelta(days=11 * i)).isoformat()
    if i % 5 != 3:
        custom["vip"] = i % 4 == 0
    if i % 3 == 1:
        custom["note"] = f"メモ{i}"
    awkward: dict[int, dict[str, Any]] = {
        4: {"note": ""},
        11: {"seats": "many"},
        12: {"seats": 2.5},
        17: {"renewal": "not a date"},
    }
    custom.update(awkward.get(i, {}))
    tags = [
        tag
        for tag, on in (("newsletter", i % 2 == 0), ("vip", i % 3 == 0), ("セミナー", i % 5 == 0))
        if on
    ]
    return {
        "email": "Taro.Yamada@Example.JP" if i == 7 else f"user{i:02d}@{DOMAINS[i % 3]}",
        "name": None
        if i % 9 == 4
        else ""
        if i == 13
        else f"{FAMILY[i % len(FAMILY)]} {GIVEN[i % len(GIVEN)]}",
        "name_kana": None if i % 7 == 3 else KANA[i % len(KANA)],
        "company": "" if i == 20 else COMPANIES[i % len(COMPANIES)],
        "memo": {5: "a_b", 6: "axb", 8: "50\\50"}.get(i),
        "acquired_at": None if i % 5 == 0 else dt.date(2023, 1, 1) + dt.timedelta(days=17 * i),
        "sales_status": list(SALES_STATUSES)[i % len(SALES_STATUSES)],
        "engagement": ["hot", "active", "inactive", None][i % 4],
        "star": i % 3 == 0,
        "tags": tags,
        "custom": custom,
        "score": (i * 7) % 50,
        "delivery_status": list(DELIVERY_STATUSES)[i % len(DELIVERY_STATUSES)],
        "created_at": BASE + dt.timedelta(hours=13 * (i // 2)),
        "updated_at": BASE + dt.timedelta(days=i % 10),
    }


def memberships_of(i: int) -> dict[str, str]:
    """group name → state."""
    found = {}
    if i % 2 == 0:
        found["g1"] = {4: "unsubscribed", 8: "banned"}.get(i % 10, "deliverable")
    if i % 3 == 0:
        found["g2"] = {3: "unsubscribed", 6: "banned"}.get(i % 9, "deliverable")
    if 30 <= i <= 35:
        found["g3"] = ["deliverable", "unsubscribed", "banned"][i % 3]
    return found


def history_of(i: int) -> list[tuple[str, str, int]]:
    """(campaign, kind, days ago) rows of delivery_history."""
    rows = []
    if i < 30:
        rows.append(("c1", "received", i))
    if i % 3 == 0 and i < 30:
        rows.append(("c1", "opened", i * 2))
    if i % 4 == 0:
        days = 50 if i >= 20 else 3
        rows += [("c2", "received", days), ("c2", "clicked", days)]
    if i >= 35:
        rows.append(("c3", "errored", 1))
    if i == 36:
        rows.append(("c1", "errored", 200))
    return rows


@pytest.fixture(scope="module")
def postgres_uri() -> Iterator[str]:
    runtime = tempfile.mkdtemp(prefix="tayori-xdg-")  # mkdtemp makes it 0700
    os.environ.setdefault("XDG_RUNTIME_DIR", runtime)
    import pgserver  # reads XDG_RUNTIME_DIR when imported

    data = tempfile.mkdtemp(prefix="tayori-pg-")
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)
        if os.environ["XDG_RUNTIME_DIR"] != runtime:
            os.rmdir(runtime)


class Seeded:
    """The database connection and the seed as Python sees it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.rows: list[dict[str, Any]] = []  # seed rows with their id, memberships, history
        self.groups: dict[str, int] = {}
        self.saved: dict[str, int] = {}
        self.now = dt.datetime.now(UTC)

    def ids(self, predicate: Callable[[dict[str, Any]], bool]) -> set[int]:
        return {row["id"] for row in self.rows if predicate(row)}

    @property
    def all_ids(self) -> set[int]:
        return {row["id"] for row in self.rows}

    async def saved_refs(self, filter: Any) -> dict[int, SavedFilterRef]:
        """Load the saved filters a filter names, transitively, as the service would."""
        refs: dict[int, SavedFilterRef] = {}
        wanted = referenced_saved_filters(filter)
        while wanted - set(refs):
            rows = await self.conn.fetch(
                "SELECT id, group_id, filter FROM saved_filter WHERE id = ANY($1::bigint[])",
                sorted(wanted - set(refs)),
            )
            for row in rows:
                refs[row["id"]] = SavedFilterRef(row["id"], row["group_id"], row["filter"])
                wanted |= referenced_saved_filters(row["filter"])
            if not rows:
                break
        return refs

    async def search(self, filter: Any, *, scope: int | None = None) -> set[int]:
        compiled = compile_filter(
            filter, FIELDS, saved_filters=await self.saved_refs(filter), group_scope=scope
        )
        rows = await self.conn.fetch(
            f"SELECT c.id FROM contact c WHERE {compiled.where}", *compiled.params
        )
        found = [row["id"] for row in rows]
        assert len(found) == len(set(found))
        return set(found)


async def seed(db: Seeded) -> None:
    conn = db.conn
    for name in ("g1", "g2", "g3"):
        db.groups[name] = await conn.fetchval(
            "INSERT INTO contact_group (name) VALUES ($1) RETURNING id", name
        )
    columns = list(seed_contact(0))
    insert = (
        f"INSERT INTO contact ({', '.join(columns)}) VALUES "
        f"({', '.join(f'${n}' for n in range(1, len(columns) + 1))}) RETURNING id"
    )
    for i in range(N):
        row = seed_contact(i)
        row["id"] = await conn.fetchval(insert, *(row[c] for c in columns))
        row["i"] = i
        row["memberships"] = {db.groups[g]: state for g, state in memberships_of(i).items()}
        row["history"] = history_of(i)
        for group_id, state in row["memberships"].items():
            await conn.execute(
                "INSERT INTO membership (contact_id, group_id, state, method) "
                "VALUES ($1, $2, $3, 'system')",
                row["id"],
                group_id,
                state,
            )
        for campaign, kind, days in row["history"]:
            # an hour inside the day, so "within N days" is unambiguous when days < N
            last = db.now - dt.timedelta(days=days) + dt.timedelta(hours=1)
            await conn.execute(
                "INSERT INTO delivery_history (contact_id, campaign_id, kind, first_at, last_at) "
                "VALUES ($1, $2, $3, $4, $4)",
                row["id"],
                campaign,
                kind,
                last,
            )
        db.rows.append(row)

    async def save(name: str, group: str | None, filter: dict[str, Any]) -> None:
        db.saved[name] = await conn.fetchval(
            "INSERT INTO saved_filter (name, group_id, filter) VALUES ($1, $2, $3) RETURNING id",
            name,
            db.groups[group] if group else None,
            filter,
        )

    await save("starred", None, {"field": "star", "op": "eq", "value": True})
    await save(
        "g1 starred high",
        "g1",
        {
            "all": [
                {"saved_filter": db.saved["starred"]},
                {"field": "score", "op": "gte", "value": 20},
            ]
        },
    )
    await save(
        "starred or seminar",
        None,
        {
            "any": [
                {"saved_filter": db.saved["starred"]},
                {"field": "tags", "op": "include_any", "value": ["セミナー"]},
            ]
        },
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(postgres_uri: str) -> AsyncIterator[Seeded]:
    admin = await asyncpg.connect(postgres_uri)
    try:
        await admin.execute("DROP DATABASE IF EXISTS tayori_search")
        await admin.execute("CREATE DATABASE tayori_search")
    finally:
        await admin.close()
    uri = postgres_uri.replace("/postgres?", "/tayori_search?", 1)
    conn = await asyncpg.connect(uri, server_settings={"search_path": "contacts,public"})
    try:
        for kind in ("json", "jsonb"):
            await conn.set_type_codec(
                kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        await conn.execute("CREATE SCHEMA contacts")
        for path in sorted(MIGRATIONS.glob("*.sql")):
            await conn.execute(path.read_text(encoding="utf-8"))
        seeded = Seeded(conn)
        await seed(seeded)
        yield seeded
    finally:
        await conn.close()


# -- field conditions: (field, op, value, what Python says matches) ---------------------


def seats(row: dict) -> Any:
    """A custom number as search sees it: None when missing or not a JSON number."""
    value = row["custom"].get("seats")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def vip(row: dict) -> bool | None:
    value = row["custom"].get("vip")
    return value if isinstance(value, bool) else None


def plan(row: dict) -> str | None:
    return row["custom"].get("plan")


def note(row: dict) -> str | None:
    return row["custom"].get("note")


def renewal(row: dict) -> str | None:
    value = row["custom"].get("renewal")
    return value if isinstance(value, str) and len(value) == 10 and value[4] == "-" else None


def jst_day(moment: dt.datetime) -> dt.date:
    return moment.astimezone(JST).date()


D = dt.date.fromisoformat
CASES: list[tuple[str, str, Any, Callable[[dict], bool]]] = [
    ("name", "eq", "山田 太郎", lambda r: r["name"] == "山田 太郎"),
    ("name", "ne", "山田 太郎", lambda r: r["name"] != "山田 太郎"),
    ("name", "contains", "田", lambda r: r["name"] is not None and "田" in r["name"]),
    ("name", "starts_with", "佐藤", lambda r: (r["name"] or "").startswith("佐藤")),
    ("name", "in", ["山田 太郎", "鈴木 一郎"], lambda r: r["name"] in ("山田 太郎", "鈴木 一郎")),
    ("name", "empty", None, lambda r: not r["name"]),
    ("name", "not_empty", None, lambda r: bool(r["name"])),
    ("name_kana", "empty", None, lambda r: r["name_kana"] is None),
    ("email", "eq", "taro.yamada@example.jp", lambda r: r["i"] == 7),
    ("email", "ne", "TARO.YAMADA@example.jp", lambda r: r["i"] != 7),
    ("email", "contains", "EXAMPLE.COM", lambda r: "example.com" in r["email"].lower()),
    ("email", "starts_with", "user1", lambda r: r["email"].startswith("user1")),
    ("email", "in", ["USER00@EXAMPLE.JP", "taro.yamada@example.jp"], lambda r: r["i"] in (0, 7)),
    ("company", "contains", "100%", lambda r: r["company"] == "100%_off商事"),
    ("company", "contains", "%_", lambda r: r["company"] == "100%_off商事"),
    ("company", "contains", "acme", lambda r: "acme" in (r["company"] or "").lower()),
    ("company", "starts_with", "_", lambda r: False),
    ("company", "empty", None, lambda r: not r["company"]),
    ("company", "ne", "Acme Corp", lambda r: r["company"] != "Acme Corp"),
    ("memo", "contains", "a_b", lambda r: r["i"] == 5),
    ("memo", "contains", "\\", lambda r: r["i"] == 8),
    ("score", "eq", 14, lambda r: r["score"] == 14),
    ("score", "ne", 14, lambda r: r["score"] != 14),
    ("score", "in", [0, 7, 49], lambda r: r["score"] in (0, 7, 49)),
    ("score", "gt", 40, lambda r: r["score"] > 40),
    ("score", "gte", 42, lambda r: r["score"] >= 42),
    ("score", "lt", 7, lambda r: r["score"] < 7),
    ("score", "lte", 7.5, lambda r: r["score"] <= 7.5),
    ("score", "between", [10, 20], lambda r: 10 <= r["score"] <= 20),
    ("score", "empty", None, lambda r: False),
    ("score", "not_empty", None, lambda r: True),
    ("id", "in", [1, 2, 3], lambda r: r["id"] in (1, 2, 3)),
    ("custom.seats", "eq", 9, lambda r: seats(r) == 9),
    ("custom.seats", "ne", 9, lambda r: seats(r) != 9),
    ("custom.seats", "gt", 50, lambda r: seats(r) is not None and seats(r) > 50),
    ("custom.seats", "gte", 51, lambda r: seats(r) is not None and seats(r) >= 51),
    ("custom.seats", "lt", 10, lambda r: seats(r) is not None and seats(r) < 10),
    ("custom.seats", "lte", 9, lambda r: seats(r) is not None and seats(r) <= 9),
    ("custom.seats", "between", [2, 30], lambda r: seats(r) is not None and 2 <= seats(r) <= 30),
    ("custom.seats", "in", [3, 2.5], lambda r: seats(r) in (3, 2.5)),
    ("custom.seats", "empty", None, lambda r: seats(r) is None),
    ("custom.seats", "not_empty", None, lambda r: seats(r) is not None),
    ("acquired_at", "eq", "2023-01-18", lambda r: r["acquired_at"] == D("2023-01-18")),
    ("acquired_at", "ne", "2023-01-18", lambda r: r["acquired_at"] != D("2023-01-18")),
    (
        "acquired_at",
        "gt",
        "2023-06-01",
        lambda r: (r["acquired_at"] or D("0001-01-01")) > D("2023-06-01"),
    ),
    (
        "acquired_at",
        "gte",
        "2023-06-20",
        lambda r: (r["acquired_at"] or D("0001-01-01")) >= D("2023-06-20"),
    ),
    (
        "acquired_at",
        "lt",
        "2023-03-01",
        lambda r: (r["acquired_at"] or D("9999-01-01")) < D("2023-03-01"),
    ),
    (
        "acquired_at",
        "lte",
        "2023-03-08",
        lambda r: (r["acquired_at"] or D("9999-01-01")) <= D("2023-03-08"),
    ),
    (
        "acquired_at",
        "between",
        ["2023-02-01", "2023-06-20"],
        lambda r: D("2023-02-01") <= (r["acquired_at"] or D("0001-01-01")) <= D("2023-06-20"),
    ),
    (
        "acquired_at",
        "in",
        ["2023-01-18", "2023-02-04"],
        lambda r: r["acquired_at"] in (D("2023-01-18"), D("2023-02-04")),
    ),
    ("acquired_at", "empty", None, lambda r: r["acquired_at"] is None),
    ("acquired_at", "not_empty", None, lambda r: r["acquired_at"] is not None),
    ("custom.renewal", "eq", "2024-01-12", lambda r: renewal(r) == "2024-01-12"),
    ("custom.renewal", "ne", "2024-01-12", lambda r: renewal(r) != "2024-01-12"),
    ("custom.renewal", "gt", "2024-06-01", lambda r: (renewal(r) or "") > "2024-06-01"),
    ("custom.renewal", "gte", "2024-06-09", lambda r: (renewal(r) or "") >= "2024-06-09"),
    ("custom.renewal", "lt", "2024-02-01", lambda r: (renewal(r) or "9") < "2024-02-01"),
    ("custom.renewal", "lte", "2024-02-06", lambda r: (renewal(r) or "9") <= "2024-02-06"),
    (
        "custom.renewal",
        "between",
        ["2024-02-01", "2024-04-30"],
        lambda r: "2024-02-01" <= (renewal(r) or "") <= "2024-04-30",
    ),
    (
        "custom.renewal",
        "in",
        ["2024-01-01", "2024-01-12"],
        lambda r: renewal(r) in ("2024-01-01", "2024-01-12"),
    ),
    ("custom.renewal", "empty", None, lambda r: renewal(r) is None),
    (
        "created_at",
        "gte",
        "2024-01-05T13:00:00+00:00",
        lambda r: r["created_at"] >= dt.datetime(2024, 1, 5, 13, tzinfo=UTC),
    ),
    (
        "created_at",
        "lt",
        "2024-01-05T13:00:00",  # naive: Japan time
        lambda r: r["created_at"] < dt.datetime(2024, 1, 5, 13, tzinfo=JST),
    ),
    ("created_at", "eq", "2024-01-03", lambda r: jst_day(r["created_at"]) == D("2024-01-03")),
    ("created_at", "ne", "2024-01-03", lambda r: jst_day(r["created_at"]) != D("2024-01-03")),
    ("created_at", "lte", "2024-01-03", lambda r: jst_day(r["created_at"]) <= D("2024-01-03")),
    ("created_at", "gt", "2024-01-03", lambda r: jst_day(r["created_at"]) > D("2024-01-03")),
    (
        "created_at",
        "between",
        ["2024-01-02", "2024-01-04"],
        lambda r: D("2024-01-02") <= jst_day(r["created_at"]) <= D("2024-01-04"),
    ),
    (
        "created_at",
        "in",
        ["2024-01-02", "2024-01-07"],
        lambda r: jst_day(r["created_at"]) in (D("2024-01-02"), D("2024-01-07")),
    ),
    (
        "updated_at",
        "between",
        ["2024-01-03T00:00:00Z", "2024-01-05T00:00:00Z"],
        lambda r: BASE + dt.timedelta(days=2) <= r["updated_at"] <= BASE + dt.timedelta(days=4),
    ),
    ("updated_at", "empty", None, lambda r: False),
    ("star", "eq", True, lambda r: r["star"]),
    ("star", "eq", False, lambda r: not r["star"]),
    ("star", "ne", True, lambda r: not r["star"]),
    ("custom.vip", "eq", True, lambda r: vip(r) is True),
    ("custom.vip", "ne", True, lambda r: vip(r) is not True),
    ("custom.vip", "eq", False, lambda r: vip(r) is False),
    ("custom.vip", "empty", None, lambda r: vip(r) is None),
    ("custom.vip", "not_empty", None, lambda r: vip(r) is not None),
    ("sales_status", "eq", "契約済", lambda r: r["sales_status"] == "contracted"),
    ("sales_status", "ne", "open", lambda r: r["sales_status"] != "open"),
    ("sales_status", "in", ["open", "lost"], lambda r: r["sales_status"] in ("open", "lost")),
    ("engagement", "eq", "hot", lambda r: r["engagement"] == "hot"),
    ("engagement", "ne", "hot", lambda r: r["engagement"] != "hot"),
    ("engagement", "empty", None, lambda r: r["engagement"] is None),
    ("engagement", "not_empty", None, lambda r: r["engagement"] is not None),
    ("delivery_status", "eq", "ok", lambda r: r["delivery_status"] == "ok"),
    (
        "delivery_status",
        "in",
        ["spam", "エラー"],
        lambda r: r["delivery_status"] in ("spam", "error"),
    ),
    ("custom.plan", "eq", "pro", lambda r: plan(r) == "pro"),
    ("custom.plan", "ne", "pro", lambda r: plan(r) != "pro"),
    ("custom.plan", "in", ["free", "enterprise"], lambda r: plan(r) in ("free", "enterprise")),
    ("custom.plan", "empty", None, lambda r: plan(r) is None),
    ("custom.note", "eq", "メモ10", lambda r: note(r) == "メモ10"),
    ("custom.note", "contains", "メモ1", lambda r: "メモ1" in (note(r) or "")),
    ("custom.note", "starts_with", "メモ2", lambda r: (note(r) or "").startswith("メモ2")),
    ("custom.note", "empty", None, lambda r: not note(r)),
    ("custom.note", "not_empty", None, lambda r: bool(note(r))),
    (
        "tags",
        "include_any",
        ["vip", "セミナー"],
        lambda r: bool({"vip", "セミナー"} & set(r["tags"])),
    ),
    ("tags", "include_all", ["vip", "セミナー"], lambda r: {"vip", "セミナー"} <= set(r["tags"])),
    (
        "tags",
        "exclude_any",
        ["vip", "セミナー"],
        lambda r: not {"vip", "セミナー"} & set(r["tags"]),
    ),
    (
        "tags",
        "exclude_all",
        ["vip", "セミナー"],
        lambda r: not {"vip", "セミナー"} <= set(r["tags"]),
    ),
    ("tags", "empty", None, lambda r: not r["tags"]),
    ("tags", "not_empty", None, lambda r: bool(r["tags"])),
]
MAY_BE_TRIVIAL = {
    ("company", "starts_with"),
    ("score", "empty"),
    ("score", "not_empty"),
    ("updated_at", "empty"),
}


@pytest.mark.parametrize(
    ("field", "op", "value", "predicate"),
    CASES,
    ids=[f"{f}-{op}-{i}" for i, (f, op, _, _) in enumerate(CASES)],
)
async def test_field_conditions(
    db: Seeded, field: str, op: str, value: Any, predicate: Callable[[dict], bool]
) -> None:
    node: dict[str, Any] = {"field": field, "op": op}
    if value is not None:
        node["value"] = value
    expected = db.ids(predicate)
    if (field, op) not in MAY_BE_TRIVIAL:
        assert 0 < len(expected) < N, "seed data does not exercise this case"
    assert await db.search(node) == expected
    # leaves are two-valued: NOT gives exactly the complement, NULLs included
    assert await db.search({"not": node}) == db.all_ids - expected


MEMBERSHIP_STATES = ["deliverable", "unsubscribed", "banned", "member", "not_member"]


@pytest.mark.parametrize("group", ["g1", "g2", "g3"])
@pytest.mark.parametrize("state", MEMBERSHIP_STATES)
async def test_membership_states(db: Seeded, group: str, state: str) -> None:
    group_id = db.groups[group]

    def predicate(row: dict) -> bool:
        have = row["memberships"].get(group_id)
        if state == "member":
            return have is not None
        if state == "not_member":
            return have is None
        return have == state

    expected = db.ids(predicate)
    assert expected
    assert await db.search({"membership": {"group_id": group_id, "state": state}}) == expected


@pytest.mark.parametrize(
    ("state", "predicate"),
    [
        ("all_deliverable", lambda states: bool(states) and set(states) == {"deliverable"}),
        ("any_unsubscribed", lambda states: "unsubscribed" in states),
        ("any_banned", lambda states: "banned" in states),
    ],
)
async def test_aggregate_delivery_state(
    db: Seeded, state: str, predicate: Callable[[list[str]], bool]
) -> None:
    expected = db.ids(lambda r: predicate(list(r["memberships"].values())))
    assert 0 < len(expected) < N
    assert await db.search({"delivery_state": state}) == expected


HISTORY = [
    ({"event": "received"}, lambda h: h[1] == "received"),
    ({"event": "received", "campaign_id": "c1"}, lambda h: h[:2] == ("c1", "received")),
    ({"event": "opened", "within_days": 10}, lambda h: h[1] == "opened" and h[2] < 10),
    ({"event": "clicked", "campaign_id": "c2"}, lambda h: h[:2] == ("c2", "clicked")),
    (
        {"event": "clicked", "campaign_id": "c2", "within_days": 30},
        lambda h: h[:2] == ("c2", "clicked") and h[2] < 30,
    ),
    ({"event": "errored"}, lambda h: h[1] == "errored"),
    ({"event": "errored", "within_days": 7}, lambda h: h[1] == "errored" and h[2] < 7),
    (
        {"event": "received", "campaign_ids": ["c2", "c3"]},
        lambda h: h[1] == "received" and h[0] in ("c2", "c3"),
    ),
    (
        {"event": "errored", "campaign_ids": ["c1", "c2"]},
        lambda h: h[1] == "errored" and h[0] in ("c1", "c2"),
    ),
    ({"event": "received", "within_days": 12}, lambda h: h[1] == "received" and h[2] < 12),
]


@pytest.mark.parametrize(("spec", "predicate"), HISTORY)
@pytest.mark.parametrize("negate", [False, True])
async def test_delivery_history(
    db: Seeded, spec: dict, predicate: Callable[[tuple], bool], negate: bool
) -> None:
    hit = db.ids(lambda r: any(predicate(h) for h in r["history"]))
    assert 0 < len(hit) < N
    expected = db.all_ids - hit if negate else hit
    assert await db.search({"history": {**spec, "negate": negate}}) == expected


async def test_saved_filters_inline_and_respect_scope(db: Seeded) -> None:
    starred, scoped = db.saved["starred"], db.saved["g1 starred high"]
    either = db.saved["starred or seminar"]
    assert await db.search({"saved_filter": starred}) == db.ids(lambda r: r["star"])
    assert await db.search({"saved_filter": either}) == db.ids(
        lambda r: r["star"] or "セミナー" in r["tags"]
    )
    g1 = db.groups["g1"]
    expected = db.ids(lambda r: r["star"] and r["score"] >= 20 and g1 in r["memberships"])
    assert expected
    filter = {
        "all": [{"membership": {"group_id": g1, "state": "member"}}, {"saved_filter": scoped}]
    }
    assert await db.search(filter, scope=g1) == expected
    for scope in (None, db.groups["g2"]):
        with pytest.raises(InvalidMessage) as info:
            await db.search(filter, scope=scope)
        assert info.value.field == "filter.all[1].saved_filter"
        assert f"scoped to group {g1}" in info.value.reason
    with pytest.raises(InvalidMessage, match="unknown saved filter"):
        await db.search({"saved_filter": 999})


async def test_nested_combinations(db: Seeded) -> None:
    g1, g2 = db.groups["g1"], db.groups["g2"]
    filter = {
        "any": [
            {
                "all": [
                    {"field": "star", "op": "eq", "value": True},
                    {"not": {"field": "tags", "op": "include_any", "value": ["セミナー"]}},
                    {"field": "score", "op": "between", "value": [10, 40]},
                ]
            },
            {
                "all": [
                    {"membership": {"group_id": g1, "state": "banned"}},
                    {"not": {"history": {"event": "errored"}}},
                ]
            },
            {
                "not": {
                    "any": [
                        {"field": "custom.seats", "op": "lt", "value": 100},
                        {"membership": {"group_id": g2, "state": "member"}},
                        {"field": "engagement", "op": "eq", "value": "hot"},
                    ]
                }
            },
        ]
    }

    def predicate(r: dict) -> bool:
        first = r["star"] and "セミナー" not in r["tags"] and 10 <= r["score"] <= 40
        second = r["memberships"].get(g1) == "banned" and not any(
            h[1] == "errored" for h in r["history"]
        )
        third = not (
            (seats(r) is not None and seats(r) < 100)
            or g2 in r["memberships"]
            or r["engagement"] == "hot"
        )
        return bool(first or second or third)

    expected = db.ids(predicate)
    assert 0 < len(expected) < N
    assert await db.search(filter) == expected
    assert await db.search({"all": []}) == db.all_ids
    assert await db.search({"any": []}) == set()
    assert await db.search({"not": {"all": [filter, {"any": []}]}}) == db.all_ids


def nulls_last(value: Any, descending: bool) -> tuple:
    if value is None:
        return (1, 0)
    if descending:
        value = -value.toordinal() if isinstance(value, dt.date) else -value
    return (0, value)


SORTS: list[tuple[Any, Callable[[dict], tuple] | None]] = [
    ("id", lambda r: (r["id"],)),
    ("-id", lambda r: (-r["id"],)),
    ("-score", lambda r: (-r["score"], r["id"])),
    (
        ["acquired_at", "-created_at"],
        lambda r: (nulls_last(r["acquired_at"], False), -r["created_at"].timestamp(), r["id"]),
    ),
    (
        [{"field": "acquired_at", "direction": "desc"}, "score", "-id"],
        lambda r: (nulls_last(r["acquired_at"], True), r["score"], -r["id"]),
    ),
    (["-updated_at"], lambda r: (-r["updated_at"].timestamp(), r["id"])),
    (["company", "-score"], None),  # text order follows the database collation
    ("-name", None),
    ([{"field": "name_kana", "direction": "desc"}, "updated_at"], None),
    ("email", None),
]


@pytest.mark.parametrize(("sort", "python_order"), SORTS, ids=[str(s) for s, _ in SORTS])
@pytest.mark.parametrize("filtered", [False, True])
async def test_keyset_pagination_walks_every_row_once(
    db: Seeded, sort: Any, python_order: Callable[[dict], tuple] | None, filtered: bool
) -> None:
    filter = {"field": "tags", "op": "not_empty"} if filtered else None
    matching = [r for r in db.rows if r["tags"] or not filtered]
    full, _ = compile_search(filter, FIELDS, sort=sort, limit=MAX_LIMIT, cursor=None)
    everything = [r["id"] for r in await db.conn.fetch(full.sql_page, *full.page_params)]
    assert sorted(everything) == sorted(r["id"] for r in matching)
    if python_order is not None:
        assert everything == [r["id"] for r in sorted(matching, key=python_order)]
    walked: list[int] = []
    cursor = None
    for _ in range(20):
        page, next_cursor = compile_search(filter, FIELDS, sort=sort, limit=7, cursor=cursor)
        total = await db.conn.fetchval(page.sql_count, *page.count_params)
        assert total == len(matching)
        rows = await db.conn.fetch(page.sql_page, *page.page_params)
        assert len(rows) <= 7
        walked += [r["id"] for r in rows]
        if len(rows) < 7:
            break
        cursor = next_cursor(rows[-1])
    assert walked == everything
    assert len(set(walked)) == len(walked)
