"""The pure parts of ``tayori dlq`` / ``tayori offsets``: reading a dead letter's headers,
what may be replayed or skipped, and how things are printed."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from libs.common.deadletters import DeadLetter, dead_letter_headers
from libs.common.topics import Topic
from tayori import operate
from tayori.dlq import list_row, refusal
from tayori.offsets import members_refusal, plan_skip
from tayori.ops import (
    Failure,
    GroupState,
    as_text,
    bytes_json,
    escaped,
    json_default,
    one_line,
    resolve_topic,
    show_bytes,
    table,
    timestamp,
)

ORIGINAL = [("tayori-schema-version", b"2"), ("trace-id", b"abc")]


def letter(*extra: tuple[str, bytes], headers: list[tuple[str, bytes]] | None = None) -> DeadLetter:
    dead = dead_letter_headers(
        ORIGINAL if headers is None else headers,
        stage="process",
        reason="refused\nfor a reason",
        topic="p.contacts.events",
        partition=1,
        offset=41,
        group="contacts.ingest",
    )
    return DeadLetter("p.contacts.events.dlq", 0, 7, 0, b"K", b"value", (*dead, *extra))


def test_a_dead_letter_reads_its_headers() -> None:
    dead = letter()
    assert (dead.stage, dead.reason) == ("process", "refused\nfor a reason")
    assert (dead.original_topic, dead.original_partition, dead.original_offset) == (
        "p.contacts.events",
        1,
        41,
    )
    assert dead.consumer_group == "contacts.ingest"
    assert dead.original_headers() == ORIGINAL
    assert not dead.truncated and dead.size is None and dead.sha256 is None


def test_the_last_header_of_a_name_wins_and_bad_numbers_are_none() -> None:
    """A record replayed and dead-lettered again carries only the new dlq-* headers, but a
    producer may have sent some of its own: the dead-lettering's come last."""
    dead = letter(("dlq-offset", b"x"), headers=[("dlq-stage", b"theirs")])
    assert dead.stage == "process"
    assert dead.original_offset is None
    assert dead.original_headers() == []


def test_an_excerpt_says_so_and_is_never_replayed() -> None:
    cut = letter(("dlq-size", b"2000000"), ("dlq-sha256", b"ab" * 32), ("dlq-truncated", b"1"))
    assert (cut.truncated, cut.size, cut.sha256) == (True, 2_000_000, "ab" * 32)
    assert "is only an excerpt of a record of 2000000 bytes" in (
        refusal(cut, "p.contacts.events", "p.") or ""
    )
    assert refusal(cut, "p.contacts.events", "p.").startswith("contacts.events.dlq[0]@7 ")  # type: ignore[union-attr]
    assert not letter(("dlq-truncated", b"0")).truncated
    row = list_row(cut, "p.")
    assert row[2] == "contacts.events[1]@41"
    assert row[5] == "[excerpt of 2000000 B] refused for a reason"


def test_a_dead_letter_goes_back_only_to_its_own_topic() -> None:
    assert refusal(letter(), "p.contacts.events", "p.") is None
    assert "came from topic p.contacts.events, not q.contacts.events" in (
        refusal(letter(), "q.contacts.events", "q.") or ""
    )


def test_dead_letter_headers_follow_the_record_s_own() -> None:
    headers = dead_letter_headers(
        [("a", b"1")], stage="skip", reason="x" * 3000, topic="t", partition=0, offset=5, group="g"
    )
    assert [name for name, _ in headers] == [
        "a",
        "dlq-stage",
        "dlq-reason",
        "dlq-topic",
        "dlq-partition",
        "dlq-offset",
        "dlq-consumer-group",
    ]
    assert len(dict(headers)["dlq-reason"]) == 2000


@pytest.mark.parametrize(
    ("committed", "begin", "offset", "start", "past"),
    [
        (5, 0, 5, 5, False),  # stopped at the record: only it is skipped
        (3, 0, 5, 3, False),  # the batch 3..5 was not committed: 3 and 4 go too
        (-1, 2, 5, 2, False),  # nothing committed: from the first record kept
        (1, 4, 5, 4, False),  # retention removed what it had not read
        (6, 0, 5, 6, True),
    ],
)
def test_plan_skip(committed: int, begin: int, offset: int, start: int, past: bool) -> None:
    plan = plan_skip(committed, begin, offset)
    assert (plan.start, plan.already_past, plan.commit) == (start, past, offset + 1)
    if not past:
        assert list(plan.skipped) == list(range(start, offset + 1))


def test_skip_needs_a_group_without_members() -> None:
    assert members_refusal("g", "p.g", GroupState("Empty", [])) is None
    busy = members_refusal(
        "g",
        "p.g",
        GroupState("Stable", [{"member_id": "m-1", "client_id": "c", "client_host": "/h"}]),
    )
    assert busy is not None and busy.startswith("group g (p.g) has 1 member(s) (m-1 (c@/h))")
    assert "pass --force" in busy
    assert "cannot tell" in (members_refusal("g", "p.g", None) or "")


def test_topics_are_named_as_people_know_them() -> None:
    assert resolve_topic("contacts.events", "p.") == (Topic.CONTACTS_EVENTS, False)
    assert resolve_topic("contacts.events.dlq", "p.") == (Topic.CONTACTS_EVENTS, True)
    assert resolve_topic("p.send.requests.dlq", "p.") == (Topic.SEND_REQUESTS, True)
    with pytest.raises(Failure, match="unknown topic 'contacts'; Tayori's topics are: contacts"):
        resolve_topic("contacts", "p.")


def test_table_aligns_columns_and_shows_none_as_a_dash() -> None:
    assert table(("A", "LONGER"), [("xyz", None), ("1", 2)]).splitlines() == [
        "A    LONGER",
        "xyz  -",
        "1    2",
    ]


def test_text_helpers() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 100, 10) == "x" * 9 + "…"
    assert as_text("山田".encode()) == "山田"
    assert as_text(b"\x00a") is None and as_text(b"\xff") is None
    assert show_bytes(None) == "(none)"
    assert show_bytes(b"\x00\x01") == "0x0001"
    assert bytes_json(b"ok") == {"text": "ok"}
    assert bytes_json(b"\xff") == {"base64": "/w=="}
    assert escaped("\x00a\nb 山") == "\\x00a\\nb 山"
    assert timestamp(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"


def test_decoded_values_are_written_as_json() -> None:
    value = {"raw": b"\x00\xff", "at": dt.datetime(2026, 1, 2, tzinfo=dt.UTC), "name": "太郎"}
    text = json.dumps(value, default=json_default, ensure_ascii=False)
    assert json.loads(text) == {"raw": "AP8=", "at": "2026-01-02T00:00:00+00:00", "name": "太郎"}
    with pytest.raises(TypeError):
        json_default(object())


async def test_usage_errors_exit_2() -> None:
    assert await operate.main_async(["dlq", "replay", "contacts.events"], {}) == 2
    assert await operate.main_async(["dlq", "list", "--limit", "0"], {}) == 2
