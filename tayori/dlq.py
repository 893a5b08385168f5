"""``tayori dlq``: look at dead letters and send them back to their topic.

tayori dlq list [TOPIC] [--limit N]           how many dead letters each DLQ holds; with a
                                              TOPIC, its latest N dead letters
tayori dlq show TOPIC PARTITION OFFSET        one dead letter: headers and decoded value
tayori dlq replay TOPIC (--partition P --offset O | --all) [--dry-run]
                                              publish the original record(s) again

TOPIC is a logical name: ``contacts.events`` or ``contacts.events.dlq`` (the prefix in
KAFKA_TOPIC_PREFIX is applied). PARTITION and OFFSET are the dead letter's place in the
DLQ, as ``list`` shows them. Reading never joins a consumer group nor commits anything.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from aiokafka.errors import KafkaError

from libs.common import avro
from libs.common.deadletters import DeadLetter, read_range
from libs.common.errors import InvalidMessage
from libs.common.topics import Topic
from tayori.ops import (
    EXIT_OK,
    EXIT_PARTLY,
    Failure,
    Kafka,
    Output,
    bytes_json,
    escaped,
    excerpt,
    json_default,
    logical,
    one_line,
    resolve_topic,
    show_bytes,
    table,
    timestamp,
)

DEFAULT_LIMIT = 50

REPLAY_HELP = """\
Publishes each dead letter's original value, key and headers (without the dlq-* ones)
back to the topic it came from, in the partition it came from, so the consumer tries it
again — after a fix for what refused it was deployed. Delivery is at least once and every
consumer is idempotent: a record that was applied already has no second effect. A dead
letter that is only an excerpt of a record too large to keep whole is never replayed.
Exit status: 0 all replayed, 1 some refused (said on stderr), 2 nothing done."""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dlq = sub.add_parser(
        "dlq",
        help="look at dead letters and replay them",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = dlq.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", parents=[common], help="dead letters per DLQ, or the latest of one DLQ"
    )
    listing.add_argument("topic", nargs="?", help="e.g. contacts.events (or its .dlq)")
    listing.add_argument(
        "--limit", type=_positive, default=DEFAULT_LIMIT, help="show the latest N (50)"
    )
    show = actions.add_parser("show", parents=[common], help="one dead letter, decoded")
    show.add_argument("topic")
    show.add_argument("partition", type=int, help="its partition in the DLQ")
    show.add_argument("offset", type=int, help="its offset in the DLQ")
    replay = actions.add_parser(
        "replay",
        parents=[common],
        help="publish dead letters back to their topic",
        description=REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("topic")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--offset", type=int, help="the dead letter's offset in the DLQ")
    which.add_argument("--all", action="store_true", help="every dead letter of the DLQ")
    replay.add_argument("--partition", type=int, help="the dead letter's partition in the DLQ")
    replay.add_argument(
        "--dry-run", action="store_true", help="say what would be replayed, publish nothing"
    )


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def run(args: argparse.Namespace, kafka: Kafka, output: Output) -> int:
    if args.action == "list":
        if args.topic is None:
            return await summary(kafka, output)
        return await list_topic(kafka, output, args.topic, args.limit)
    if args.action == "show":
        return await show(kafka, output, args.topic, args.partition, args.offset)
    if args.all and args.partition is not None:
        raise Failure("--all replays the whole DLQ; leave out --partition")
    if not args.all and args.partition is None:
        raise Failure("--offset needs --partition (the dead letter's place in the DLQ)")
    return await replay(
        kafka,
        output,
        args.topic,
        None if args.all else (args.partition, args.offset),
        dry_run=args.dry_run,
    )


# list ------------------------------------------------------------------------------------


async def summary(kafka: Kafka, output: Output) -> int:
    """How many records each DLQ that holds any holds (from its offsets: nothing is read)."""
    existing = await kafka.topics()
    rows = []
    for topic in Topic:
        name = kafka.name(topic.dlq)
        if name not in existing:
            continue
        bounds = await kafka.bounds(await kafka.partitions(name))
        per_partition = {tp.partition: end - begin for tp, (begin, end) in bounds.items()}
        total = sum(per_partition.values())
        if total:
            rows.append((topic.dlq, topic.value, total, per_partition))
    if output.as_json:
        output.json(
            [
                {"dlq": dlq, "topic": topic, "records": total, "partitions": parts}
                for dlq, topic, total, parts in rows
            ]
        )
        return EXIT_OK
    if not rows:
        output.line("no dead letters: every DLQ is empty")
        return EXIT_OK
    output.line(
        table(
            ["DLQ", "RECORDS", "PER PARTITION"],
            [
                (dlq, total, " ".join(f"{p}:{n}" for p, n in sorted(parts.items()) if n))
                for dlq, _, total, parts in rows
            ],
        )
    )
    return EXIT_OK


def _dlq_name(kafka: Kafka, topic_arg: str) -> tuple[Topic, str]:
    topic, _ = resolve_topic(topic_arg, kafka.prefix)
    return topic, kafka.name(topic.dlq)


async def list_topic(kafka: Kafka, output: Output, topic_arg: str, limit: int) -> int:
    """The latest ``limit`` dead letters of one DLQ, oldest first."""
    topic, name = _dlq_name(kafka, topic_arg)
    bounds = await kafka.bounds(await kafka.partitions(name))
    total = sum(end - begin for begin, end in bounds.values())
    # The latest `limit` overall are among the latest `limit` of each partition.
    tail = {tp: (max(begin, end - limit), end) for tp, (begin, end) in bounds.items()}
    records = await read_range(await kafka.reader(), tail)
    letters = sorted(
        (DeadLetter.from_record(r) for r in records),
        key=lambda d: (d.timestamp_ms, d.partition, d.offset),
    )[-limit:]
    if output.as_json:
        output.json(
            {
                "dlq": topic.dlq,
                "records": total,
                "dead_letters": [summary_json(d, kafka.prefix) for d in letters],
            }
        )
        return EXIT_OK
    if not letters:
        output.line(f"{topic.dlq} is empty")
        return EXIT_OK
    shown = "all" if len(letters) == total else f"the latest {len(letters)}"
    output.line(f"{topic.dlq}: {total} dead letter(s), {shown} shown")
    output.line(table(LIST_COLUMNS, (list_row(d, kafka.prefix) for d in letters)))
    return EXIT_OK


LIST_COLUMNS = ("P@OFFSET", "TIME (UTC)", "ORIGINAL", "GROUP", "STAGE", "REASON")


def original_place(letter: DeadLetter, prefix: str) -> str:
    """``topic[partition]@offset`` of the record before it was dead-lettered."""
    topic = logical(letter.original_topic, prefix) or "?"
    partition = "?" if letter.original_partition is None else letter.original_partition
    offset = "?" if letter.original_offset is None else letter.original_offset
    return f"{topic}[{partition}]@{offset}"


def list_row(letter: DeadLetter, prefix: str) -> tuple[str, ...]:
    reason = one_line(letter.reason, 72)
    if letter.truncated:
        reason = f"[excerpt of {letter.size if letter.size is not None else '?'} B] {reason}"
    return (
        f"{letter.partition}@{letter.offset}",
        timestamp(letter.timestamp_ms)[:19],
        original_place(letter, prefix),
        letter.consumer_group or "-",
        letter.stage or "-",
        reason,
    )


def summary_json(letter: DeadLetter, prefix: str) -> dict[str, Any]:
    return {
        "partition": letter.partition,
        "offset": letter.offset,
        "timestamp": timestamp(letter.timestamp_ms),
        "original": {
            "topic": logical(letter.original_topic, prefix),
            "partition": letter.original_partition,
            "offset": letter.original_offset,
        },
        "consumer_group": letter.consumer_group,
        "stage": letter.stage,
        "reason": letter.reason,
        "truncated": letter.truncated,
        "size": letter.size if letter.truncated else len(letter.value or b""),
        "sha256": letter.sha256,
    }


# show ------------------------------------------------------------------------------------


async def read_one(kafka: Kafka, name: str, partition: int, offset: int) -> DeadLetter:
    tp = await kafka.partition(name, partition)
    await kafka.position_of(tp, offset)
    records = await read_range(await kafka.reader(), {tp: (offset, offset + 1)})
    if not records:  # a gap in the log (transaction marker): nothing at that offset
        raise Failure(f"{kafka.shown(name)}[{partition}] has no record at offset {offset}")
    return DeadLetter.from_record(records[0])


def decoded_value(topic: Topic, letter: DeadLetter) -> tuple[dict[str, Any] | None, str | None]:
    """The value decoded with its topic's schema, or None and why it cannot be."""
    if letter.truncated:
        size = letter.size if letter.size is not None else "?"
        return None, (
            f"only an excerpt ({len(letter.value or b'')} of {size} bytes) of a record too "
            f"large to dead-letter whole; sha256 of the original: {letter.sha256 or '?'}"
        )
    try:
        return avro.decode(topic, letter.value, letter.headers), None
    except (InvalidMessage, LookupError) as exc:
        return None, f"cannot decode as {topic.value}: {exc}"


