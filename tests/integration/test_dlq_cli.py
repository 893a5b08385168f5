"""``tayori dlq`` and ``tayori offsets`` against the real broker, run in this process.

Dead letters come from a real consumer path (the contacts service, libs/common/kafka's
Consumer) or are written with the headers a Consumer writes; the commands are called as
``tayori`` calls them, with this test's KAFKA_BOOTSTRAP and KAFKA_TOPIC_PREFIX.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from libs.common import avro
from libs.common.deadletters import dead_letter_headers
from libs.common.kafka import Consumer, Handler, Message
from libs.common.settings import CommonSettings
from libs.common.topics import Topic
from tayori import operate
from tests.conftest import Kafka, Service, Stack, eventually

EVENTS = Topic.CONTACTS_EVENTS


def event(email: str | None, external_id: str | None = None, **contact: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "ContactUpserted",
        "occurred_at": dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC),
        "source": "test",
        "external_id": external_id,
        "email": email,
        "contact": contact or None,
        "membership": None,
    }


@contextlib.asynccontextmanager
async def cli(stack: Stack, prefix: str) -> AsyncIterator[Any]:
    """``tayori(*argv)`` → (exit status, stdout, stderr), with this test's environment."""
    environ = {
        "KAFKA_BOOTSTRAP": stack.broker.bootstrap,
        "KAFKA_TOPIC_PREFIX": prefix,
        "KAFKA_SESSION_TIMEOUT_MS": "1000",
    }

    async def tayori(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = await operate.main_async(argv, environ, out, err)
        return status, out.getvalue(), err.getvalue()

    yield tayori


async def run_json(tayori: Any, *argv: str) -> Any:
    status, out, err = await tayori(*argv, "--json")
    assert status == 0, err
    return json.loads(out)


@contextlib.asynccontextmanager
async def consuming(
    stack: Stack, kafka: Kafka, prefix: str, group: str, handler: Handler
) -> AsyncIterator[asyncio.Task[None]]:
    """A Consumer of contacts.events in ``group``, running until the block ends (or its
    handler raises: the task ends with the error, as the service would crash)."""
    settings = CommonSettings(
        kafka_bootstrap=stack.broker.bootstrap,
        topic_prefix=prefix,
        service="test",
        kafka_session_timeout_ms=1000,
        kafka_fetch_max_wait_ms=20,
    )
    consumer = Consumer(settings, kafka.publisher, group=group, topics=[EVENTS], handler=handler)
    await consumer.start()
    task = asyncio.ensure_future(consumer.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()


async def committed_offset(stack: Stack, group_id: str, tp: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.broker.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id, partitions=[tp])
    finally:
        await admin.close()
    return offsets[tp].offset if tp in offsets else -1


async def send_dead_letter(
    kafka: Kafka,
    prefix: str,
    key: str,
    value: bytes,
    headers: list[tuple[str, bytes]],
    *,
    partition: int = 1,
    offset: int = 41,
    extra: Sequence[tuple[str, bytes]] = (),
) -> tuple[int, int]:
    """A dead letter as a Consumer writes it (plus ``extra`` headers); its DLQ place."""
    dead = dead_letter_headers(
        headers,
        stage="process",
        reason="the database said no",
        topic=f"{prefix}{EVENTS.value}",
        partition=partition,
        offset=offset,
        group="contacts.ingest",
    )
    sent = await (await kafka.publisher.send_raw(EVENTS.dlq, key, value, [*dead, *extra]))
    return sent.partition, sent.offset


# dlq list / show --------------------------------------------------------------------------


async def test_list_and_show_what_the_contacts_consumer_dead_lettered(
    stack: Stack, prefix: str, kafka: Kafka, contacts: Service
) -> None:
    refused = event("not-an-address", name="山田 太郎")
    await kafka.send_raw(EVENTS, "x", b"\x00not avro at all")
    await kafka.send(EVENTS, "bad@", refused)
    await kafka.read(EVENTS.dlq, until=lambda records: len(records) >= 2)

    async with cli(stack, prefix) as tayori:
        status, out, _ = await tayori("dlq", "list")
        assert status == 0
        assert out.splitlines()[1].split()[:2] == ["contacts.events.dlq", "2"]
        assert await run_json(tayori, "dlq", "list") == [
            {
                "dlq": "contacts.events.dlq",
                "topic": "contacts.events",
                "records": 2,
                "partitions": {"0": 1, "1": 1},
            }
        ]

        listed = await run_json(tayori, "dlq", "list", "contacts.events")
        assert listed["records"] == 2
        by_stage = {d["stage"]: d for d in listed["dead_letters"]}
        assert by_stage.keys() == {"decode", "process"}
        assert {d["consumer_group"] for d in by_stage.values()} == {"contacts.ingest"}
        assert {d["original"]["topic"] for d in by_stage.values()} == {"contacts.events"}
        assert "is not an email address" in by_stage["process"]["reason"]
        # a headerless value starting with byte 0 is taken for the Confluent wire format
        assert "but no Schema Registry is configured" in by_stage["decode"]["reason"]

        status, out, _ = await tayori("dlq", "list", "contacts.events.dlq", "--limit", "1")
        lines = out.splitlines()
        assert lines[0] == "contacts.events.dlq: 2 dead letter(s), the latest 1 shown"
        assert lines[1].split() == [
            "P@OFFSET",
            "TIME",
            "(UTC)",
            "ORIGINAL",
            "GROUP",
            "STAGE",
            "REASON",
        ]
        assert len(lines) == 3
        assert "contacts.ingest" in lines[2]

        process = by_stage["process"]
        status, out, _ = await tayori(
            "dlq", "show", "contacts.events", str(process["partition"]), str(process["offset"])
        )
        assert status == 0
        assert "  dlq-stage: process" in out
        assert "key: bad@" in out
        assert '"name": "山田 太郎"' in out  # the value as JSON, not escaped
        shown = await run_json(
            tayori,
            "dlq",
            "show",
            "contacts.events",
            str(process["partition"]),
            str(process["offset"]),
        )
        assert shown["value"]["event_id"] == refused["event_id"]
        assert shown["value"]["occurred_at"] == "2026-11-23T09:00:00+00:00"
        assert shown["value_error"] is None
        assert {"name": "dlq-consumer-group", "text": "contacts.ingest"} in shown["headers"]

        decode = by_stage["decode"]
        place = (str(decode["partition"]), str(decode["offset"]))
        shown = await run_json(tayori, "dlq", "show", "contacts.events.dlq", *place)
        assert shown["value"] is None
        assert shown["value_error"].startswith("cannot decode as contacts.events: ")
        assert shown["value_excerpt"]["hex"] == b"\x00not avro at all".hex()
        status, out, _ = await tayori("dlq", "show", "contacts.events.dlq", *place)
        assert status == 0
        assert "  utf-8: \\x00not avro at all" in out.splitlines()


# dlq replay -------------------------------------------------------------------------------


async def test_replay_puts_the_original_record_back_where_it_came_from(
    stack: Stack, prefix: str, kafka: Kafka
) -> None:
    data, headers = avro.encode(EVENTS, event("replay@example.jp"))
    original_headers = [*headers, ("trace-id", b"abc-123")]
    partition, offset = await send_dead_letter(kafka, prefix, "K-1", data, original_headers)
    place = ("--partition", str(partition), "--offset", str(offset))

    async with cli(stack, prefix) as tayori:
        status, out, _ = await tayori("dlq", "replay", "contacts.events", *place, "--dry-run")
        assert status == 0
        assert "would replay 1 dead letter(s) to contacts.events" in out
        assert await kafka.read_to_end(EVENTS.value) == []

        replayed = await run_json(tayori, "dlq", "replay", "contacts.events.dlq", *place)

    assert replayed["refused"] == []
    assert [(r["partition"], r["offset"]) for r in replayed["replayed"]] == [(1, 0)]
    [record] = await kafka.read_to_end(EVENTS.value)
    assert (record.partition, record.key, record.value) == (1, b"K-1", data)
    assert list(record.headers) == original_headers


async def test_an_excerpt_is_shown_but_never_replayed(
    stack: Stack, prefix: str, kafka: Kafka
) -> None:
    data, headers = avro.encode(EVENTS, event("big@example.jp", memo="x" * 500))
    await send_dead_letter(kafka, prefix, "K-ok", data, headers, partition=0)
    cut = await send_dead_letter(
        kafka,
        prefix,
        "K-big",
        data[:40],
        headers,
        offset=7,
        extra=[
            ("dlq-size", str(len(data)).encode()),
            ("dlq-sha256", hashlib.sha256(data).hexdigest().encode()),
            ("dlq-truncated", b"1"),
        ],
    )

    async with cli(stack, prefix) as tayori:
        status, out, _ = await tayori("dlq", "list", "contacts.events")
        assert f"[excerpt of {len(data)} B] the database said no" in out
        listed = await run_json(tayori, "dlq", "list", "contacts.events")
        excerpt = next(d for d in listed["dead_letters"] if d["truncated"])
        assert (excerpt["size"], excerpt["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())

        status, out, _ = await tayori("dlq", "show", "contacts.events", *map(str, cut))
        assert status == 0
        assert f"value: only an excerpt (40 of {len(data)} bytes)" in out
        assert hashlib.sha256(data).hexdigest() in out

        partition, offset = map(str, cut)
        status, out, err = await tayori(
            "dlq", "replay", "contacts.events", "--partition", partition, "--offset", offset
        )
        assert (status, out) == (2, "")
        assert len(err.splitlines()) == 1
        assert "is only an excerpt" in err and "cannot be replayed" in err

        status, out, err = await tayori("dlq", "replay", "contacts.events", "--all")
        assert status == 1
        assert "replayed 1 dead letter(s) to contacts.events" in out
        assert err.startswith(f"tayori: not replayed: contacts.events.dlq[{partition}]@{offset} ")

    [record] = await kafka.read_to_end(EVENTS.value)
    assert (record.partition, record.key, record.value) == (0, b"K-ok", data)


# offsets skip -----------------------------------------------------------------------------


async def test_skip_moves_a_stopped_group_past_the_record_that_crashes_it(
    stack: Stack, prefix: str, kafka: Kafka
) -> None:
    """The documented procedure: the consumer crashes on a record (a bug), the service is
    stopped, ``tayori offsets skip`` moves its group past the record, the service starts and
    goes on with the next; once fixed, ``tayori dlq replay`` sends the skipped one back."""
    group, group_id = "test.crashing", f"{prefix}test.crashing"
    handled: list[str] = []

    async def buggy(batch: list[Message]) -> None:
        for message in batch:
            if message.value["external_id"] == "BOOM":
                raise RuntimeError("a bug")
        handled.extend(m.value["external_id"] for m in batch)

    async def fixed(batch: list[Message]) -> None:
        handled.extend(m.value["external_id"] for m in batch)

    async with cli(stack, prefix) as tayori:
        async with consuming(stack, kafka, prefix, group, buggy) as service:
            await kafka.send(EVENTS, "K", event("a@example.jp", "FIRST"))
            await eventually(lambda: _committed(tayori, group, 1))
            await kafka.send(EVENTS, "K", event("b@example.jp", "BOOM"))
            await kafka.send(EVENTS, "K", event("c@example.jp", "AFTER"))
            await eventually(lambda: _done(service))
            assert isinstance(service.exception(), RuntimeError)
        assert handled == ["FIRST"]
        shown = await run_json(tayori, "offsets", "show", "--group", group)
        [stuck] = [p for p in shown["partitions"] if p["committed"] is not None]
        assert (stuck["committed"], stuck["end"], stuck["lag"]) == (1, 3, 2)
        tp = TopicPartition(f"{prefix}contacts.events", stuck["partition"])

        # The embedded broker may still list the member that crashed: --force (see
        # tayori/offsets.py); the commit happens only with no other member in the group.
        skip = ("offsets", "skip", "--group", group, "--topic", "contacts.events")
        where = ("--partition", str(tp.partition), "--offset", "1")
        status, out, err = await tayori(*skip, *where, "--force")
        assert status == 0, err
        assert f"group {group}: committed 2 on contacts.events[{tp.partition}] (was: 1)" in out
        assert await committed_offset(stack, group_id, tp) == 2

        [copy] = await kafka.read_to_end(EVENTS.dlq)
        headers = dict(copy.headers)
        assert (headers["dlq-stage"], headers["dlq-offset"]) == (b"skip", b"1")
        assert headers["dlq-consumer-group"] == group.encode()
        assert avro.decode(EVENTS, copy.value, copy.headers)["external_id"] == "BOOM"

        status, out, _ = await tayori(*skip, *where)
        assert status == 0
        assert out.startswith(f"group {group} is already past offset 1 of contacts.events[")

        async with consuming(stack, kafka, prefix, group, fixed):
            await eventually(lambda: _handled(handled, ["FIRST", "AFTER"]))
            status, _, err = await tayori(
                "dlq", "replay", "contacts.events", "--partition", str(copy.partition),
                "--offset", str(copy.offset),
            )  # fmt: skip
            assert status == 0, err
            await eventually(lambda: _handled(handled, ["FIRST", "AFTER", "BOOM"]))


async def _committed(tayori: Any, group: str, offset: int) -> bool:
    shown = await run_json(tayori, "offsets", "show", "--group", group)
    return any(p["committed"] == offset for p in shown["partitions"])


async def _done(task: asyncio.Task[None]) -> bool:
    return task.done()


async def _handled(handled: list[str], expected: list[str]) -> bool:
    return handled == expected


async def test_skip_copies_what_the_group_had_not_committed_and_commits_past_it(
    stack: Stack, prefix: str, kafka: Kafka
) -> None:
    """Offsets cannot skip one record alone: a group with nothing committed would skip
    the records before the one named too; they are dead-lettered, not lost."""
    for external_id in ("E-0", "E-1", "E-2"):
        await kafka.send(EVENTS, "same-key", event(None, external_id))
    [first, *_] = await kafka.read_to_end(EVENTS.value)
    partition = str(first.partition)
    group_id = f"{prefix}test.fresh"

    async with cli(stack, prefix) as tayori:
        skip = ("offsets", "skip", "--group", "test.fresh", "--topic", "contacts.events")
        where = ("--partition", partition, "--offset", "1")
        planned = await run_json(tayori, *skip, *where, "--dry-run")
        assert planned["status"] == "dry_run"
        assert [s["offset"] for s in planned["skipped"]] == [0, 1]
        assert await kafka.read_to_end(EVENTS.dlq) == []

        done = await run_json(tayori, *skip, *where)
    assert (done["status"], done["committed_before"], done["committed"]) == ("skipped", None, 2)
    tp = TopicPartition(f"{prefix}contacts.events", first.partition)
    assert await committed_offset(stack, group_id, tp) == 2
    copies = await kafka.read_to_end(EVENTS.dlq)
    reasons = {dict(c.headers)["dlq-offset"]: dict(c.headers)["dlq-reason"] for c in copies}
    assert reasons == {
        b"0": b"skipped along with offset 1: the group had not committed it yet",
        b"1": b"skipped by an operator (tayori offsets skip at offset 1)",
    }


async def test_skip_refuses_while_the_group_has_a_live_member(
    stack: Stack, prefix: str, kafka: Kafka
) -> None:
    group = "test.live"
    release = asyncio.Event()

    async def stuck(batch: list[Message]) -> None:
        await release.wait()  # a consumer busy with its batch: alive, committing nothing

    await kafka.send(EVENTS, "K", event("a@example.jp", "E-0"))
    [record] = await kafka.read_to_end(EVENTS.value)
    tp = TopicPartition(f"{prefix}contacts.events", record.partition)
    skip = (
        "offsets", "skip", "--group", group, "--topic", "contacts.events",
        "--partition", str(tp.partition), "--offset", "0",
    )  # fmt: skip
    async with cli(stack, prefix) as tayori, consuming(stack, kafka, prefix, group, stuck):
        await eventually(lambda: _members(tayori, group))
        status, out, err = await tayori(*skip)
        assert (status, out) == (2, "")
        assert len(err.splitlines()) == 1
        assert f"tayori: group {group} ({prefix}{group}) has 1 member(s)" in err
        assert "stop the service (every replica) first" in err

        status, out, err = await tayori(*skip, "--force")
        assert (status, out) == (2, "")
        assert f"group {group} has live members" in err
        release.set()
    assert await committed_offset(stack, f"{prefix}{group}", tp) in (-1, 1)
    assert await kafka.read_to_end(EVENTS.dlq) == []


async def _members(tayori: Any, group: str) -> bool:
    return bool((await run_json(tayori, "offsets", "show", "--group", group))["members"])


# errors -----------------------------------------------------------------------------------


async def test_errors_are_one_line_and_exit_2(stack: Stack, prefix: str, kafka: Kafka) -> None:
    data, headers = avro.encode(EVENTS, event("e@example.jp"))
    partition, _ = await send_dead_letter(kafka, prefix, "K", data, headers)
    async with cli(stack, prefix) as tayori:
        cases = {
            ("dlq", "list", "contacts.nope"): "tayori: unknown topic 'contacts.nope'",
            ("dlq", "show", "contacts.events", str(partition), "5"): (
                f"tayori: contacts.events.dlq[{partition}] holds offsets 0..0; "
                "there is no offset 5"
            ),
            ("dlq", "show", "contacts.events", "9", "0"): (
                "tayori: contacts.events.dlq has no partition 9 (it has 0, 1)"
            ),
            ("dlq", "replay", "contacts.events", "--offset", "0"): (
                "tayori: --offset needs --partition"
            ),
            (
                "offsets", "skip", "--group", "g", "--topic", "contacts.events.dlq",
                "--partition", "0", "--offset", "0",
            ): "tayori: name the topic group g reads (contacts.events), not its DLQ",
            (
                "offsets", "skip", "--group", "g", "--topic", "contacts.events",
                "--partition", "0", "--offset", "0",
            ): "tayori: contacts.events[0] is empty; there is no offset 0",
        }  # fmt: skip
        for argv, said in cases.items():
            status, out, err = await tayori(*argv)
            assert (status, out) == (2, ""), argv
            assert err.startswith(said) and err.count("\n") == 1, (argv, err)

    out, err = io.StringIO(), io.StringIO()
    environ = {"KAFKA_BOOTSTRAP": "127.0.0.1:1", "KAFKA_TOPIC_PREFIX": prefix}
    status = await operate.main_async(["dlq", "list"], environ, out, err)
    assert (status, out.getvalue()) == (2, "")
    assert err.getvalue().startswith("tayori: Kafka at 127.0.0.1:1: ")
    assert err.getvalue().count("\n") == 1
