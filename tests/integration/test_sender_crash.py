"""The sender killed with SIGKILL mid-campaign: no recipient gets two mails, every request
gets exactly one result_id, and every recipient gets its mail except those of the one group
commit a kill can land behind (reported sent, "assumed accepted"; ledger.py explains why).
Seen in 2 of ~16 runs on a loaded 2-core machine: 1 and 4 messages."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from libs.common.topics import Topic
from services.sender.ledger import ASSUMED_SENT
from tayori.embedded import SmtpSink, die_with_parent, free_port
from tests.conftest import Kafka, Stack, eventually
from tests.integration.test_sender import recipients, send_request

pytestmark = pytest.mark.integration

TAYORI = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "tayori"
RECIPIENTS = 3000
SMTP_CONNECTIONS = 16


def start_sender(
    stack: Stack, database: str, prefix: str, sink: SmtpSink, log: Path
) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        DATABASE_URL=database,
        KAFKA_BOOTSTRAP=stack.broker.bootstrap,
        KAFKA_TOPIC_PREFIX=prefix,
        KAFKA_SESSION_TIMEOUT_MS="1000",
        KAFKA_FETCH_MAX_WAIT_MS="20",
        SMTP_RELAYS=f"127.0.0.1:{sink.port}",
        SMTP_CONNECTIONS=str(SMTP_CONNECTIONS),
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(free_port()),
        LOG_LEVEL="warning",
        DB_POOL_SIZE="5",
    )
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(TAYORI), "sender"],
            env=env,
            stdout=out,
            stderr=out,
            preexec_fn=die_with_parent,
        )


async def test_kill_9_mid_campaign_sends_each_mail_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    campaign = str(uuid.uuid4())
    futures = [
        await kafka.publisher.send(Topic.SEND_REQUESTS, n, send_request(campaign, n))
        for n in range(1, RECIPIENTS + 1)
    ]
    await asyncio.gather(*futures)
    log = tmp_path / "sender.log"

    process = start_sender(stack, database, prefix, smtp_sink, log)
    try:

        async def some_sent() -> bool:
            assert process.poll() is None, log.read_text()
            return len(smtp_sink.messages()) >= RECIPIENTS // 4

        await eventually(some_sent, timeout=120)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        killed_at = len(smtp_sink.messages())

        process = start_sender(stack, database, prefix, smtp_sink, log)
        by_contact: dict[int, set[str]] = defaultdict(set)

        async def all_answered() -> bool:
            assert process.poll() is None, log.read_text()
            for result in await kafka.read_to_end(Topic.DELIVERY_RESULTS):
                by_contact[result["contact_id"]].add(result["result_id"])
            return len(by_contact) >= RECIPIENTS

        await eventually(all_answered, timeout=180, interval=0.5)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)

    assert killed_at < RECIPIENTS, "the kill came too late to test anything"
    # Never twice.
    counts = recipients(smtp_sink.messages())
    assert {to: n for to, n in counts.items() if n > 1} == {}
    # Every request answered, each by one result_id.
    assert set(by_contact) == set(range(1, RECIPIENTS + 1))
    assert {n: len(ids) for n, ids in by_contact.items() if len(ids) != 1} == {}
    # Every recipient got its mail, except what the decided design gives up: messages whose
    # 'handed' commit landed in the instant before the kill and whose terminator was never
    # written. Those are reported sent "assumed accepted" (ledger.py), and are at most one
    # group commit (one message per connection).
    results = {r["contact_id"]: r for r in await kafka.read_to_end(Topic.DELIVERY_RESULTS)}
    missing = {n for n in range(1, RECIPIENTS + 1) if f"c{n}@example.com" not in counts}
    window = {n: results[n]["diagnostic"] for n in missing}
    assert all(d == ASSUMED_SENT for d in window.values()), window
    assert len(missing) <= SMTP_CONNECTIONS, window
