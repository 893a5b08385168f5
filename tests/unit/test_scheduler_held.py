"""The scheduler versus mail a sender holds for its receiving domain's pace (issue 21):
held mail is neither released again nor given up, and the campaign shows it
(services/scheduler/processor.py checkpoint_step, senders_hold, held_shown)."""

from __future__ import annotations

import datetime as dt
import io
import uuid
from typing import Any

import fastavro

from libs.common import avro
from libs.common.kafka import Message
from libs.common.topics import Topic
from services.scheduler.processor import (
    Checkpoint,
    CheckpointStep,
    checkpoint_request,
    checkpoint_step,
    held_shown,
    newest_held,
    senders_hold,
)
from services.sender import progress

A, B, C = (uuid.UUID(int=n) for n in (1, 2, 3))
NOW = dt.datetime(2026, 12, 5, 3, 0, tzinfo=dt.UTC)
COUNTED = {0: 100, 1: 100}


def step(checkpoints: list[Checkpoint], **changes: Any) -> CheckpointStep:
    """checkpoint_step of a campaign that released 9 chunks, confirmed none, 40 rows
    awaiting results, results counted to 100 in 2 partitions, last checkpoint 5 s ago."""
    values: dict[str, Any] = {
        "release_mark": 9,
        "confirmed_mark": 0,
        "awaiting_results": 40,
        "results_counted": COUNTED,
        "since_issued": 5.0,
        "interval": 60.0,
    }
    values.update(changes)
    return checkpoint_step(checkpoints, **values)


def test_a_checkpoint_answered_with_held_mail_is_never_confirmed_nor_fenced() -> None:
    # Its rows without a result may be held for their domain, not lost: releasing them again
    # would only count releases up to the give-up.
    held = Checkpoint(A, mark=3, partitions=2, reached=2, fence=(10, 10), held=5)
    assert not held.conclusive
    assert step([held]).confirm is None
    # Answered everywhere: its count can only grow, it will never be confirmed, it goes.
    unfenced = Checkpoint(A, mark=3, partitions=2, reached=2, held=1)
    assert step([unfenced]) == CheckpointStep(forget=(A,))
    # Not answered everywhere yet: it waits (its other answers may come).
    partial = Checkpoint(A, mark=3, partitions=2, reached=1, held=4)
    assert step([partial]) == CheckpointStep()


def test_the_first_checkpoint_answered_with_nothing_held_is_confirmed() -> None:
    # A, B saw held mail; C, issued later (after the same rows: the same mark once
    # everything is released), saw none: every held delivery before it has its result out,
    # so what is still missing is lost and goes out again.
    a = Checkpoint(A, mark=9, partitions=2, reached=2, fence=(10, 10), held=30)
    b = Checkpoint(B, mark=9, partitions=2, reached=2, fence=(50, 50), held=2)
    c = Checkpoint(C, mark=9, partitions=2, reached=2)
    assert step([a, b, c]) == CheckpointStep(fence=(C,), forget=(A, B))
    fenced = Checkpoint(C, mark=9, partitions=2, reached=2, fence=(90, 90))
    assert step([a, b, fenced]).confirm == fenced


def test_checkpoints_keep_coming_while_mail_is_held() -> None:
    # Nothing released since the held checkpoints (release_mark 9), none confirmed: the
    # held mail's results are awaited, so the next checkpoint is issued when due.
    held = Checkpoint(A, mark=9, partitions=2, reached=2, fence=(10, 10), held=3)
    assert step([held], since_issued=60.0).issue
    assert not step([held], since_issued=59.0).issue


def test_the_newest_answer_of_a_campaign_counts() -> None:
    t = [NOW + dt.timedelta(seconds=n) for n in range(3)]
    # Two senders' answers landed inverted: the one counted later wins, whatever the order.
    assert newest_held([(A, t[2], 0), (A, t[1], 9), (B, t[0], 4)]) == {
        A: (t[2], 0),
        B: (t[0], 4),
    }
    assert newest_held([(A, t[1], 9), (A, t[1], 3)]) == {A: (t[1], 3)}
    assert newest_held([]) == {}


def test_the_overdue_check_waits_while_senders_hold_mail() -> None:
    cutoff = NOW - dt.timedelta(minutes=30)
    assert senders_hold(3, NOW, cutoff)
    assert senders_hold(1, cutoff, cutoff)
    assert not senders_hold(0, NOW, cutoff)  # nothing held: lost rows are lost
    assert not senders_hold(3, None, cutoff)  # never answered (a v1 sender, or none yet)
    # An answer older than the result timeout: senders that stopped answering are not
    # waited for longer than any row is.
    assert not senders_hold(3, cutoff - dt.timedelta(seconds=1), cutoff)


def test_the_held_count_shown() -> None:
    assert held_shown(12, "sending", pending=40) == 12
    assert held_shown(12, "sending", pending=5) == 5  # results came since the answer
    assert held_shown(12, "sent", pending=0) == 0
    assert held_shown(12, "halted", pending=0) == 0
    assert held_shown(0, "sending", pending=40) == 0


def test_the_answer_carries_the_held_count_and_a_v1_answer_reads_as_none_held() -> None:
    value = checkpoint_request(str(A), str(B), NOW)
    message = Message(Topic.SEND_REQUESTS, str(A), value, partition=1, offset=3, timestamp_ms=0)
    answer = progress.reached(message, NOW, held=7)
    data, headers = avro.encode(Topic.SEND_PROGRESS, answer)
    assert avro.decode(Topic.SEND_PROGRESS, data, headers)["held"] == 7
    # A v1 sender's answer (no held): decoded with the default, nothing held.
    old = {k: v for k, v in answer.items() if k != "held"}
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, avro.schema_version(Topic.SEND_PROGRESS.value, 1), old)
    headers = [(avro.VERSION_HEADER, b"1")]
    assert avro.decode(Topic.SEND_PROGRESS, buffer.getvalue(), headers)["held"] == 0
