"""A round's offsets are committed under the group membership its records were fetched in.

Kafka fences a commit by the member id and generation it carries: a member the coordinator
no longer knows is refused (UNKNOWN_MEMBER_ID, ILLEGAL_GENERATION). aiokafka, though, puts
into the commit request the membership its coordinator holds *when the request is built*,
not the one the records came under. Between a fetch and its commit the member may lose its
place (its coordinator forgot it: generation -1, no member id, until it has joined again)
or join again; its commit then goes out without a membership, which a broker takes from a
consumer outside any group when no member has joined the group yet, or under the new
membership, which it takes too.

On a durable broker that is harmless: the records are still in the log they came from. On
a broker that restarted empty (the embedded Tansu broker keeps everything in memory; an
unclean election is the Kafka analogue) it loses records: a sender held a batch of three
requests per partition through the restart, its heartbeat found its member id forgotten
just before the batch's commit of offset 3, and the commit was taken by the empty broker.
The requests published after the restart sat at offsets 0-2 of the new logs, below that
offset, and were never read (tests/integration/test_sender_outages.py: once in a CI run, 1
run of 34 here). The generation does not tell memberships apart (Tansu counts from zero
again); the member id does: the coordinator makes a new one for each member that joins.

So a round's commit is sent only while the coordinator still holds the membership of the
round's fetch, checked and put into the request in one step (:func:`commit_fenced`): a
broker that restarted since does not know that member id and refuses the commit; a member
that lost or changed its membership meanwhile does not commit at all, and its partitions
start again from the group's offsets once it has joined (:func:`uncommittable`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from aiokafka.structs import OffsetAndMetadata


@dataclass(frozen=True)
class Membership:
    """A member's place in its group as its coordinator holds it. ``generation`` is -1 and
    ``member_id`` empty while it has none (not joined yet, or forgotten by the coordinator
    and joining again)."""

    generation: int
    member_id: str

    @property
    def joined(self) -> bool:
        return self.generation >= 0 and bool(self.member_id)


def uncommittable(
    fetched: Membership, now: Membership, assignments_then: int, assignments_now: int
) -> str | None:
    """Why a round whose records were fetched under ``fetched`` (the member's
    ``assignments_then``-th assignment) must not commit now, or None if it may.

    - fetched without a membership: a commit without one (generation -1) is what a broker
      takes from a consumer outside any group, even one that restarted empty;
    - the membership moved: the records may be of a log the broker no longer has;
    - the group assigned partitions again: they start again from the group's offsets (the
      membership moves with it on Kafka; kept as its own rule, as it was first)."""
    if not fetched.joined:
        return "the records were fetched while the member had no membership"
    if now != fetched:
        return "the membership changed while the records were handled"
    if assignments_now != assignments_then:
        return "the group was rebalanced while the records were handled"
    return None


def membership(consumer: AIOKafkaConsumer) -> Membership:
    """The membership ``consumer``'s coordinator holds now (aiokafka keeps it private)."""
    coordinator = consumer._coordinator
    return Membership(coordinator.generation, coordinator.member_id)


async def commit_fenced(
    consumer: AIOKafkaConsumer,
    fetched: Membership,
    offsets: Mapping[TopicPartition, int],
    *,
    assignment: int,
    assignments: Callable[[], int],
) -> str | None:
    """Commit ``offsets`` under ``fetched``: None once committed, else why not (nothing was
    sent). ``assignments()`` is the member's assignment count now (``assignment``: the
    round's).

    ``AIOKafkaConsumer.commit`` checks nothing of this and builds its request a loop
    iteration later, in a task, with whatever membership is current then. Here the check and
    the request are one synchronous step: ``_do_commit_offsets`` reads the coordinator's
    generation and member id into its request before its first await
    (tests/unit/test_kafka_fence.py pins that to the installed aiokafka). Errors are
    aiokafka's: a refused membership raises CommitFailedError (the round is redone from the
    group's offsets), a retriable one is retried after the client's backoff, the membership
    checked again first."""
    coordinator = consumer._coordinator
    subscription = consumer._subscription.subscription
    current = None if subscription is None else subscription.assignment
    if current is None:
        raise IllegalStateError("No partitions assigned")
    if not set(offsets) <= current.tps:
        raise IllegalStateError(f"Partitions not assigned: {set(offsets) - current.tps}")
    request = {tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()}
    while True:
        await coordinator.ensure_coordinator_known()
        # From here to the request being built nothing awaits: the check holds for it.
        reason = uncommittable(fetched, membership(consumer), assignment, assignments())
        if reason is not None:
            return reason
        try:
            await coordinator._do_commit_offsets(current, request)
        except (UnknownMemberIdError, IllegalGenerationError, RebalanceInProgressError) as exc:
            raise CommitFailedError(
                f"the coordinator refused the commit of membership {fetched}: {exc!r}"
            ) from exc
        except KafkaError as exc:
            if not exc.retriable:
                raise
            await asyncio.sleep(coordinator._retry_backoff_ms / 1000)
        else:
            return None
