"""The exporter's pure decisions: requests, and which jobs.events record wins."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.topics import Topic
from services.exporter.processor import check_record, latest_per_job, parse_request, title
from services.exporter.sources import _request_field

NOW = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)


def _event(job: str, status: str, minute: int) -> dict[str, object]:
    return {"job_id": job, "status": status, "updated_at": NOW + dt.timedelta(minutes=minute)}


def test_newest_record_per_job_wins_whatever_the_order() -> None:
    batch = [
        _event("a", "running", 2),
        _event("a", "done", 3),
        _event("a", "queued", 1),
        _event("b", "queued", 0),
    ]
    latest = {e["job_id"]: e["status"] for e in latest_per_job(batch)}
    assert latest == {"a": "done", "b": "queued"}


def test_a_request_becomes_a_schema_valid_record_and_reads_back() -> None:
    body = {
        "source": "group",
        "group_id": 12,
        "membership_states": ["unsubscribed", "unsubscribed"],
        "columns": ["email", {"key": "unsubscribed_at:12", "label": "配信停止日時(配信停止方法)"}],
        "encoding": "cp932",
    }
    request = parse_request(body, requested_by="operator", notify_email="ops@x.jp", now=NOW)
    assert request["membership_states"] == ["unsubscribed"]
    assert (request["header"], request["safe_csv"], request["notify_email"]) == (
        True,
        True,
        "ops@x.jp",
    )
    data, headers = avro.encode(Topic.EXPORT_REQUESTS, request)
    decoded = avro.decode(Topic.EXPORT_REQUESTS, data, headers)
    assert check_record(decoded, notify_email="other@x.jp") == request


def test_the_configured_operator_address_is_taken_as_configured() -> None:
    """operator@localhost (tayori dev) is no address a user could give, yet it is the one
    configured: the request and the record read back both keep it."""
    body = {"source": "group", "group_id": 12, "columns": ["email"]}
    request = parse_request(
        body, requested_by="operator", notify_email="operator@localhost", now=NOW
    )
    assert request["notify_email"] == "operator@localhost"
    data, headers = avro.encode(Topic.EXPORT_REQUESTS, request)
    decoded = avro.decode(Topic.EXPORT_REQUESTS, data, headers)
    assert check_record(decoded, notify_email="operator@localhost") == request
    with pytest.raises(InvalidMessage):
        parse_request(
            {**body, "notify_email": "operator@localhost"},
            requested_by="operator",
            notify_email="ops@x.jp",
            now=NOW,
        )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"source": "everything"}, "source"),
        ({"group_id": 0}, "group_id"),
        ({"columns": [{"key": "email", "width": 3}]}, "columns[0]"),
        ({"columns": ["custom_fields.Bad-Key"]}, "columns[0]"),
        ({"columns": ["unsubscribed_at:x"]}, "columns[0]"),
        ({"header": "yes"}, "header"),
        ({"notify_email": "nobody"}, "notify_email"),
        ({"notify_email": "ops@x.jp\r\nBcc: all@x.jp"}, "notify_email"),
        ({"notify_email": 42}, "notify_email"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_requests_name_the_field(change: dict[str, object], field: str) -> None:
    body = {"source": "group", "group_id": 12, "columns": ["email"], **change}
    with pytest.raises(InvalidMessage) as refused:
        parse_request(body, requested_by="admin", notify_email="ops@x.jp", now=NOW)
    assert refused.value.field == field


def test_a_group_export_narrowed_by_a_filter_and_a_saved_filter_round_trips() -> None:
    """Issue 18: 配信リスト → 絞込条件 → CSV出力; the record carries both, and reads back."""
    search = {"field": "tags", "op": "include_any", "value": ["展示会"]}
    body = {
        "source": "group",
        "group_id": 12,
        "filter": search,
        "saved_filter_id": 7,
        "columns": ["email"],
    }
    request = parse_request(body, requested_by="operator", notify_email="ops@x.jp", now=NOW)
    assert (request["group_id"], request["saved_filter_id"]) == (12, 7)
    assert json.loads(request["filter_json"]) == search
    assert "group 12" in title(request) and "saved filter 7" in title(request)
    data, headers = avro.encode(Topic.EXPORT_REQUESTS, request)
    decoded = avro.decode(Topic.EXPORT_REQUESTS, data, headers)
    assert check_record(decoded, notify_email="ops@x.jp") == request
    whole = {**body, "filter": {}}
    assert (
        parse_request(whole, requested_by="a", notify_email="o@x.jp", now=NOW)["filter_json"]
        is None
    )
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"filter": []}, "filter"),
        ({"saved_filter_id": 0}, "saved_filter_id"),
    ]
    for change, field in refusals:
        with pytest.raises(InvalidMessage) as refused:
            parse_request(
                {**body, **change}, requested_by="admin", notify_email="ops@x.jp", now=NOW
            )
        assert refused.value.field == field


FILTER = '{"all": []}'


@pytest.mark.parametrize(
    ("request_keys", "field", "named"),
    [
        ({"filter_json": FILTER, "saved_filter_id": 7}, "filter.all[0].field", "filter"),
        ({"filter_json": FILTER, "saved_filter_id": 7}, "filter.all[1]", "saved_filter_id"),
        ({"saved_filter_id": 7}, "filter.all[0].saved_filter", "saved_filter_id"),
        ({"saved_filter_id": 7}, "saved_filter", "saved_filter_id"),
        ({"filter_json": FILTER}, "saved_filter", "filter"),
        ({"filter_json": FILTER}, "columns", "group"),
        ({"filter_json": FILTER}, "filter", "filter"),
        ({}, None, "group"),
    ],
)
def test_a_contacts_refusal_names_the_group_exports_key(
    request_keys: dict[str, object], field: str | None, named: str
) -> None:
    request = {"source": "group", "group_id": 12, **request_keys}
    assert _request_field(request, field) == named
    assert _request_field({"source": "filter"}, field) == "filter"
