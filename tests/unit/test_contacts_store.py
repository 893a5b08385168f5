"""The contacts store's bulk statements agree with the Python that fills them."""

from __future__ import annotations

import datetime as dt
import json
import re

from services.contacts.processor import ContactPatch
from services.contacts.store import INSERT_COLUMNS, QUERIES, _found_by, _insert_row, batch_runs


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


def test_addresses_differing_by_case_are_one_identity_in_a_batch() -> None:
    patches = [
        ContactPatch(columns={"email": "Norm@example.jp"}),
        ContactPatch(columns={"email": "other@example.jp"}),
        ContactPatch(columns={"email": "NORM@example.jp"}),  # the same address: a new run
    ]
    assert batch_runs(patches) == [[0, 1], [2]]


def test_an_update_found_by_address_keeps_the_stored_spelling() -> None:
    patch = ContactPatch(columns={"email": "NORM@example.jp", "name": "N"})
    assert _found_by(patch, "email").columns == {"name": "N"}
    assert _found_by(patch, "external_id") is patch  # found by its upstream key: a new address
