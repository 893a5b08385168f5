"""send.requests v4: requests name their campaign's content by id, the content arrives once on
``campaign.content``. A request may arrive first (the sender waits for its content, then
sends); a content whose id is not its hash, or a request naming another campaign's content,
is refused to the DLQ — a mail is never rendered with another content than its own."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.common.mail.content import BY_REFERENCE, content_id
from libs.common.topics import Topic
from tayori.embedded import SmtpSink
from tests.conftest import Kafka, Service
from tests.integration.test_sender import CONTENT, mail_to, publish_all, results, send_request

pytestmark = pytest.mark.integration


def content_record(campaign: str, content: dict[str, Any], **fields: Any) -> dict[str, Any]:
    value = {
        "content_id": content_id(campaign, content),
        "campaign_id": campaign,
        "content": content,
        "published_at": datetime.now(UTC),
    }
    value.update(fields)
    return value


def by_reference(campaign: str, contact_id: int, content: dict[str, Any]) -> dict[str, Any]:
    return send_request(
        campaign, contact_id, content=BY_REFERENCE, content_id=content_id(campaign, content)
    )


async def test_requests_naming_their_content_wait_for_it(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    content = {**CONTENT, "subject": "Only once <#name>"}
    # The requests first: the content is not there yet.
    await publish_all(kafka, [by_reference(campaign, n, content) for n in (1, 2)])
    await asyncio.sleep(0.5)
    assert smtp_sink.messages() == []
    record = content_record(campaign, content)
    await kafka.send(Topic.CAMPAIGN_CONTENT, record["content_id"], record)
    assert {r["outcome"] for r in await results(kafka, 2)} == {"sent"}
    subjects = sorted(str(m["Subject"]) for m in await mail_to(smtp_sink, 2))
    assert subjects == ["Only once Name1", "Only once Name2"]
    # Stored for later requests (and other replicas, and a restart).
    await publish_all(kafka, [by_reference(campaign, 3, content)])
    assert len(await results(kafka, 3)) == 3


async def test_a_content_is_only_ever_the_one_its_id_names(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign, other = str(uuid.uuid4()), str(uuid.uuid4())
    content = {**CONTENT, "subject": "Genuine"}
    forged = content_record(campaign, {**content, "subject": "Forged"})
    forged["content_id"] = content_id(campaign, content)  # another content's id
    await kafka.send(Topic.CAMPAIGN_CONTENT, forged["content_id"], forged)
    dead = await kafka.read(Topic.CAMPAIGN_CONTENT.dlq, until=lambda rs: len(rs) >= 1)
    assert dict(dead[0].headers)["dlq-reason"].startswith(b"content_id is not the hash")

    genuine = content_record(campaign, content)
    await kafka.send(Topic.CAMPAIGN_CONTENT, genuine["content_id"], genuine)
    # A request of another campaign naming this content is refused; its own is sent.
    stray = {**by_reference(campaign, 5, content), "campaign_id": other}
    await publish_all(kafka, [stray, by_reference(campaign, 6, content)])
    dead = await kafka.read(Topic.SEND_REQUESTS.dlq, until=lambda rs: len(rs) >= 1)
    assert dict(dead[0].headers)["dlq-reason"].startswith(b"content_id names another")
    [result] = await results(kafka, 1)
    assert (result["contact_id"], result["outcome"]) == (6, "sent")
    [mail] = await mail_to(smtp_sink, 1)
    assert str(mail["Subject"]) == "Genuine"
