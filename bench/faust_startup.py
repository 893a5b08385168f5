"""Why a stock faust worker takes ~30 s to consume its first event on the embedded broker,
and what removes the delay. Run: ``.venv/bin/python -m bench.faust_startup``.

The embedded broker (Tansu) holds a JoinGroup for half the session timeout before it
answers; faust's default ``broker_session_timeout`` is 60 s. The figure printed beside
each setting is the time from worker start to the first event processed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import faust
from aiokafka import AIOKafkaProducer

from tayori.embedded import EmbeddedBroker, free_port, temp_home


async def first_event_seconds(bootstrap: str, session_timeout: float | None) -> float:
    topic_name = f"faust-start-{uuid.uuid4().hex[:8]}"
    options = {}
    if session_timeout is not None:
        options = {
            "broker_session_timeout": session_timeout,
            "broker_heartbeat_interval": session_timeout / 5,
        }
    app = faust.App(
        f"tayori-bench-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=1,
        producer_acks=1,
        datadir=str(temp_home("faust-")),
        **options,
    )
    topic = app.topic(topic_name, value_serializer="raw")
    seen = asyncio.Event()

    @app.agent(topic)
    async def consume(stream):  # type: ignore[no-untyped-def]
        async for _ in stream:
            seen.set()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    await producer.send_and_wait(topic_name, b"x")
    await producer.stop()
    started = time.monotonic()
    worker_task = asyncio.ensure_future(app.start())
    await asyncio.wait_for(seen.wait(), timeout=120)
    elapsed = time.monotonic() - started
    await app.stop()
    worker_task.cancel()
    return elapsed


async def main() -> None:
    broker = EmbeddedBroker(free_port())
    try:
        for label, timeout in (
            ("faust default (session 60 s)", None),
            ("session 6 s", 6.0),
            ("session 2 s", 2.0),
        ):
            seconds = await first_event_seconds(broker.bootstrap, timeout)
            print(f"{label:<32} first event after {seconds:6.1f} s", flush=True)
    finally:
        broker.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
