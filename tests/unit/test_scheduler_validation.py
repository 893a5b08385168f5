"""Campaign validation at creation (F-20..F-23): every bad input names its field."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from libs.common.errors import InvalidMessage
from libs.common.safecsv import safe_cell
from services.scheduler import processor

NOW = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)
LEAD = dt.timedelta(minutes=3)


def body(**changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "name": "お知らせ",
        "category_id": 1,
        "target": {"group_id": 7},
        "from_address": "news@shop.example.jp",
        "from_name": "ショップ",
        "reply_to": "support@shop.example.jp",
        "subject": "<#氏名>様",
        "format": "html",
        "body": "<p><#company> <#plan> <#custom.seats> <#配信停止URL></p>",
        "scheduled_at": (NOW + LEAD).isoformat(),
    }
    value.update(changes)
    return value


def check(payload: dict[str, Any]) -> dict[str, Any]:
    return processor.validate_campaign(
        payload, custom_field_keys=["plan", "seats"], now=NOW, min_lead=LEAD
    )


def test_a_good_campaign() -> None:
    values = check(body())
    assert values["group_id"] == 7 and values["filter"] is None
    assert values["scheduled_at"] == NOW + LEAD  # exactly 3 minutes is enough
    assert values["dedupe"] == "none" and values["include_unsubscribed"] is False
    with_coupon = check(body(body="<#クーポンURL>", coupon_url="https://x.jp/c?u=<#contact_id>"))
    assert with_coupon["coupon_url"] == "https://x.jp/c?u=<#contact_id>"
    both = check(
        body(target={"group_id": 7, "filter": {"field": "star", "op": "eq", "value": True}})
    )
    assert both["filter"] == {"field": "star", "op": "eq", "value": True}


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"body": "<#nickname>"}, "body", "<#nickname>"),
        ({"subject": "<#Name>"}, "subject", "<#Name>"),
        ({"body": "<#coupon_url>"}, "body", "no coupon"),
        ({"coupon_url": "https://x.jp/<#shoe>"}, "coupon_url", "<#shoe>"),
        ({"coupon_url": "javascript:alert(1)"}, "coupon_url", "http"),
        (
            {"scheduled_at": (NOW + LEAD - dt.timedelta(seconds=1)).isoformat()},
            "scheduled_at",
            "3 minutes",
        ),
        ({"scheduled_at": "2026-11-26T12:00:00"}, "scheduled_at", "offset"),
        ({"scheduled_at": "tomorrow"}, "scheduled_at", "ISO 8601"),
        ({"scheduled_at": None}, "scheduled_at", "required"),
        ({"subject": ""}, "subject", "empty"),
        ({"subject": "  "}, "subject", "empty"),
        ({"subject": "a\r\nBcc: x@y.jp"}, "subject", "one line"),
        ({"body": ""}, "body", "empty"),
        ({"name": None}, "name", "required"),
        ({"from_address": "news"}, "from_address", "mail address"),
        ({"from_address": "Shop <news@shop.jp>"}, "from_address", "mail address"),
        ({"from_name": "a\nb"}, "from_name", "one line"),
        ({"reply_to": "x@"}, "reply_to", "mail address"),
        ({"format": "markdown"}, "format", "text or html"),
        ({"dedupe": "by_name"}, "dedupe", "by_email"),
        ({"include_unsubscribed": "yes"}, "include_unsubscribed", "true or false"),
        ({"category_id": "1"}, "category_id", "category"),
        ({"target": None}, "target", "object"),
        ({"target": {}}, "target", "group_id"),
        ({"target": {"group_id": -1}}, "target.group_id", "positive"),
        ({"target": {"filter": []}}, "target.filter", "filter object"),
        ({"target": {"group": 1}}, "target", "unknown keys"),
    ],
)
def test_bad_input_names_its_field(changes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        check(body(**changes))
    assert caught.value.field == field
    assert words in caught.value.reason


def test_known_keys_are_base_and_custom_fields() -> None:
    keys = processor.known_keys(["plan"])
    assert {"name", "company", "email", "contact_id", "plan", "custom.plan"} <= keys
    assert "shoe" not in keys


def test_test_send_addresses() -> None:
    assert processor.parse_test_addresses(" a@x.jp, b@y.jp ,") == ["a@x.jp", "b@y.jp"]
    assert processor.parse_test_addresses(["a@x.jp"]) == ["a@x.jp"]
    assert len(processor.parse_test_addresses(",".join(f"t{i}@x.jp" for i in range(20)))) == 20
    for raw, words in (
        (",".join(f"t{i}@x.jp" for i in range(21)), "at most 20"),
        ("a@x.jp, b", "email address"),
        ("", "at least one"),
        (None, "comma-separated"),
    ):
        with pytest.raises(InvalidMessage, match=words) as caught:
            processor.parse_test_addresses(raw)
        assert caught.value.field == "addresses"


def test_merge_values_of_a_contact_match_the_snapshot_shape() -> None:
    contact = {
        "id": 12,
        "email": "a@x.jp",
        "name": "相川",
        "company": None,
        "tags": ["vip", "new"],
        "star": True,
        "score": 0,
        "custom_fields": {"plan": "premium", "trial": False, "seats": 3},
    }
    assert processor.merge_values_of_contact(contact) == {
        "email": "a@x.jp",
        "name": "相川",
        "score": "0",
        "tags": "vip,new",
        "custom.plan": "premium",
        "custom.trial": "false",
        "custom.seats": "3",
        "contact_id": "12",
    }


def test_csv_cells_are_safe_and_columns_ordered() -> None:
    assert [safe_cell(v) for v in ("=1+1", "+81", "-", "@x", "\tx", "ok", None, 3)] == [
        "'=1+1",
        "'+81",
        "'-",
        "'@x",
        "'\tx",
        "ok",
        "",
        "3",
    ]
    assert processor.merge_columns(["custom.b", "company", "name", "email", "custom.a"]) == [
        "name",
        "company",
        "custom.a",
        "custom.b",
    ]


def test_test_content_is_prefixed() -> None:
    campaign = {
        "subject": "件名",
        "from_address": "a@x.jp",
        "from_name": "",
        "reply_to": None,
        "format": "text",
        "body": "b",
        "coupon_url": None,
        "track_opens": True,
        "track_clicks": False,
    }
    assert processor.content_of(campaign, test=True)["subject"] == "[TEST] 件名"
    assert processor.content_of(campaign)["track_clicks"] is False
    assert processor.content_of(campaign)["from_name"] is None
