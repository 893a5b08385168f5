"""The F-05 filter language compiled to SQL, without a database: shapes, parameters, errors."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from decimal import Decimal
from typing import Any

import pytest

from libs.common.errors import InvalidMessage
from services.contacts.models import FieldDefinition
from services.contacts.search import (
    MAX_LIMIT,
    CompiledFilter,
    SavedFilterRef,
    compile_filter,
    compile_search,
    referenced_saved_filters,
)

FIELDS = {
    "plan": FieldDefinition("plan", "プラン", "choice", ("free", "pro")),
    "seats": FieldDefinition("seats", "席数", "number"),
    "renewal": FieldDefinition("renewal", "更新日", "date"),
    "vip": FieldDefinition("vip", "VIP", "boolean"),
    "note": FieldDefinition("note", "備考", "text"),
}
EVIL = "x'; DROP TABLE contact; --"

VALUES = {
    "text": ("山田", ["山田", "佐藤"], None),
    "number": (10, [1, 2.5], [1, 50]),
    "date": ("2024-04-01", ["2024-04-01", "2024-05-01"], ["2024-01-01", "2024-12-31"]),
    "timestamp": (
        "2024-04-01T09:00:00+09:00",
        ["2024-04-01T00:00:00Z"],
        ["2024-01-01", "2024-02-01"],
    ),
    "boolean": (True, None, None),
}
OPS = {
    "text": ("eq", "ne", "contains", "starts_with", "in", "empty", "not_empty"),
    "number": ("eq", "ne", "in", "gt", "gte", "lt", "lte", "between", "empty", "not_empty"),
    "choice": ("eq", "ne", "in", "empty", "not_empty"),
    "boolean": ("eq", "ne", "empty", "not_empty"),
}
OPS["date"] = OPS["timestamp"] = OPS["number"]
FIELD_OF_KIND = {
    "text": ["name", "email", "memo", "custom.note"],
    "number": ["score", "id", "custom.seats"],
    "date": ["acquired_at", "custom.renewal"],
    "timestamp": ["created_at", "updated_at"],
    "boolean": ["star", "custom.vip"],
    "choice": ["sales_status", "engagement", "delivery_status", "custom.plan"],
}
CHOICE_VALUES = {
    "sales_status": "open",
    "engagement": "hot",
    "delivery_status": "ok",
    "custom.plan": "pro",
}


def condition(field: Any, op: Any, value: object = ...) -> dict:
    node: dict = {"field": field, "op": op}
    if value is not ...:
        node["value"] = value
    return node


def value_for(kind: str, field: str, op: str) -> object:
    if op in ("empty", "not_empty"):
        return ...
    if kind == "choice":
        return [CHOICE_VALUES[field]] if op == "in" else CHOICE_VALUES[field]
    single, many, pair = VALUES[kind]
    return many if op == "in" else pair if op == "between" else single


def placeholders(sql: str) -> set[int]:
    return {int(n) for n in re.findall(r"\$(\d+)", sql)}


def check_numbering(compiled: CompiledFilter, first: int = 1) -> None:
    used = placeholders(compiled.where)
    assert used == set(range(first, first + len(compiled.params))), compiled


def error(filter: object, **kwargs: object) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        compile_filter(filter, FIELDS, **kwargs)  # type: ignore[arg-type]
    return info.value


CASES = [
    (kind, field, op)
    for kind, fields in FIELD_OF_KIND.items()
    for field in fields
    for op in OPS[kind]
]


@pytest.mark.parametrize(("kind", "field", "op"), CASES)
def test_every_op_of_every_kind_compiles(kind: str, field: str, op: str) -> None:
    compiled = compile_filter(condition(field, op, value_for(kind, field, op)), FIELDS)
    check_numbering(compiled)
    assert "'" not in compiled.where.replace("''", "").replace("'number'", "").replace(
        "'boolean'", ""
    ).replace("'Asia/Tokyo'", "").replace("'^\\d{4}-\\d{2}-\\d{2}$'", "")


@pytest.mark.parametrize("op", ["include_any", "include_all", "exclude_any", "exclude_all"])
def test_tag_ops(op: str) -> None:
    compiled = compile_filter(condition("tags", op, ["見込み", "VIP"]), FIELDS)
    assert compiled.params == [["見込み", "VIP"]]
    assert ("NOT" in compiled.where) == op.startswith("exclude")
    assert ("@>" in compiled.where) == op.endswith("_all")
    assert compile_filter(condition("tags", "empty"), FIELDS).where == "cardinality(c.tags) = 0"


@pytest.mark.parametrize(
    ("filter", "where"),
    [
        (None, "TRUE"),
        ({}, "TRUE"),
        ({"all": []}, "TRUE"),
        ({"any": []}, "FALSE"),
    ],
)
def test_empty_filters(filter: dict | None, where: str) -> None:
    assert compile_filter(filter, FIELDS) == CompiledFilter(where, [])


def test_values_are_converted_by_kind() -> None:
    assert compile_filter(condition("score", "between", [10, 50]), FIELDS).params == [10, 50]
    assert compile_filter(condition("custom.seats", "gt", 2.5), FIELDS).params == [
        "seats",
        Decimal("2.5"),
    ]
    assert compile_filter(condition("score", "gt", 2.5), FIELDS).params == [Decimal("2.5")]
    assert compile_filter(condition("acquired_at", "eq", "2024-02-29"), FIELDS).params == [
        dt.date(2024, 2, 29)
    ]
    assert compile_filter(condition("custom.renewal", "lt", "2024-02-29"), FIELDS).params == [
        "renewal",
        "2024-02-29",
    ]
    moment = compile_filter(condition("created_at", "gte", "2024-04-01T09:00:00"), FIELDS)
    assert moment.params == [dt.datetime(2024, 4, 1, tzinfo=dt.UTC)]
    assert "AT TIME ZONE" not in moment.where
    day = compile_filter(condition("created_at", "eq", "2024-04-01"), FIELDS)
    assert day.params == [dt.date(2024, 4, 1)] and "AT TIME ZONE 'Asia/Tokyo'" in day.where
    # a choice may be given by its code or by its Japanese label
    assert compile_filter(condition("sales_status", "eq", "契約済"), FIELDS).params == [
        "contracted"
    ]
    assert compile_filter(condition("email", "in", ["A@Example.JP"]), FIELDS).params == [
        ["a@example.jp"]
    ]


def test_like_wildcards_are_escaped() -> None:
    compiled = compile_filter(condition("company", "contains", "100%_\\"), FIELDS)
    assert compiled.params == ["%100\\%\\_\\\\%"]
    assert compile_filter(condition("company", "starts_with", "株式会社"), FIELDS).params == [
        "株式会社%"
    ]


def test_ne_and_negation_keep_missing_values() -> None:
    assert "IS DISTINCT FROM" in compile_filter(condition("company", "ne", "A"), FIELDS).where
    # a nullable leaf is never NULL, so NOT (leaf) matches contacts without a value
    where = compile_filter({"not": condition("company", "eq", "A")}, FIELDS).where
    assert where == "NOT ((c.company IS NOT NULL AND c.company = $1::text))"
    where = compile_filter(condition("custom.note", "contains", "A"), FIELDS).where
    assert where.endswith("IS TRUE")
    # eq on a custom field is containment (GIN-indexed), which is never NULL either
    compiled = compile_filter({"not": condition("custom.note", "eq", "A")}, FIELDS)
    assert compiled.where == "NOT (c.custom @> $1::jsonb)"
    assert compiled.params == [{"note": "A"}]


def test_custom_eq_binds_the_document_it_contains() -> None:
    """One jsonb parameter, the custom value as JSON has it: numbers as numbers (3.0 and 3
    compare equal in jsonb), booleans, choice codes for labels, dates as ISO text."""
    cases = [
        ("custom.seats", 3, {"seats": 3}),
        ("custom.seats", 2.5, {"seats": 2.5}),
        ("custom.vip", True, {"vip": True}),
        ("custom.renewal", "2025-01-31", {"renewal": "2025-01-31"}),
    ]
    for field, value, document in cases:
        compiled = compile_filter(condition(field, "eq", value), FIELDS)
        assert compiled.where == "c.custom @> $1::jsonb"
        assert compiled.params == [document]
        assert type(compiled.params[0][field[len("custom.") :]]) is type(value)


def test_nested_groups_and_numbering_from_first_param() -> None:
    filter = {
        "all": [
            condition("star", "eq", True),
            {
                "any": [
                    condition("score", "gte", 10),
                    {"not": condition("tags", "include_any", ["x"])},
                ]
            },
            {"membership": {"group_id": 3, "state": "deliverable"}},
            {"delivery_state": "any_banned"},
            {"history": {"event": "opened", "campaign_ids": ["c1", "c2"], "within_days": 30}},
        ]
    }
    compiled = compile_filter(filter, FIELDS, first_param=4)
    check_numbering(compiled, first=4)
    assert compiled.params == [True, 10, ["x"], 3, "deliverable", "opened", ["c1", "c2"], 30]
    assert compiled.where.startswith("((c.star = $4::boolean) AND ((")


def test_membership_and_history_shapes() -> None:
    member = compile_filter({"membership": {"group_id": 3, "state": "member"}}, FIELDS)
    assert member.params == [3] and member.where.startswith("EXISTS (")
    outsider = compile_filter({"membership": {"group_id": 3, "state": "not_member"}}, FIELDS)
    assert outsider.where.startswith("NOT EXISTS (")
    history = compile_filter(
        {"history": {"event": "clicked", "campaign_id": "c9", "negate": True}}, FIELDS
    )
    assert history.where.startswith("NOT EXISTS (") and history.params == ["clicked", "c9"]
    for state in ("all_deliverable", "any_unsubscribed", "any_banned"):
        assert compile_filter({"delivery_state": state}, FIELDS).params == []


def test_user_values_never_reach_the_sql() -> None:
    filters = [
        condition("name", "eq", EVIL),
        condition("name", "contains", EVIL),
        condition("email", "in", [EVIL]),
        condition("custom.note", "starts_with", EVIL),
        condition("tags", "include_all", [EVIL]),
        {"history": {"event": "received", "campaign_id": EVIL}},
    ]
    for filter in filters:
        compiled = compile_filter(filter, FIELDS)
        assert "DROP" not in compiled.where.upper()
        assert any("DROP TABLE" in json.dumps(p, default=str).upper() for p in compiled.params)


def test_custom_keys_are_checked_then_bound() -> None:
    err = error(condition(f"custom.{EVIL}", "eq", "a"))
    assert err.field == "filter.field" and "unknown custom field" in err.reason
    assert "custom.plan" in err.reason
    # even a definition with a hostile key (the table's CHECK forbids it) is only ever bound
    fields = {EVIL: FieldDefinition(EVIL, "evil", "text")}
    compiled = compile_filter(condition(f"custom.{EVIL}", "eq", "a"), fields)
    assert EVIL not in compiled.where and compiled.params == [{EVIL: "a"}]
    compiled = compile_filter(condition(f"custom.{EVIL}", "starts_with", "a"), fields)
    assert EVIL not in compiled.where and compiled.params == [EVIL, "a%"]


@pytest.mark.parametrize(
    ("filter", "path", "words"),
    [
        ({"field": "name", "op": "eq", "value": "a", "extra": 1}, "filter.extra", "unknown key"),
        ({"all": [{"bogus": 1}]}, "filter.all[0]", "exactly one of"),
        ({"all": [{"not": {}}, {"any": 3}]}, "filter.all[0].not", "exactly one of"),
        ({"any": [{"all": [], "any": []}]}, "filter.any[0]", "exactly one of"),
        ({"any": 3}, "filter.any", "takes a list"),
        ([], "filter", "must be an object"),
        (condition("nickname", "eq", "a"), "filter.field", "unknown field"),
        (condition("tags.x", "eq", "a"), "filter.field", "custom.<key>"),
        (condition("custom.nope", "eq", "a"), "filter.field", "unknown custom field"),
        (condition(3, "eq", "a"), "filter.field", "must be a string"),
        (condition("name", "like", "a"), "filter.op", "unknown op"),
        (condition("name", ["eq"], "a"), "filter.op", "unknown op"),
        (condition("name", "gt", "a"), "filter.op", "not valid"),
        (condition("star", "contains", "a"), "filter.op", "allowed: eq, ne, empty, not_empty"),
        (condition("tags", "eq", "a"), "filter.op", "include_any"),
        (condition("score", "contains", "1"), "filter.op", "not valid"),
        (condition("sales_status", "gt", "open"), "filter.op", "not valid"),
        (condition("score", "eq", "10"), "filter.value", "expected a number"),
        (condition("score", "eq", True), "filter.value", "expected a number"),
        (condition("score", "eq", float("nan")), "filter.value", "finite"),
        (condition("star", "eq", "true"), "filter.value", "true or false"),
        (condition("name", "eq", 3), "filter.value", "expected a string"),
        (condition("name", "eq", "a\x00b"), "filter.value", "NUL"),
        (condition("name", "eq"), "filter.value", "needs a value"),
        (condition("name", "empty", "x"), "filter.value", "takes no value"),
        (condition("acquired_at", "eq", "2024-02-30"), "filter.value", "YYYY-MM-DD"),
        (condition("acquired_at", "eq", "20240201"), "filter.value", "YYYY-MM-DD"),
        (condition("custom.renewal", "gt", "next week"), "filter.value", "YYYY-MM-DD"),
        (condition("created_at", "gt", "yesterday"), "filter.value", "ISO 8601"),
        (condition("sales_status", "eq", "won"), "filter.value", "open, replied"),
        (condition("custom.plan", "eq", "gold"), "filter.value", "free, pro"),
        (condition("name", "in", []), "filter.value", "non-empty list"),
        (condition("name", "in", "a"), "filter.value", "non-empty list"),
        (condition("name", "in", ["a", 3]), "filter.value[1]", "expected a string"),
        (condition("score", "between", [1]), "filter.value", "[low, high]"),
        (condition("score", "between", [5, 1]), "filter.value", "low <= high"),
        (condition("score", "between", [1, "x"]), "filter.value[1]", "expected a number"),
        (condition("tags", "include_any", []), "filter.value", "non-empty list"),
        (condition("tags", "include_any", ["a", None]), "filter.value[1]", "expected a string"),
        ({"membership": {"group_id": "3"}}, "filter.membership.group_id", "positive integer"),
        ({"membership": {"group_id": 3, "state": "gone"}}, "filter.membership.state", "not_member"),
        ({"membership": {"group_id": 3, "x": 1}}, "filter.membership.x", "unknown key"),
        ({"membership": 3}, "filter.membership", "object"),
        ({"delivery_state": "some"}, "filter.delivery_state", "all_deliverable"),
        ({"delivery_state": ["any_banned"]}, "filter.delivery_state", "all_deliverable"),
        ({"history": {"event": "bounced"}}, "filter.history.event", "received, opened"),
        (
            {"history": {"event": "opened", "within_days": 0}},
            "filter.history.within_days",
            "positive integer",
        ),
        (
            {"history": {"event": "opened", "within_days": 10**9}},
            "filter.history.within_days",
            "at most",
        ),
        (
            {"history": {"event": "opened", "negate": "yes"}},
            "filter.history.negate",
            "true or false",
        ),
        (
            {"history": {"event": "opened", "campaign_id": 5}},
            "filter.history.campaign_id",
            "string",
        ),
        (
            {"history": {"event": "opened", "campaign_id": "a", "campaign_ids": ["b"]}},
            "filter.history.campaign_ids",
            "not both",
        ),
        (
            {"history": {"event": "opened", "campaign_ids": []}},
            "filter.history.campaign_ids",
            "non-empty list",
        ),
        ({"saved_filter": "7"}, "filter.saved_filter", "positive integer"),
        (
            {"all": [condition("name", "eq", "a"), {"not": condition("score", "gt", "x")}]},
            "filter.all[1].not.value",
            "expected a number",
        ),
    ],
)
def test_errors_name_the_path_and_what_is_allowed(filter: object, path: str, words: str) -> None:
    err = error(filter)
    assert err.field == path, err.reason
    assert words in err.reason


def test_nesting_and_size_limits() -> None:
    deep: dict = condition("star", "eq", True)
    for _ in range(19):
        deep = {"not": deep}
    compile_filter(deep, FIELDS)  # 20 levels is fine
    err = error({"all": [deep]})
    assert "deeper than 20" in err.reason and err.field is not None
    compile_filter({"any": [condition("score", "eq", i) for i in range(499)]}, FIELDS)
    err = error({"any": [condition("score", "eq", i) for i in range(500)]})
    assert "more than 500" in err.reason and err.field == "filter.any[499]"


SAVED = {
    1: SavedFilterRef(1, None, condition("star", "eq", True)),
    2: SavedFilterRef(2, 12, {"all": [{"saved_filter": 1}, condition("score", "gte", 5)]}),
    3: SavedFilterRef(3, None, {"any": [{"saved_filter": 4}]}),
    4: SavedFilterRef(4, None, {"not": {"saved_filter": 3}}),
    5: SavedFilterRef(5, None, {"field": "score", "op": "gt", "value": "many"}),
}


def test_saved_filters_are_inlined() -> None:
    compiled = compile_filter(
        {"all": [condition("name", "eq", "a"), {"saved_filter": 1}]}, FIELDS, saved_filters=SAVED
    )
    assert compiled.params == ["a", True]
    check_numbering(compiled)
    scoped = compile_filter({"saved_filter": 2}, FIELDS, saved_filters=SAVED, group_scope=12)
    assert scoped.params == [True, 5]


def test_saved_filter_errors() -> None:
    err = error({"saved_filter": 99}, saved_filters=SAVED)
    assert err.field == "filter.saved_filter" and "unknown saved filter 99" in err.reason
    for scope in (None, 13):
        err = error({"any": [{"saved_filter": 2}]}, saved_filters=SAVED, group_scope=scope)
        assert err.field == "filter.any[0].saved_filter" and "scoped to group 12" in err.reason
    err = error({"saved_filter": 3}, saved_filters=SAVED)
    assert "cycle: 3 → 4 → 3" in err.reason
    err = error({"saved_filter": 5}, saved_filters=SAVED)
    assert err.field == "filter.saved_filter[5].value"


def test_referenced_saved_filters() -> None:
    filter = {
        "all": [
            {"saved_filter": 1},
            {"not": {"any": [{"saved_filter": 7}]}},
            {"saved_filter": True},
            condition("score", "eq", 1),
        ]
    }
    assert referenced_saved_filters(filter) == {1, 7}
    assert referenced_saved_filters(None) == set()


# -- search: sort, limit, cursor ---------------------------------------------------------


def search(
    cursor: str | None = None,
    sort: object = "-updated_at",
    filter: dict | None = None,
    limit: int = 7,
):
    return compile_search(filter, FIELDS, sort=sort, limit=limit, cursor=cursor)  # type: ignore[arg-type]


def test_page_and_count_queries() -> None:
    page, _ = search(filter=condition("score", "gte", 10), sort=["company", "-score"])
    assert page.sql_count == "SELECT count(*) FROM contact c WHERE c.score >= $1::bigint"
    assert page.count_params == [10]
    assert page.sql_page == (
        "SELECT c.* FROM contact c WHERE c.score >= $1::bigint ORDER BY (c.company IS NULL), "
        "c.company ASC, c.score DESC, c.id ASC LIMIT $2"
    )
    assert page.page_params == [10, 7]


@pytest.mark.parametrize(
    "sort",
    [
        "email",
        "-name",
        ["company", "-score"],
        [{"field": "acquired_at", "direction": "desc"}],
        ["-id"],
        None,
        ["created_at", {"field": "name_kana"}, "-updated_at"],
    ],
)
def test_cursor_round_trip(sort: object) -> None:
    page, next_cursor = search(sort=sort)
    row = {
        "id": 41,
        "email": "a@b.jp",
        "name": None,
        "name_kana": "ヤマダ",
        "company": "株式会社あ",
        "score": 3,
        "acquired_at": dt.date(2024, 1, 2),
        "created_at": dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
        "updated_at": dt.datetime(2024, 5, 6, tzinfo=dt.UTC),
    }
    cursor = next_cursor(row)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cursor)
    following, again = search(cursor, sort=sort)
    assert following.count_params == page.count_params
    assert following.page_params[-1] == 7
    check = CompiledFilter(following.sql_page, following.page_params)
    check_numbering(check)
    assert again(row) == cursor
    # cursor values are parameters typed like their columns
    expected = [v for k, v in row.items() if k in following.sql_page and v is not None]
    assert set(following.page_params[:-1]) <= set(expected)


def test_keyset_predicate_handles_nulls_and_directions() -> None:
    _, next_cursor = search(sort=["-name", "score"])
    cursor = next_cursor({"name": None, "score": 3, "id": 9})
    page, _ = search(cursor, sort=["-name", "score"])
    assert (
        "(c.name IS NULL AND c.score > $1::bigint) OR "
        "(c.name IS NULL AND c.score = $1::bigint AND c.id > $2::bigint)"
    ) in page.sql_page
    cursor = next_cursor({"name": "佐藤", "score": 3, "id": 9})
    page, _ = search(cursor, sort=["-name", "score"])
    assert "(c.name IS NULL) OR (c.name IS NOT NULL AND c.name < $1::text) OR" in page.sql_page
    assert page.page_params == ["佐藤", 3, 9, 7]


def encode(body: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def test_bad_cursors_are_refused() -> None:
    _, next_cursor = search(sort="-updated_at")
    good = next_cursor({"updated_at": dt.datetime(2024, 5, 6, tzinfo=dt.UTC), "id": 5})
    fingerprint = json.loads(base64.urlsafe_b64decode(good + "=" * (-len(good) % 4)))["f"]
    bad = [
        "not base64!!",
        "",
        encode([1, 2]),
        encode({"f": fingerprint}),
        encode({"f": fingerprint, "v": ["2024-05-06T00:00:00+00:00", "5"]}),
        encode({"f": fingerprint, "v": ["2024-05-06T00:00:00", 5]}),  # naive
        encode({"f": fingerprint, "v": ["yesterday", 5]}),
        encode({"f": fingerprint, "v": [None, 5]}),  # updated_at is never NULL
        encode({"f": fingerprint, "v": ["2024-05-06T00:00:00+00:00"]}),
        encode({"f": "0" * 16, "v": ["2024-05-06T00:00:00+00:00", 5]}),
        good[:-3],
    ]
    for cursor in bad:
        with pytest.raises(InvalidMessage) as info:
            search(cursor, sort="-updated_at")
        assert info.value.field == "cursor", cursor
    with pytest.raises(InvalidMessage, match="different filter or sort") as info:
        search(good, sort="updated_at")
    with pytest.raises(InvalidMessage, match="different filter or sort"):
        search(good, sort="-updated_at", filter=condition("star", "eq", True))
    search(good, sort=[{"field": "updated_at", "direction": "desc"}])  # same sort, other spelling


@pytest.mark.parametrize(
    ("sort", "limit", "field"),
    [
        ("custom.plan", 5, "sort"),
        ("phone", 5, "sort"),
        (["a", "b", "c", "d"], 5, "sort"),
        ([{"field": "name", "direction": "up"}], 5, "sort[0]"),
        (["name", "-name"], 5, "sort[1]"),
        ([{"field": "name", "order": "asc"}], 5, "sort[0]"),
        ([3], 5, "sort[0]"),
        (7, 5, "sort"),
        ("id", 0, "limit"),
        ("id", MAX_LIMIT + 1, "limit"),
        ("id", True, "limit"),
        ("id", "10", "limit"),
    ],
)
def test_bad_sort_and_limit(sort: object, limit: object, field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        compile_search(None, FIELDS, sort=sort, limit=limit, cursor=None)  # type: ignore[arg-type]
    assert info.value.field == field


# Inputs that once answered 500 (issue 17) --------------------------------------------------


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"f":"x","v":' + b"[" * 3000 + b"]" * 3000 + b"}",
        b"[" * 3000 + b"]" * 3000,
        b'{"f":"x","v":[{"a":1}]}',
        b'{"f":"x","v":[1],"extra":1}',
        b'{"f":"x","v":[99999999999999999999]}',
    ],
)
def test_a_cursor_of_the_wrong_shape_is_malformed(raw: bytes) -> None:
    with pytest.raises(InvalidMessage) as caught:
        compile_search(None, FIELDS, sort=None, limit=10, cursor=_cursor(raw))
    assert caught.value.field == "cursor"


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_an_instant_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        compile_filter({"field": "created_at", "op": "gt", "value": value}, FIELDS)
    assert caught.value.field == "filter.value" and "out of range" in caught.value.reason


def test_saved_filter_ids_beyond_64_bits_are_not_loaded() -> None:
    assert referenced_saved_filters({"any": [{"saved_filter": 2**70}, {"saved_filter": 3}]}) == {3}