async def show(kafka: Kafka, output: Output, topic_arg: str, partition: int, offset: int) -> int:
    topic, name = _dlq_name(kafka, topic_arg)
    letter = await read_one(kafka, name, partition, offset)
    value, problem = decoded_value(topic, letter)
    raw = letter.value or b""
    if output.as_json:
        output.json(
            {
                **summary_json(letter, kafka.prefix),
                "dlq": topic.dlq,
                "key": bytes_json(letter.key),
                "headers": [{"name": k, **(bytes_json(v) or {})} for k, v in letter.headers],
                "value": value,
                "value_error": problem,
                "value_excerpt": excerpt(raw) if value is None and letter.value else None,
            }
        )
        return EXIT_OK
    output.line(
        f"{topic.dlq}[{letter.partition}]@{letter.offset}  {timestamp(letter.timestamp_ms)}"
    )
    output.line(f"original: {original_place(letter, kafka.prefix)}")
    output.line(f"key: {show_bytes(letter.key)}")
    output.line("headers:")
    for key, header in letter.headers:
        output.line(f"  {key}: " + show_bytes(header).replace("\n", "\n    "))
    if value is not None:
        version = letter.header(avro.VERSION_HEADER) or avro.current_schema(topic.value)[0]
        output.line(f"value ({topic.value}, schema v{version}):")
        output.line(json.dumps(value, ensure_ascii=False, indent=2, default=json_default))
        return EXIT_OK
    output.line(f"value: {problem}")
    if letter.value is None:
        output.line("  (no value: a tombstone)")
        return EXIT_OK
    shown = excerpt(raw)
    output.line(f"  {len(raw)} bytes")
    output.line(f"  utf-8: {escaped(shown['utf8'])}")
    output.line(f"  hex:   {shown['hex']}")
    return EXIT_OK


