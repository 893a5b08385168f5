"""The sender against the real broker, PostgreSQL and SMTP servers (aiosmtpd)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from libs.common.topics import Topic
from libs.common.unsubscribe import UnsubscribeLinks
from libs.common.verp import VerpAddresses
from tayori.embedded import MaildirHandler, SmtpSink, free_port
from tests.conftest import Kafka, Service, Stack, eventually, running

pytestmark = pytest.mark.integration

SIGNING_KEYS = "dev:insecure-dev-signing-key"  # CommonSettings' default
CONTENT = {
    "from_address": "news@shop.example",
    "from_name": "Shop",
    "reply_to": None,
    "subject": "Hello <#name>",
    "format": "text",
    "body": "Dear <#name>,\n.a line starting with a dot\nLeave: <#unsubscribe_url>\n",
    "coupon_url": None,
}


def send_request(
    campaign_id: str, contact_id: int, email: str | None = None, **fields: Any
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "campaign_id": campaign_id,
        "step_id": None,
        "contact_id": contact_id,
        "email": email or f"c{contact_id}@example.com",
        "group_id": 7,
        "include_unsubscribed": False,
        "merge_values": {"name": f"Name{contact_id}"},
        "content": CONTENT,
        "attempt": 1,
        "released_at": datetime.now(UTC),
        "test": False,
    }
    value.update(fields)
    return value


def control(campaign_id: str, action: str) -> dict[str, Any]:
    return {
        "command_id": str(uuid.uuid4()),
        "campaign_id": campaign_id,
        "action": action,
        "reason": "test",
        "issued_at": datetime.now(UTC),
    }


_versions = iter(range(1, 1_000_000))


def change(kind: str, state: str, **fields: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "change_id": str(uuid.uuid4()),
        "kind": kind,
        "contact_id": None,
        "email": None,
        "group_id": None,
        "state": state,
        "method": "system",
        "changed_at": datetime.now(UTC),
        "version": next(_versions),
    }
    value.update(fields)
    return value


def recipients(messages: list[Message]) -> Counter[str]:
    return Counter(str(m["X-Tayori-Envelope-To"]) for m in messages)


async def results(kafka: Kafka, n: int) -> list[dict[str, Any]]:
    return await kafka.read(Topic.DELIVERY_RESULTS, until=lambda rs: len(rs) >= n)


async def publish_all(kafka: Kafka, requests: list[dict[str, Any]]) -> None:
    for r in requests:
        await kafka.send(Topic.SEND_REQUESTS, r["contact_id"], r)


async def mail_to(sink: SmtpSink, n: int) -> list[Message]:
    async def arrived() -> list[Message]:
        got = sink.messages()
        return got if len(got) >= n else []

    return await eventually(arrived)


async def test_campaign_mail_arrives_personalised(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    await publish_all(kafka, [send_request(campaign, 1), send_request(campaign, 2)])
    got = await results(kafka, 2)
    assert {r["outcome"] for r in got} == {"sent"}
    assert {r["contact_id"] for r in got} == {1, 2}
    mails = await mail_to(smtp_sink, 2)
    by_to = {str(m["To"]): m for m in mails}
    mail = by_to["c1@example.com"]
    assert mail["Subject"] == "Hello Name1"
    body = mail.get_payload(decode=True).decode()
    assert "Dear Name1," in body
    assert "\n.a line starting with a dot" in body.replace("\r\n", "\n")
    links = UnsubscribeLinks(SIGNING_KEYS, "http://127.0.0.1:8082")
    url = "".join(str(mail["List-Unsubscribe"]).split()).strip("<>")  # folded
    assert url in body
    target = links.read(url.rsplit("/", 1)[1])
    assert (target.contact_id, target.group_id, target.campaign_id) == (1, 7, campaign)
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    verp = VerpAddresses(SIGNING_KEYS, "bounces.localhost").read(
        str(mail["X-Tayori-Envelope-From"])
    )
    assert (verp.campaign_id, verp.contact_id) == (campaign, 1)
    sent = {r["contact_id"]: r for r in got}[1]
    assert sent["message_id"] == str(mail["Message-ID"]).strip()
    assert sent["smtp_code"] == 250
    assert sent["relay"] == f"127.0.0.1:{smtp_sink.port}"
