"""The contacts API's request models (services/contacts/schemas.py): shape limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from services.contacts.schemas import (
    FILTER_LEVELS,
    ContactBody,
    ImportOptions,
    SearchBody,
)

LEAF = {"field": "star", "op": "eq", "value": True}


def _nots(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = LEAF
    for _ in range(levels):
        node = {"not": node}
    return node


def test_filters_nest_at_most_the_declared_levels() -> None:
    SearchBody.model_validate({"filter": _nots(FILTER_LEVELS)})
    with pytest.raises(ValidationError) as caught:
        SearchBody.model_validate({"filter": _nots(FILTER_LEVELS + 1)})
    assert caught.value.errors()[0]["loc"] == ("filter",)


def test_contact_bodies_keep_their_loose_values_and_refuse_nesting() -> None:
    body = ContactBody.model_validate(
        {"email": "a@example.jp", "phone": 312345, "star": "はい", "tags": "vip,新規"}
    )
    assert body.model_dump(exclude_unset=True) == {
        "email": "a@example.jp",
        "phone": 312345,
        "star": "はい",
        "tags": "vip,新規",
    }
    for bad, loc in (
        ({"name": ["山田"]}, ("name",)),
        ({"name": True}, ("name",)),
        ({"tags": 5}, ("tags",)),
        ({"custom_fields": {"plan": {"a": 1}}}, ("custom_fields",)),
        ({"nickname": "x"}, ("nickname",)),
    ):
        with pytest.raises(ValidationError) as caught:
            ContactBody.model_validate(bad)
        assert caught.value.errors()[0]["loc"] == loc, bad


def test_an_import_mapping_is_a_flat_json_object() -> None:
    ImportOptions.model_validate({"mapping": json.dumps({"氏名": "name", "備考": ""})})
    for mapping in ('{"a":' * 3000 + '"x"' + "}" * 3000, "[1]", '{"a": 1}', "{not json"):
        with pytest.raises(ValidationError) as caught:
            ImportOptions.model_validate({"mapping": mapping})
        assert caught.value.errors()[0]["loc"] == ("mapping",)
