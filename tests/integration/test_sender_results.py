"""The sender's delivery.results leave from the ledger, with no outbox row: a batch whose
results the broker did not acknowledge is handled again, its rows are found done and their
stored results published again (same result_id); nothing is sent twice."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from libs.common.topics import Topic
from services.sender.context import CONTEXT
from tayori.embedded import SmtpSink
from tests.conftest import Kafka, Service, eventually
from tests.integration.test_sender import publish_all, recipients, send_request

pytestmark = pytest.mark.integration


async def test_unacknowledged_results_are_republished_not_resent(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = sender.runtime.app[CONTEXT]
    send_keyed = ctx.publisher.send_keyed
    refused: list[int] = []

    async def unreachable_once(topic: Topic, records: Any) -> Any:
        if topic is Topic.DELIVERY_RESULTS and not refused:
            refused.append(len(list(records)))
            raise KafkaConnectionError("broker unreachable (test)")
        return await send_keyed(topic, records)

    monkeypatch.setattr(ctx.publisher, "send_keyed", unreachable_once)
    campaign = str(uuid.uuid4())
    contacts = range(1, 6)
    await publish_all(kafka, [send_request(campaign, n) for n in contacts])

    by_contact: dict[int, set[str]] = defaultdict(set)

    async def every_contact_answered() -> bool:
        for result in await kafka.read_to_end(Topic.DELIVERY_RESULTS):
            by_contact[result["contact_id"]].add(result["result_id"])
        return set(by_contact) == set(contacts)

    await eventually(every_contact_answered, interval=0.5)
    assert refused, "the first publication of results was to fail"
    assert all(len(ids) == 1 for ids in by_contact.values()), by_contact
    assert recipients(smtp_sink.messages()) == {f"c{n}@example.com": 1 for n in contacts}
    pool = sender.runtime.pool
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    done = await pool.fetchval(
        "SELECT count(*) FROM send_ledger WHERE campaign_id = $1 AND status = 'done'", campaign
    )
    assert done == len(contacts)
