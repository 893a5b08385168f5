"""A separate process that watches campaign.recipients for one request's end marker.

It plays the scheduler's part in its own process (as in production), so reading a million
records does not take CPU from the service being measured. It prints ``ready`` once it
is positioned at the start of the topic, then one JSON line when the end marker arrives:
``{"first_at", "end_at", "records", "total", "error"}`` (``time.monotonic()`` values,
comparable with the parent's on Linux).

    python -m bench.watch BOOTSTRAP TOPIC REQUEST_ID
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiokafka import AIOKafkaConsumer

from libs.common import avro
from libs.common.topics import Topic


async def watch(bootstrap: str, topic: str, request_id: str) -> dict[str, object]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=50)
        print("ready", flush=True)
        records = 0
        first_at = None
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for batch in batches.values():
                if first_at is None:
                    first_at = time.monotonic()
                records += len(batch)
                last = batch[-1]  # the end marker is the last record of its campaign's key
                value = avro.decode(Topic.CAMPAIGN_RECIPIENTS, last.value, last.headers)
                if value["kind"] == "end" and value["request_id"] == request_id:
                    return {
                        "first_at": first_at,
                        "end_at": time.monotonic(),
                        "records": records,
                        "total": value["total"],
                        "error": value["error"],
                    }
    finally:
        await consumer.stop()


def main() -> None:
    bootstrap, topic, request_id = sys.argv[1:4]
    print(json.dumps(asyncio.run(watch(bootstrap, topic, request_id))), flush=True)


if __name__ == "__main__":
    main()
