"""Following domain.policy (services/sender/policyfeed.py) into the pacing, without a
broker: records, tombstones and unreadable records."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord

from libs.common import avro
from libs.common.settings import load
from libs.common.topics import Topic
from services.sender.pacing import DomainPacing
from services.sender.policyfeed import apply
from services.sender.settings import SenderSettings


def _record(key: bytes | None, value: bytes | None, headers: Any = ()) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic="domain.policy",
        partition=0,
        offset=7,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=list(headers),
    )


def _pacing() -> DomainPacing:
    return DomainPacing(
        load(SenderSettings, {}), requeue=lambda _: None, give_up=lambda _d, _why: None
    )


def test_a_record_sets_and_a_tombstone_clears_the_published_policy() -> None:
    pacing = _pacing()
    until = int(time.time() * 1000) + 600_000
    data, headers = avro.encode(
        Topic.DOMAIN_POLICY,
        {
            "domain": "slow.example",
            "state": "throttled",
            "messages_per_second": 2.5,
            "connections": None,
            "reason": "deferral_ratio 0.50 >= 0.30 (10/20 in 1m)",
            "until": until,
            "decided_at": until - 600_000,
        },
    )
    assert apply(pacing, _record(b"slow.example", data, headers)) == "slow.example"
    published = pacing.published["slow.example"]
    assert (published.state, published.rate, published.connections) == ("throttled", 2.5, 0)
    assert published.until == datetime.fromtimestamp(until / 1000, UTC)
    policy = pacing.policy_of("slow.example")
    assert (policy.state, policy.rate) == ("throttled", 2.5)
    assert policy.reason == "deferral_ratio 0.50 >= 0.30 (10/20 in 1m)"

    assert apply(pacing, _record(b"slow.example", None)) == "slow.example"
    assert "slow.example" not in pacing.published
    assert pacing.policy_of("slow.example").state == "normal"


def test_an_unreadable_record_is_skipped() -> None:
    pacing = _pacing()
    assert apply(pacing, _record(b"bad.example", b"\x00not avro")) is None
    assert apply(pacing, _record(None, b"")) is None
    assert pacing.published == {}
