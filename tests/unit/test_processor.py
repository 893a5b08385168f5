"""Pure decisions of the contacts service: normalisation, validation, event shapes."""

from __future__ import annotations

import datetime as dt

import pytest

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.topics import Topic
from services.contacts.models import FieldDefinition
from services.contacts.processor import (
    changelog_value,
    contact_patch,
    merge_values,
    upstream_event,
)

FIELDS = {
    "plan": FieldDefinition("plan", "プラン", "choice", ("free", "pro")),
    "seats": FieldDefinition("seats", "席数", "number"),
    "renewal": FieldDefinition("renewal", "更新日", "date"),
    "paid": FieldDefinition("paid", "有料", "boolean"),
    "note": FieldDefinition("note", "備考", "text"),
}


def test_patch_converts_every_kind_and_labels() -> None:
    patch = contact_patch(
        {
            "email": "x@example.jp",
            "name": " 山田 ",
            "sales_status": "契約済",
            "engagement": "hot",
            "star": "はい",
            "tags": "展示会、vip,展示会",
            "acquired_at": "2026/4/1",
            "custom_fields": {
                "plan": "pro",
                "seats": "1,200",
                "renewal": "2027-01-31",
                "paid": "false",
                "note": "",
            },
        },
        FIELDS,
    )
    assert patch.columns["name"] == "山田"
    assert patch.columns["sales_status"] == "contracted"
    assert patch.columns["star"] is True
    assert patch.columns["tags"] == ["展示会", "vip"]
    assert patch.columns["acquired_at"] == dt.date(2026, 4, 1)
    assert patch.custom_set == {
        "plan": "pro",
        "seats": 1200,
        "renewal": "2027-01-31",
        "paid": False,
    }
    assert patch.custom_clear == ["note"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"nickname": "x"}, "nickname"),
        ({"sales_status": "maybe"}, "sales_status"),
        ({"star": "perhaps"}, "star"),
        ({"acquired_at": "yesterday"}, "acquired_at"),
        ({"custom_fields": {"plan": "enterprise"}}, "custom_fields.plan"),
        ({"custom_fields": {"seats": "many"}}, "custom_fields.seats"),
        ({"custom_fields": {"colour": "red"}}, "custom_fields.colour"),
        ({"tags": [1, 2]}, "tags"),
    ],
)
def test_patch_errors_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        contact_patch(body, FIELDS)
    assert caught.value.field == field


def test_upstream_event_needs_a_key_and_a_known_type() -> None:
    base = {
        "event_id": "e1",
        "type": "ContactUpserted",
        "external_id": None,
        "email": None,
        "contact": None,
    }
    with pytest.raises(InvalidMessage, match="external_id or email"):
        upstream_event(base, FIELDS)
    with pytest.raises(InvalidMessage, match="unknown event type"):
        upstream_event({**base, "type": "ContactMerged", "email": "a@example.jp"}, FIELDS)
    event = upstream_event({**base, "external_id": " S-1 ", "email": "A@EXAMPLE.JP"}, FIELDS)
    assert event.patch.columns == {"email": "A@example.jp", "external_id": "S-1"}


def test_changelog_and_merge_values_from_a_row() -> None:
    now = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    row = {
        "id": 5,
        "email": "a@example.jp",
        "external_id": None,
        "name": "山田",
        "name_kana": None,
        "company": "株式会社",
        "department": None,
        "title": None,
        "phone": None,
        "address": None,
        "website": None,
        "memo": None,
        "acquired_at": dt.date(2026, 1, 2),
        "acquisition_channel": "展示会",
        "sales_status": "open",
        "engagement": None,
        "star": True,
        "tags": ["a"],
        "custom": {"paid": True, "seats": 3},
        "score": 4,
        "delivery_status": "ok",
        "version": 2,
        "created_at": now,
        "updated_at": now,
    }
    change = changelog_value(row, 5, version=2, changed_at=now)
    branch, contact = change["contact"]
    assert branch == "tayori.ContactSnapshot"  # the union branch, named for the encoder
    assert contact["custom_fields"] == {"paid": "true", "seats": "3"}
    assert contact["acquired_at"] == "2026-01-02"
    decoded = avro.decode(Topic.CONTACTS_CHANGELOG, *avro.encode(Topic.CONTACTS_CHANGELOG, change))
    assert decoded["contact"]["email"] == "a@example.jp"
    values = merge_values(row)
    assert values["name"] == "山田"
    assert values["custom.seats"] == "3"
    assert "seats" not in values  # custom fields once, as custom.<key>
    assert "name_kana" not in values  # empty fields are left out: they render as ""
    assert values["contact_id"] == "5"
    assert changelog_value(None, 5, version=3, changed_at=now)["op"] == "deleted"
