"""The sender's deferral feed (services/sender/deferrals.py) with a stand-in publisher: the
relay workers hand records over without waiting, one linger's records go out in one
publication, and a broker that is away loses them, counted, without failing anything."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiokafka.errors import KafkaTimeoutError

from libs.common.kafka import Publisher
from libs.common.metrics import sample_value
from libs.common.topics import Topic
from services.sender import deferrals
from services.sender.deferrals import DeferralsOut


class StandInPublisher:
    """Takes ``send_keyed`` calls; ``failure``: raised by each instead."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.calls: list[tuple[Topic, list[tuple[Any, dict[str, Any]]]]] = []
        self.failure = failure

    async def send_keyed(
        self, topic: Topic, records: list[tuple[Any, dict[str, Any]]]
    ) -> list[asyncio.Future[Any]]:
        if self.failure is not None:
            raise self.failure
        self.calls.append((topic, list(records)))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return [done]


def _record(contact_id: int) -> dict[str, Any]:
    return {"contact_id": contact_id, "domain": "docomo.ne.jp", "smtp_code": 421}


def _count(outcome: str) -> float:
    return sample_value("tayori_sender_deferrals_total", {"outcome": outcome}) or 0.0


async def test_one_lingers_records_go_out_in_one_publication_keyed_by_contact() -> None:
    publisher = StandInPublisher()
    out = DeferralsOut(cast(Publisher, publisher))
    published = _count("published")
    for contact in (1, 2, 3):
        out.deferred(_record(contact))  # returns at once: nothing published yet
    assert publisher.calls == []
    await asyncio.sleep(deferrals.LINGER_SECONDS * 3)
    assert [(t, [k for k, _ in rs]) for t, rs in publisher.calls] == [
        (Topic.DELIVERY_DEFERRALS, [1, 2, 3])
    ]
    assert _count("published") == published + 3
    out.deferred(_record(4))
    await out.stop()  # what waits goes out at the stop, not a linger later
    assert [k for k, _ in publisher.calls[-1][1]] == [4]


async def test_a_broker_away_loses_the_records_counted_and_raises_nothing() -> None:
    out = DeferralsOut(cast(Publisher, StandInPublisher(KafkaTimeoutError())))
    lost = _count("lost")
    out.deferred(_record(1))
    out.deferred(_record(2))
    await out.stop()
    assert _count("lost") == lost + 2


async def test_beyond_the_bound_records_are_dropped_not_kept() -> None:
    publisher = StandInPublisher()
    out = DeferralsOut(cast(Publisher, publisher))
    lost = _count("lost")
    for contact in range(deferrals.WAITING_MAX + 5):
        out.deferred(_record(contact))
    assert _count("lost") == lost + 5
    await out.stop()
    assert sum(len(rs) for _, rs in publisher.calls) == deferrals.WAITING_MAX


class SilentPublisher(StandInPublisher):
    """A broker that never answers: every publication waits for ever."""

    async def send_keyed(
        self, topic: Topic, records: list[tuple[Any, dict[str, Any]]]
    ) -> list[asyncio.Future[Any]]:
        return [asyncio.get_running_loop().create_future()]


async def test_a_stop_does_not_wait_for_a_broker_that_does_not_answer() -> None:
    out = DeferralsOut(cast(Publisher, SilentPublisher()))
    lost = _count("lost")
    out.deferred(_record(1))
    await out.stop(grace=0.05)
    assert _count("lost") == lost + 1
