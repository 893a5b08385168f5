"""``tayori offsets``: where consumer groups are, and the way past a record that crashes one.

tayori offsets show [--group GROUP] [--topic TOPIC]
                      committed offset, end offset and lag per partition (without
                      --group: the groups on the broker under KAFKA_TOPIC_PREFIX)
tayori offsets skip --group GROUP --topic TOPIC --partition P --offset O [--force]
                      move GROUP past offset O of TOPIC[P]: commit O+1

GROUP is the consumer group as its service declares it (``ConsumerSpec`` in
services/<name>/app.py, e.g. ``contacts.ingest``); KAFKA_TOPIC_PREFIX is put in front.

A record that a consumer refuses goes to the topic's DLQ by itself. A record that crashes
the consumer (a bug) stops it at that record: stop the service (every replica), run
``skip``, start it again. ``skip`` copies what it skips to the topic's DLQ first (stage
``skip``) — the record named and any before it the group had not committed yet, since
offsets cannot skip one record alone — so ``tayori dlq replay`` can send them back once
the bug is fixed. It commits only while the group has no members; Apache Kafka forgets a
member that stopped without leaving after its session timeout (KAFKA_SESSION_TIMEOUT_MS).
The embedded broker (``tayori dev``) keeps a member that left in the group's first
generation for good: ``--force`` then joins the group itself and commits only if no other
member answers the rebalance.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError

from libs.common.deadletters import dead_letter_headers, read_range
from libs.common.kafkasecurity import connection_options
from libs.common.topics import Topic
from tayori.ops import (
    CLIENT_ID,
    EXIT_OK,
    Failure,
    GroupState,
    Kafka,
    Output,
    logical,
    one_line,
    resolve_topic,
    show_bytes,
    table,
)

#: ``skip`` copies at most this many records to the DLQ; more means the offset is wrong or
#: the group is far behind for another reason.
SKIP_LIMIT = 10_000
#: how long ``skip --force`` waits to be given the partitions as the group's member.
JOIN_SECONDS = 60.0

#: what ``skip`` did with each record: (offset, key as text, DLQ partition, DLQ offset).
Copies = list[tuple[int, str, int | None, int | None]]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    offsets = sub.add_parser(
        "offsets",
        help="consumer group offsets; skip a record that crashes a consumer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = offsets.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", parents=[common], help="a group's offsets and lag")
    show.add_argument("--group", help="e.g. contacts.ingest; without it, list the groups")
    show.add_argument("--topic", help="only this topic")
    skip = actions.add_parser(
        "skip",
        parents=[common],
        help="commit OFFSET+1 for a stopped group",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    skip.add_argument("--group", required=True)
    skip.add_argument("--topic", required=True, help="the topic the group reads")
    skip.add_argument("--partition", type=int, required=True)
    skip.add_argument("--offset", type=int, required=True, help="the record to skip")
    skip.add_argument(
        "--force",
        action="store_true",
        help="when the broker lists members of a stopped group: join it and commit if alone",
    )
    skip.add_argument(
        "--dry-run", action="store_true", help="say what would be skipped, change nothing"
    )


async def run(args: argparse.Namespace, kafka: Kafka, output: Output) -> int:
    if args.action == "show":
        if args.group is None:
            return await list_groups(kafka, output)
        return await show(kafka, output, args.group, args.topic)
    return await skip(
        kafka,
        output,
        args.group,
        args.topic,
        args.partition,
        args.offset,
        force=args.force,
        dry_run=args.dry_run,
    )


# Groups ----------------------------------------------------------------------------------


async def list_groups(kafka: Kafka, output: Output) -> int:
    listed = await (await kafka.admin()).list_consumer_groups()
    names = sorted(
        logical(group_id, kafka.prefix) or group_id
        for group_id, *_ in listed
        if group_id.startswith(kafka.prefix)
    )
    if output.as_json:
        output.json(names)
    elif not names:
        output.line("no consumer groups" + (f" under {kafka.prefix!r}" if kafka.prefix else ""))
    else:
        output.line("\n".join(names))
    return EXIT_OK


async def show(kafka: Kafka, output: Output, group: str, topic_arg: str | None) -> int:
    """Committed offset, end offset and lag of each partition of the Tayori topics the
    group has committed offsets on (or of ``topic_arg``)."""
    group_id = kafka.group_id(group)
    existing = await kafka.topics()
    if topic_arg is not None:
        topic, is_dlq = resolve_topic(topic_arg, kafka.prefix)
        names = [kafka.name(topic.dlq if is_dlq else topic)]
    else:  # named: aiokafka cannot read the embedded broker's answer for "all partitions"
        names = [kafka.name(t) for t in Topic if kafka.name(t) in existing]
    tps = [tp for name in names for tp in await kafka.partitions(name)]
    offsets = await kafka.committed(group_id, tps)
    if topic_arg is None:
        read = {tp.topic for tp, offset in offsets.items() if offset >= 0}
        tps = [tp for tp in tps if tp.topic in read]
    bounds = await kafka.bounds(tps) if tps else {}
    state = await kafka.group_state(group_id)
    rows = []
    for tp in tps:
        begin, end = bounds[tp]
        at = offsets[tp]
        # no commit: the consumer starts at the beginning (auto_offset_reset=earliest)
        lag = end - max(at, begin) if at >= 0 else end - begin
        rows.append((logical(tp.topic, kafka.prefix), tp.partition, at, end, lag))
    if output.as_json:
        output.json(
            {
                "group": group,
                "group_id": group_id,
                "state": state.state if state else None,
                "members": len(state.members) if state else None,
                "partitions": [
                    {
                        "topic": t,
                        "partition": p,
                        "committed": None if c < 0 else c,
                        "end": e,
                        "lag": lag,
                    }
                    for t, p, c, e, lag in rows
                ],
            }
        )
        return EXIT_OK
    described = f"{state.state}, {len(state.members)} member(s)" if state else "state unknown"
    output.line(f"group {group} ({group_id}): {described}")
    if not rows:
        output.line("no committed offsets on Tayori topics")
        return EXIT_OK
    output.line(
        table(
            ("TOPIC", "PARTITION", "COMMITTED", "END", "LAG"),
            ((t, p, None if c < 0 else c, e, lag) for t, p, c, e, lag in rows),
        )
    )
    return EXIT_OK


# skip ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkipPlan:
    """What skipping ``offset`` means for a group whose next record is ``start``."""

    start: int
    offset: int

    @property
    def already_past(self) -> bool:
        return self.start > self.offset

    @property
    def skipped(self) -> range:
        """The offsets the group will never have handled: the named one and any before it
        that it had not committed yet."""
        return range(self.start, self.offset + 1)

    @property
    def commit(self) -> int:
        return self.offset + 1


def plan_skip(committed_offset: int, begin: int, offset: int) -> SkipPlan:
    """A group's next record is its committed offset, or the partition's first one when it
    has none or retention removed it (Tayori's consumers reset to the earliest)."""
    start = committed_offset if committed_offset >= 0 else begin
    return SkipPlan(max(start, begin), offset)


def members_refusal(group: str, group_id: str, state: GroupState | None) -> str | None:
    """Why ``skip`` will not commit without --force, or None."""
    if state is None:
        return (
            f"cannot tell whether group {group} ({group_id}) has members: the broker does not "
            "describe it; stop the service (every replica) and pass --force"
        )
    if state.members:
        return (
            f"group {group} ({group_id}) has {len(state.members)} member(s) "
            f"({state.describe_members()}): stop the service (every replica) first. Stopped "
            "already? Apache Kafka drops a member that did not leave after "
            "KAFKA_SESSION_TIMEOUT_MS, try again then; the embedded broker keeps one for "
            "good: pass --force"
        )
    return None


async def skip(
    kafka: Kafka,
    output: Output,
    group: str,
    topic_arg: str,
    partition: int,
    offset: int,
    *,
    force: bool,
    dry_run: bool,
) -> int:
    topic, is_dlq = resolve_topic(topic_arg, kafka.prefix)
    if is_dlq:
        raise Failure(f"name the topic group {group} reads ({topic.value}), not its DLQ")
    group_id = kafka.group_id(group)
    tp = await kafka.partition(kafka.name(topic), partition)
    await kafka.position_of(tp, offset)
    before = (await kafka.committed(group_id, [tp]))[tp]
    begin, _ = (await kafka.bounds([tp]))[tp]
    plan = plan_skip(before, begin, offset)
    place = f"{topic.value}[{partition}]"
    if plan.already_past:
        if output.as_json:
            output.json(_skip_json(group, group_id, topic, partition, before, plan, [], "past"))
        else:
            output.line(
                f"group {group} is already past offset {offset} of {place} (its next record "
                f"is {plan.start}): nothing to do"
            )
        return EXIT_OK
    if len(plan.skipped) > SKIP_LIMIT:
        raise Failure(
            f"group {group}'s next record of {place} is {plan.start}: skipping to {offset} "
            f"would skip {len(plan.skipped)} records (at most {SKIP_LIMIT}); is the offset right?"
        )
    state = await kafka.group_state(group_id)
    refusal = members_refusal(group, group_id, state)
    if refusal and not force:
        raise Failure(refusal)
    records = await read_range(await kafka.reader(), {tp: (plan.start, plan.commit)})
    if not records or records[-1].offset != offset:
        raise Failure(f"{place} has no record at offset {offset}")
    if dry_run:
        copies: Copies = [(r.offset, show_bytes(r.key), None, None) for r in records]
    else:
        copies = await _copy_and_commit(
            kafka,
            group,
            group_id,
            tp,
            plan.commit,
            lambda: _copy_to_dlq(kafka, topic, group, records, offset),
            state=state,
            force=force,
        )
    status = "dry_run" if dry_run else "skipped"
    if output.as_json:
        output.json(_skip_json(group, group_id, topic, partition, before, plan, copies, status))
        return EXIT_OK
    was = "none" if before < 0 else before
    if dry_run:
        output.line(f"would commit {plan.commit} for group {group} on {place} (now: {was})")
    else:
        output.line(f"group {group}: committed {plan.commit} on {place} (was: {was})")
    verb = "would copy" if dry_run else "copied"
    output.line(f"{len(copies)} record(s) skipped, {verb} to {topic.dlq} (stage skip):")
    output.line(
        table(
            ("OFFSET", "KEY", "DLQ P@OFFSET", "NOTE"),
            (
                (
                    at,
                    one_line(key, 40),
                    None if dlq_partition is None else f"{dlq_partition}@{dlq_offset}",
                    "the record named" if at == offset else "not committed by the group yet",
                )
                for at, key, dlq_partition, dlq_offset in copies
            ),
        )
    )
    if not dry_run:
        output.line(
            f"start the service again; once the bug is fixed, `tayori dlq replay {topic.value} "
            "--partition P --offset O` sends a skipped record back"
        )
    return EXIT_OK


def _skip_json(
    group: str,
    group_id: str,
    topic: Topic,
    partition: int,
    before: int,
    plan: SkipPlan,
    copies: Copies,
    status: str,
) -> dict[str, Any]:
    return {
        "status": status,
        "group": group,
        "group_id": group_id,
        "topic": topic.value,
        "partition": partition,
        "committed_before": None if before < 0 else before,
        "committed": None if status == "past" else plan.commit,
        "skipped": [{"offset": at, "dlq_partition": p, "dlq_offset": o} for at, _, p, o in copies],
    }


async def _copy_to_dlq(
    kafka: Kafka, topic: Topic, group: str, records: list[Any], offset: int
) -> Copies:
    """Dead-letter the skipped records as a consumer would (stage ``skip``), before the
    commit: a failure here leaves the group where it was."""
    producer = await kafka.producer()
    futures = []
    for record in records:
        reason = (
            f"skipped by an operator (tayori offsets skip at offset {offset})"
            if record.offset == offset
            else f"skipped along with offset {offset}: the group had not committed it yet"
        )
        headers = dead_letter_headers(
            record.headers or (),
            stage="skip",
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            group=group,
        )
        futures.append(
            await producer.send(
                kafka.name(topic.dlq), record.value, key=record.key, headers=headers
            )
        )
    sent = await asyncio.gather(*futures)
    return [
        (r.offset, show_bytes(r.key), s.partition, s.offset)
        for r, s in zip(records, sent, strict=True)
    ]


async def _copy_and_commit(
    kafka: Kafka,
    group: str,
    group_id: str,
    tp: TopicPartition,
    offset: int,
    copy: Callable[[], Awaitable[Copies]],
    *,
    state: GroupState | None,
    force: bool,
) -> Copies:
    """Copy the skipped records (``copy``), then commit ``offset``, once the group may be
    moved. A client outside the group commits while the broker lists no member (a broker
    refuses that while the group has any); with ``force``, members that are listed are
    taken for gone: a client joins the group and commits only if it finds itself alone."""
    if state is not None and state.members:  # and force: checked by the caller
        return await _commit_as_member(kafka, group, group_id, tp, offset, copy)
    copies = await copy()
    try:
        await _commit_from_outside(kafka, group_id, tp, offset)
    except CommitFailedError:
        if not force or state is None:
            raise Failure(
                f"the broker refused the commit: group {group} has members (did the service "
                "start?); the records were copied to the DLQ already. Stop the service "
                "(every replica) and try again"
            ) from None
        await _commit_as_member(kafka, group, group_id, tp, offset, None)
    return copies


async def _commit_from_outside(
    kafka: Kafka, group_id: str, tp: TopicPartition, offset: int
) -> None:
    consumer = AIOKafkaConsumer(
        **connection_options(kafka.settings),
        client_id=CLIENT_ID,
        group_id=group_id,
        enable_auto_commit=False,
    )
    try:
        await consumer.start()
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


async def _commit_as_member(
    kafka: Kafka,
    group: str,
    group_id: str,
    tp: TopicPartition,
    offset: int,
    copy: Callable[[], Awaitable[Copies]] | None,
) -> Copies:
    """Join the group (a rebalance: a member that is gone is dropped by it), and commit
    only if this client is the one member left; the group cannot move meanwhile."""
    session_ms = kafka.settings.kafka_session_timeout_ms
    consumer = AIOKafkaConsumer(
        tp.topic,
        **connection_options(kafka.settings),
        client_id=CLIENT_ID,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=max(100, session_ms // 5),
    )
    try:
        await consumer.start()
        try:
            async with asyncio.timeout(JOIN_SECONDS + 2 * session_ms / 1000):
                while tp not in consumer.assignment():  # the group's join runs meanwhile
                    await consumer.getmany(timeout_ms=100, max_records=1)
        except TimeoutError:
            raise Failure(
                f"joined group {group} but was not given {tp.topic}[{tp.partition}]: it has "
                "other members; stop the service (every replica) first"
            ) from None
        state = await kafka.group_state(group_id)
        if state is None or len(state.members) != 1:
            others = "other members" if state is None else state.describe_members()
            raise Failure(
                f"group {group} has live members ({others}): stop the service "
                "(every replica) first; nothing committed"
            )
        copies = await copy() if copy is not None else []
        await consumer.commit({tp: offset})
        return copies
    finally:
        await consumer.stop()
