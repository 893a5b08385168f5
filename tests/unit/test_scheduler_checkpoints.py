"""The decision behind release checkpoints (services/scheduler/checkpoints.py): rows a sender
passed without a result go out again; rows still waiting behind a backlog never do."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from libs.common import avro
from libs.common.kafka import Message
from libs.common.topics import Topic
from services.scheduler.processor import (
    Checkpoint,
    CheckpointStep,
    checkpoint_request,
    checkpoint_step,
    fence_passed,
)
from services.sender import progress

A, B, C = (uuid.UUID(int=n) for n in (1, 2, 3))


def step(checkpoints: list[Checkpoint], **changes: Any) -> CheckpointStep:
    """checkpoint_step of a campaign that released 9 chunks and confirmed none yet, 40
    released rows awaiting their result, results counted to offset 100 in 4 partitions and the
    last checkpoint issued 5 s ago (interval 60 s)."""
    values: dict[str, Any] = {
        "release_mark": 9,
        "confirmed_mark": 0,
        "awaiting_results": 40,
        "results_counted": {0: 100, 1: 100, 2: 100, 3: 100},
        "since_issued": 5.0,
        "interval": 60.0,
    }
    values.update(changes)
    return checkpoint_step(checkpoints, **values)


def test_a_checkpoint_not_reached_in_every_partition_changes_nothing() -> None:
    # A sender with a backlog in partition 3 has not reached it there: the rows before it
    # there may still be on their way, so nothing is covered, whatever the time.
    waiting = Checkpoint(A, mark=3, partitions=4, reached=3)
    assert step([waiting]) == CheckpointStep()
    assert step([waiting], since_issued=3600.0).confirm is None


def test_reached_everywhere_the_fence_is_taken_then_passed() -> None:
    reached = Checkpoint(A, mark=3, partitions=4, reached=4)
    assert step([reached]) == CheckpointStep(fence=(A,))
    fenced = Checkpoint(A, mark=3, partitions=4, reached=4, fence=(100, 120, 90, 0))
    # The results consumer has not counted partition 1 up to the fence: results published
    # before the answers may still be on their way to the counters.
    assert step([fenced]).confirm is None
    read = {0: 100, 1: 120, 2: 95}  # partition 3 had no results at all
    assert step([fenced], results_counted=read) == CheckpointStep(confirm=fenced)


def test_the_newest_confirmable_checkpoint_wins_and_a_lost_one_blocks_nothing() -> None:
    lost = Checkpoint(A, mark=2, partitions=4, reached=1)  # its records were lost
    older = Checkpoint(B, mark=4, partitions=4, reached=4, fence=(10, 10, 10, 10))
    newer = Checkpoint(C, mark=7, partitions=4, reached=4, fence=(90, 90, 90, 90))
    assert step([lost, older, newer]).confirm == newer
    # Already confirmed up to 7: nothing older or equal counts again.
    assert step([lost, older, newer], confirmed_mark=7).confirm is None


def test_fences_are_taken_only_above_what_is_confirmed() -> None:
    confirmable = Checkpoint(A, mark=4, partitions=2, reached=2, fence=(5, 5))
    older = Checkpoint(B, mark=3, partitions=2, reached=2)
    newer = Checkpoint(C, mark=6, partitions=2, reached=2)
    got = step([older, confirmable, newer], results_counted={0: 5, 1: 5})
    assert got.confirm == confirmable and got.fence == (C,)


def test_a_paced_backlog_is_never_covered_past_the_checkpoint_the_sender_reached() -> None:
    # Checkpoints after marks 3, 6 and 9; the sender, slowed by its rate limit, has reached
    # only the first everywhere: only rows released up to mark 3 can be judged.
    first = Checkpoint(A, mark=3, partitions=4, reached=4, fence=(0, 0, 0, 0))
    behind = [Checkpoint(B, mark=6, partitions=4, reached=2), Checkpoint(C, 9, 4, 0)]
    assert step([first, *behind]).confirm == first


def test_when_a_checkpoint_is_issued() -> None:
    assert step([], since_issued=None).issue
    assert not step([], since_issued=59.9).issue
    assert step([], since_issued=60.0).issue
    # Every released row has its result: nothing to ask about.
    assert not step([], since_issued=None, awaiting_results=0).issue
    # Nothing released since the last confirmed checkpoint: the rows still awaiting a
    # result were at their last release; the overdue check gives them up.
    assert not step([], since_issued=None, release_mark=5, confirmed_mark=5).issue


def test_fence_passed() -> None:
    assert fence_passed((), {})
    assert fence_passed((0, 0), {})
    assert not fence_passed((0, 3), {0: 9})
    assert fence_passed((0, 3), {0: 9, 1: 3})
    assert not fence_passed((4,), {0: 3})


def test_a_checkpoint_record_fits_send_requests_and_the_sender_tells_it_apart() -> None:
    now = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)
    value = checkpoint_request(str(A), str(B), now)
    data, headers = avro.encode(Topic.SEND_REQUESTS, value)
    decoded = avro.decode(Topic.SEND_REQUESTS, data, headers)
    assert decoded["checkpoint"] and decoded["request_id"] == str(B)
    message = Message(Topic.SEND_REQUESTS, str(A), decoded, partition=3, offset=17, timestamp_ms=0)
    assert progress.is_checkpoint(message)
    answer = progress.reached(message, now)
    assert answer == {
        "checkpoint_id": str(B),
        "campaign_id": str(A),
        "partition": 3,
        "reached_at": now,
        "held": 0,
    }
    avro.encode(Topic.SEND_PROGRESS, answer)
    # An ordinary request (schema default) is not one.
    request = dict(decoded, checkpoint=False, contact_id=5, email="a@example.jp")
    data, headers = avro.encode(Topic.SEND_REQUESTS, request)
    plain = Message(
        Topic.SEND_REQUESTS, "5", avro.decode(Topic.SEND_REQUESTS, data, headers), 0, 0, 0
    )
    assert not progress.is_checkpoint(plain)
