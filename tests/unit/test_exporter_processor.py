"""The exporter's pure decisions: requests, and which jobs.events record wins."""

from __future__ import annotations

import datetime as dt

import pytest

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.topics import Topic
from services.exporter.processor import check_record, latest_per_job, parse_request

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
