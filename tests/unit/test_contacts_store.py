"""The contacts store's bulk statements agree with the Python that fills them."""

from __future__ import annotations

import datetime as dt
import json
import re

from services.contacts.processor import ContactPatch
from services.contacts.store import INSERT_COLUMNS, QUERIES, _insert_row


def test_insert_columns_are_the_statements_columns_in_order() -> None:
    sql = QUERIES["insert-contacts"]
    target = re.search(r"INSERT INTO contact \(([^)]*)\)", sql)
    aliases = re.search(r"AS u\(([^)]*)\)", sql)
    assert target and aliases
    names = [n.strip() for n in target.group(1).split(",")]
    assert names == [*INSERT_COLUMNS, "tags", "custom"]
    assert [n.strip() for n in aliases.group(1).split(",")] == [*names, "n"]
    assert sql.count("$") == len(names)


def test_insert_row_leaves_absent_columns_null_and_carries_tags_as_json() -> None:
    patch = ContactPatch(
        columns={"email": "a@example.jp", "acquired_at": dt.date(2026, 1, 2), "tags": ["展示会"]},
        custom_set={"plan": "premium"},
    )
    row = _insert_row(patch)
    values = dict(zip([*INSERT_COLUMNS, "tags", "custom"], row, strict=True))
    assert values["email"] == "a@example.jp"
    assert values["acquired_at"] == dt.date(2026, 1, 2)
    assert values["name"] is None and values["star"] is None
    assert json.loads(values["tags"]) == ["展示会"]
    assert values["custom"] == {"plan": "premium"}
    assert _insert_row(ContactPatch(columns={"email": "b@example.jp"}))[-2] is None
