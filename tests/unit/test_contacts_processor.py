"""Contacts' validation paths made faster keep their answers (see also test_processor.py)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from libs.common.errors import InvalidMessage
from services.contacts.models import FieldDefinition
from services.contacts.processor import contact_patch


def test_errors_name_the_field_with_its_prefix() -> None:
    fields = {"plan": FieldDefinition("plan", "プラン", "choice", ("free",))}
    cases: dict[str, dict[str, Any]] = {
        "contact.name": {"name": ["not", "text"]},
        "contact.star": {"star": "maybe"},
        "contact.acquired_at": {"acquired_at": "soon"},
        "contact.sales_status": {"sales_status": "unknown"},
        "contact.tags": {"tags": [1]},
        "contact.custom_fields.plan": {"custom_fields": {"plan": "gold"}},
        "contact.bogus": {"bogus": 1},
    }
    for field, body in cases.items():
        with pytest.raises(InvalidMessage) as caught:
            contact_patch(body, fields, prefix="contact.")
        assert caught.value.field == field
    with pytest.raises(InvalidMessage) as caught:
        contact_patch({"star": "maybe"}, fields)
    assert caught.value.field == "star"


def test_a_body_becomes_its_patch() -> None:
    patch = contact_patch(
        {
            "name": " 太郎 ",
            "memo": "",
            "sales_status": "",
            "engagement": "",
            "star": "はい",
            "tags": "a、b,a",
            "acquired_at": "2026/1/2",
            "website": None,
        },
        {},
    )
    assert patch.columns == {
        "name": "太郎",
        "memo": None,
        "sales_status": "open",
        "engagement": None,
        "star": True,
        "tags": ["a", "b"],
        "acquired_at": dt.date(2026, 1, 2),
    }
