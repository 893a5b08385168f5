"""Deferrals the sender retries inside itself reach deliverability, end to end: an SMTP
relay (aiosmtpd) answers 421 4.7.0 to one domain's RCPTs, the real sender retries them
and pauses the domain, and the deliverability service — through the real broker — counts
them in that domain's windows under their code and throttles the domain, while the
mail they belong to still waits in the sender with no result (issue 21)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from libs.common import avro
from libs.common.topics import Topic
from tests.conftest import VIEWER_TOKEN, Kafka, Stack, eventually
from tests.integration.relays import serving
from tests.integration.test_deliverability import deliverability
from tests.integration.test_sender import one_connection, queue_for_one_connection, results
from tests.integration.test_sender_domains import FAST, LIMITED, RateLimitingHandler

pytestmark = pytest.mark.integration


async def test_the_senders_deferrals_reach_the_domain_windows_and_throttle_the_domain(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """Three 421 4.7.0 answers pause LIMITED in the sender for far longer than the test
    (SENDER_DOMAIN_PAUSE_SECONDS): its mail has no result yet, only its deferrals are out.
    Deliverability shows them for LIMITED (attempts, deferred, by code 4.7.0) and, with a
    low DELIVERABILITY_DEFERRAL_MIN_ATTEMPTS, publishes a throttled policy for it; FAST,
    all delivered, is counted and gets none."""
    refusals = 3
    handler = RateLimitingHandler(tmp_path / "relay", refusals=refusals, pipelining=True)
    limited = [f"l{i}@{LIMITED}" for i in range(4)]
    fast = [f"f{i}@{FAST}" for i in range(6)]
    await queue_for_one_connection(kafka, 47, [limited[0], *fast, *limited[1:]])
    thresholds = {
        "policy_interval_seconds": 0.2,
        "deferral_min_attempts": refusals,
        "rate_limit_deferrals": 0,  # the 4.7.0 answers throttle here, they do not pause
        "policy_republish_seconds": 3600.0,
    }
    async with deliverability(stack, prefix, **thresholds) as (_, api):
        with serving(handler) as controller:
            relay = f"127.0.0.1:{controller.port}"
            async with one_connection(
                stack,
                database,
                prefix,
                relay,
                domain_pause_after=refusals,
                domain_pause_seconds=600.0,
            ):
                got = await results(kafka, len(fast))
                deferrals = await kafka.read(
                    Topic.DELIVERY_DEFERRALS, until=lambda records: len(records) >= refusals
                )

                async def counted() -> dict[str, Any]:
                    body = await api.ok("GET", f"/v1/domains/{LIMITED}", token=VIEWER_TOKEN)
                    assert body["hour"]["deferred"] == refusals, body["hour"]
                    return dict(body)

                limited_figures = await eventually(counted, timeout=60)

                def throttled(records: list[Any]) -> bool:
                    return any(r.key.decode() == LIMITED and r.value for r in records)

                policies = await kafka.read(Topic.DOMAIN_POLICY, until=throttled, raw=True)
                # The domain is still paused in the sender: none of its mail has a result,
                # deliverability learnt of it from the deferrals alone.
                now = await kafka.read_to_end(Topic.DELIVERY_RESULTS)
                assert {r["email"] for r in now} == set(fast)

    assert {r["email"]: r["outcome"] for r in got} == dict.fromkeys(fast, "sent")
    # One record per 421 to RCPT, with the domain and the code, not the address.
    assert [
        (d["contact_id"], d["domain"], d["smtp_code"], d["enhanced_code"], d["relay"])
        for d in deferrals
    ] == [(47, LIMITED, 421, "4.7.0", relay)] * refusals
    assert all("email" not in d and "closing connection" in d["diagnostic"] for d in deferrals)

    hour = limited_figures["hour"]
    assert (hour["attempts"], hour["deferred"], hour["delivered"]) == (refusals, refusals, 0)
    assert hour["deferred_by_code"] == {"4.7.0": refusals}
    assert hour["deferral_rate"] == 1.0

    records = {r.key.decode(): r for r in policies}
    assert FAST not in records  # healthy: no record
    policy = avro.decode(Topic.DOMAIN_POLICY, records[LIMITED].value, records[LIMITED].headers)
    assert policy["state"] == "throttled", policy
    assert re.fullmatch(r"deferral_ratio 1\.00 >= 0\.30 \(3/3 in [12]m\)", policy["reason"])