# replay ----------------------------------------------------------------------------------


def refusal(letter: DeadLetter, expected_topic: str, prefix: str) -> str | None:
    """Why ``letter`` cannot be replayed to ``expected_topic``, or None if it can."""
    where = f"{logical(letter.dlq, prefix)}[{letter.partition}]@{letter.offset}"
    if letter.truncated:
        size = letter.size if letter.size is not None else "?"
        return (
            f"{where} is only an excerpt of a record of {size} bytes, too large to "
            "dead-letter whole: the original is not kept, so it cannot be replayed"
        )
    original = letter.original_topic or expected_topic
    if original != expected_topic:
        return (
            f"{where} came from topic {original}, not {expected_topic} (another "
            "KAFKA_TOPIC_PREFIX?); not replayed"
        )
    return None


async def replay(
    kafka: Kafka,
    output: Output,
    topic_arg: str,
    place: tuple[int, int] | None,
    *,
    dry_run: bool,
) -> int:
    """Publish dead letters (one, or all: partition after partition, in offset order) back
    to their topic, each in the partition it was read from."""
    topic, name = _dlq_name(kafka, topic_arg)
    target = kafka.name(topic)
    if place is not None:
        letters = [await read_one(kafka, name, *place)]
    else:
        bounds = await kafka.bounds(await kafka.partitions(name))
        letters = [
            DeadLetter.from_record(r) for r in await read_range(await kafka.reader(), bounds)
        ]
    checked = [(d, refusal(d, target, kafka.prefix)) for d in letters]
    refused = [(d, why) for d, why in checked if why]
    if place is not None and refused:
        raise Failure(refused[0][1])
    target_partitions = {tp.partition for tp in await kafka.partitions(target)}
    done: list[tuple[DeadLetter, int | None, int | None]] = []
    failed = None
    for letter, why in checked:
        if why:
            continue
        partition = letter.original_partition
        if partition not in target_partitions:
            partition = None  # the topic shrank or the header is missing: by key, then
        new_offset = None
        if not dry_run:
            try:
                producer = await kafka.producer()
                sent = await producer.send_and_wait(
                    target,
                    letter.value,
                    key=letter.key,
                    headers=letter.original_headers(),
                    partition=partition,
                )
            except (KafkaError, OSError) as exc:
                failed = f"publishing {letter.partition}@{letter.offset} failed: {exc!r}"
                break
            partition, new_offset = sent.partition, sent.offset
        done.append((letter, partition, new_offset))
    for _, why in refused:
        output.note(f"tayori: not replayed: {why}")
    if output.as_json:
        output.json(
            {
                "dry_run": dry_run,
                "topic": topic.value,
                "replayed": [
                    {
                        "dlq_partition": letter.partition,
                        "dlq_offset": letter.offset,
                        "key": bytes_json(letter.key),
                        "partition": partition,
                        "offset": new_offset,
                    }
                    for letter, partition, new_offset in done
                ],
                "refused": [
                    {"dlq_partition": d.partition, "dlq_offset": d.offset, "reason": why}
                    for d, why in refused
                ],
            }
        )
    elif not done and not refused:
        output.line(f"{topic.dlq} is empty: nothing to replay")
    elif done:
        verb = "would replay" if dry_run else "replayed"
        output.line(
            table(
                ("DLQ P@OFFSET", "KEY", "TO", "ORIGINAL", "STAGE"),
                (
                    (
                        f"{letter.partition}@{letter.offset}",
                        one_line(show_bytes(letter.key), 40),
                        f"{topic.value}[{'by key' if p is None else p}]"
                        + ("" if o is None else f"@{o}"),
                        original_place(letter, kafka.prefix),
                        letter.stage,
                    )
                    for letter, p, o in done
                ),
            )
        )
        output.line(f"{verb} {len(done)} dead letter(s) to {topic.value}")
    if failed:
        raise Failure(f"{failed}; the {len(done)} before it were replayed")
    return EXIT_PARTLY if refused else EXIT_OK
