"""How fast the deliverability service consumes delivery results, against the campaign's
peak result rate (~4,100 msgs/s, docs/BENCHMARKS.md). Run:
``flock /tmp/tayori-heavy.lock .venv/bin/python -m bench.deliverability [results]``.

A backlog of delivery results for 20 domains (plus a bounce and an open per 50) is
published to fresh topics on the embedded broker first; the service then starts and drains
it. The figure is events consumed per second from its first tally to its last, and the
process's CPU per event.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
import uuid

from libs.common.kafka import Publisher, ensure_topics, make_producer
from libs.common.settings import CommonSettings
from libs.common.topics import DEFAULT_PARTITIONS, Topic
from services.deliverability.app import Runtime
from services.deliverability.settings import DeliverabilitySettings
from tayori.embedded import EmbeddedBroker, free_port

DOMAINS = [f"d{i}.example.jp" for i in range(20)]
CAMPAIGN = str(uuid.uuid4())


def _result(contact: int) -> dict:
    deferred = contact % 10 == 0
    return {
        "result_id": str(uuid.uuid4()),
        "campaign_id": CAMPAIGN,
        "contact_id": contact,
        "email": f"u{contact}@{DOMAINS[contact % len(DOMAINS)]}",
        "outcome": "temporary_error" if deferred else "sent",
        "smtp_code": 421 if deferred else 250,
        "enhanced_code": "4.7.0" if deferred else None,
        "diagnostic": None,
        "relay": None,
        "message_id": None,
        "step_id": None,
        "suppressed_reason": None,
        "occurred_at": int(time.time() * 1000),
    }


def _open(contact: int) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "open",
        "campaign_id": CAMPAIGN,
        "contact_id": contact,
        "url": None,
        "user_agent": None,
        "occurred_at": int(time.time() * 1000),
    }


async def main(results: int) -> None:
    broker = EmbeddedBroker(free_port())
    prefix = f"b{uuid.uuid4().hex[:8]}."
    try:
        await ensure_topics(broker.bootstrap, prefix)
        common = CommonSettings(kafka_bootstrap=broker.bootstrap, topic_prefix=prefix)
        producer = make_producer(common)
        await producer.start()
        publisher = Publisher(common, producer)
        for start in range(0, results, 5000):
            chunk = range(start, min(results, start + 5000))
            futures = await publisher.send_keyed(
                Topic.DELIVERY_RESULTS, [(c, _result(c)) for c in chunk]
            )
            futures += await publisher.send_keyed(
                Topic.FEEDBACK_EVENTS, [(c, _open(c)) for c in chunk if c % 50 == 0]
            )
            await asyncio.gather(*futures)
        await producer.stop()
        events = results + len(range(0, results, 50))
        settings = DeliverabilitySettings(
            kafka_bootstrap=broker.bootstrap,
            topic_prefix=prefix,
            kafka_session_timeout_ms=2000,
            http_host="127.0.0.1",
            http_port=0,
            partitions=DEFAULT_PARTITIONS,
        )
        runtime = Runtime(settings)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        await runtime.start()
        await runtime.wait_recovered()
        first = None
        while True:
            hours = runtime.tables.windows(runtime.tables.hour) if runtime.tables else {}
            counted = sum(
                max(w[2].get("attempts", 0) for w in windows) for windows in hours.values()
            )
            if counted and first is None:
                first = time.monotonic()
            # The opens are read in the same run; in a backlog one may come before its
            # contact's result (no order across topics) and count under no domain.
            if counted >= results:
                break
            await asyncio.sleep(0.05)
        done = time.monotonic()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        await runtime.stop()
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        drain = done - (first or started)
        print(f"events                 {events:>10,}")
        print(f"start → first tally    {(first or done) - started:>10.1f} s")
        print(f"drain (first → last)   {drain:>10.2f} s")
        print(f"start → last tally     {done - started:>10.2f} s")
        print(f"events/s, first → last {events / drain:>10,.0f} (tallies lag a batch behind)")
        print(f"events/s, start → last {events / (done - started):>10,.0f} (start-up included)")
        print(f"CPU per event          {cpu / events * 1e6:>10.0f} µs (start-up included)")
    finally:
        broker.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
