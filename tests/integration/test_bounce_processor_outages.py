"""The bounce processor through a PostgreSQL outage: the SMTP listener answers 451 (the
remote MTA keeps the mail and tries again), the service stays up, and the mail sent again
afterwards is taken and read."""

from __future__ import annotations

import uuid

import aiosmtplib
import pytest

from libs.common.topics import Topic
from tests.conftest import Kafka, Service, Stack
from tests.integration.outage import database_away
from tests.integration.test_bounce_processor import Bounces, count, delivery_result, fixture

pytestmark = pytest.mark.integration


async def test_a_bounce_while_the_database_is_away_is_answered_451_and_taken_afterwards(
    stack: Stack, database: str, bounce_processor: Service, kafka: Kafka
) -> None:
    bounces = Bounces(bounce_processor, kafka)
    contact, campaign = 31, str(uuid.uuid4())
    sent = delivery_result(contact, campaign, "hanako@example.jp", "sent")
    await kafka.send(Topic.DELIVERY_RESULTS, contact, sent)
    await bounces.events(contact, count("status", 1))
    dsn = fixture("postfix_user_unknown")
    async with database_away(stack, database):
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=bounces.port) as smtp:
                await smtp.sendmail("", [bounces.verp.address(campaign, contact)], dsn)
        assert refused.value.code == 451, refused.value
    await bounces.bounce("postfix_user_unknown", campaign, contact)  # the MTA's next try: 250
    events = await bounces.events(contact, count("bounced", 1))
    assert events[-1]["classification"] == "invalid_address"
    healthy, detail = await bounce_processor.runtime.health()
    assert healthy, detail
