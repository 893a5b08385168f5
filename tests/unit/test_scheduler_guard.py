"""The complaint guard's decisions in the scheduler (services/scheduler/guard.py): what a
record holds, what a resume names, and the records it publishes — no broker, no database."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from pathlib import Path

import pytest

from libs.common import avro
from libs.common.errors import InvalidMessage
from libs.common.topics import Topic
from services.scheduler import guard, processor
from services.scheduler.contracts import GuardResumeBody
from services.scheduler.store import QUERIES

EXAMPLES = Path(__file__).parents[2] / "schemas" / "avro" / "examples" / "campaign.guard"
AT = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)


def record(**changes: object) -> dict[str, object]:
    value: dict[str, object] = {
        "guard_id": str(uuid.uuid4()),
        "campaign_id": str(uuid.uuid4()),
        "domains": ["docomo.ne.jp"],
        "reason": "complaint_rate 0.0052 > 0.0030 (13/2500 delivered)",
        "delivered": 2500,
        "complaints": 13,
        "decided_at": AT,
    }
    value.update(changes)
    return value


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_every_example_decodes_and_parses(path: Path) -> None:
    data, headers = avro.encode(Topic.CAMPAIGN_GUARD, json.loads(path.read_text()))
    parsed = guard.parse(avro.decode(Topic.CAMPAIGN_GUARD, data, headers))
    assert parsed.domains and all(d == d.lower() for d in parsed.domains)
    assert parsed.delivered > 0 and parsed.complaints > 0


def test_domains_are_compared_lower_case_without_a_final_dot() -> None:
    parsed = guard.parse(record(domains=[" DoCoMo.ne.jp. ", "gmail.com", "gmail.com"]))
    assert parsed.domains == {"docomo.ne.jp", "gmail.com"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"campaign_id": "not-a-uuid"}, "campaign_id"),
        ({"guard_id": " "}, "guard_id"),
        ({"domains": [""]}, "domains"),
        ({"domains": ["someone@docomo.ne.jp"]}, "domains"),
        ({"domains": ["a" * 254]}, "domains"),
        ({"domains": ["bad\x00.jp"]}, "domains"),
    ],
)
def test_a_record_no_campaign_could_use_is_invalid(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidMessage) as raised:
        guard.parse(record(**changes))
    assert raised.value.field == field


def test_a_record_holds_what_is_neither_resumed_nor_held_already() -> None:
    assert guard.newly_held({"docomo.ne.jp"}, set(), set()) == ["docomo.ne.jp"]
    # The set grew: only the new domain is paused.
    assert guard.newly_held({"docomo.ne.jp", "gmail.com"}, {"docomo.ne.jp"}, set()) == ["gmail.com"]
    # The latest record names a domain an operator resumed again: it stays resumed.
    assert guard.newly_held({"docomo.ne.jp", "gmail.com"}, {"gmail.com"}, {"docomo.ne.jp"}) == []
    # A redelivered or replayed record holds nothing new.
    assert guard.newly_held({"docomo.ne.jp"}, {"docomo.ne.jp"}, set()) == []


def test_a_resume_names_held_domains_or_all_of_them() -> None:
    held = ["gmail.com", "docomo.ne.jp"]
    assert guard.to_resume(held, None) == ["docomo.ne.jp", "gmail.com"]
    assert guard.to_resume(held, ["DOCOMO.ne.jp", "ezweb.ne.jp"]) == ["docomo.ne.jp"]
    assert guard.to_resume(held, ["ezweb.ne.jp"]) == []
    assert guard.to_resume([], None) == []


@pytest.mark.parametrize(
    ("status", "sends"),
    [
        ("draft", True),
        ("reserving", True),
        ("scheduled", True),
        ("sending", True),
        ("sent", False),
        ("aggregating", False),
        ("aggregated", False),
        ("halted", False),
        ("cancelled", False),
        ("failed", False),
    ],
)
def test_only_a_campaign_that_may_still_send_is_paused(status: str, sends: bool) -> None:
    assert guard.may_send(status) is sends


def test_the_domain_of_an_address_is_after_its_last_at() -> None:
    assert guard.domain_of("Taro@DoCoMo.ne.jp") == "docomo.ne.jp"
    assert guard.domain_of('"a@b"@ezweb.ne.jp') == "ezweb.ne.jp"


@pytest.mark.parametrize(
    "name", ["unreleased", "hold-rows", "release-rows", "held-recipients"], ids=lambda n: n
)
def test_the_release_queries_read_the_domain_as_domain_of_does(name: str) -> None:
    assert guard.DOMAIN_SQL in QUERIES[name]


def test_guard_json_is_null_until_the_guard_trips() -> None:
    assert guard.guard_json(None) is None
    row = {
        "held": ["gmail.com", "docomo.ne.jp"],
        "resumed": [],
        "dropped": ["ezweb.ne.jp"],
        "reason": "complaint_rate",
        "delivered": 10,
        "complaints": 1,
        "decided_at": AT,
        "resumed_by": None,
        "resumed_at": None,
    }
    body = guard.guard_json(row, 7)
    assert body is not None
    assert body["held"] == ["docomo.ne.jp", "gmail.com"] and body["held_recipients"] == 7
    assert body["dropped"] == ["ezweb.ne.jp"]
    assert "held_recipients" not in (guard.guard_json(row) or {})


def test_a_pause_with_domains_is_a_valid_campaign_control() -> None:
    value = processor.control(
        str(uuid.uuid4()), "pause", "complaint_rate", str(uuid.uuid4()), AT, ["z.jp", "a.jp"]
    )
    data, headers = avro.encode(Topic.CAMPAIGN_CONTROL, value)
    decoded = avro.decode(Topic.CAMPAIGN_CONTROL, data, headers)
    assert (decoded["action"], decoded["domains"]) == ("pause", ["a.jp", "z.jp"])
    whole = processor.control(str(uuid.uuid4()), "halt", None, str(uuid.uuid4()), AT)
    assert whole["domains"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"domains": []},
        {"domains": ["a@b.jp"]},
        {"domains": ["docomo.ne.jp", 5]},
        {"domains": "docomo.ne.jp"},
        {"domains": ["x" * 254]},
        {"domains": ["ok.jp"] * (guard.MAX_RESUME_DOMAINS + 1)},
        {"domain": ["docomo.ne.jp"]},
    ],
)
def test_a_resume_body_is_strict(body: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=re.escape("validation error")):
        GuardResumeBody.model_validate_json(json.dumps(body))


def test_a_resume_body_may_name_nothing() -> None:
    assert GuardResumeBody.model_validate_json("{}").domains is None
