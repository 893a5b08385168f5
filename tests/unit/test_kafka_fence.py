"""libs/common/kafkafence: when a round's offsets may be committed, and the aiokafka internals
its fenced commit relies on."""

from __future__ import annotations

import inspect

from libs.common.kafkafence import Membership, uncommittable

OURS = Membership(3, "tayori-sender-6f1c")


def test_a_round_commits_under_the_membership_and_assignment_it_was_fetched_in() -> None:
    assert uncommittable(OURS, Membership(3, "tayori-sender-6f1c"), 1, 1) is None


def test_a_member_forgotten_and_joined_again_does_not_commit_even_at_the_same_generation() -> None:
    """A broker that restarted empty counts generations from zero again: only the member id
    tells the new membership from the one the records were fetched under."""
    again = Membership(3, "tayori-sender-90ab")
    assert uncommittable(OURS, again, 1, 1) == (
        "the membership changed while the records were handled"
    )


def test_a_member_that_lost_its_membership_and_has_not_joined_yet_does_not_commit() -> None:
    """Generation -1 with no member id is a commit from outside any group: a broker takes it."""
    assert uncommittable(OURS, Membership(-1, ""), 1, 1) is not None


def test_records_fetched_without_a_membership_are_never_committed() -> None:
    outside = Membership(-1, "")
    assert uncommittable(outside, outside, 0, 0) == (
        "the records were fetched while the member had no membership"
    )


def test_a_round_the_group_was_rebalanced_under_does_not_commit() -> None:
    assert uncommittable(OURS, OURS, 1, 2) == (
        "the group was rebalanced while the records were handled"
    )


def test_the_private_commit_the_fence_calls_is_there_in_this_aiokafka() -> None:
    """kafkafence.commit_fenced checks the membership and calls the coordinator's
    ``_do_commit_offsets`` in one synchronous step, which holds only while that method reads
    the generation and member id into its request before its first await. This fails when
    aiokafka moves, so that the fence is checked again against the new version instead of
    silently committing under whatever membership is current."""
    import aiokafka
    from aiokafka.consumer import consumer, group_coordinator

    assert aiokafka.__version__ == "0.14.0"
    source = inspect.getsource(group_coordinator.GroupCoordinator._do_commit_offsets)
    built = source.index("OffsetCommitRequest(")
    first_await = source.index("await ")
    assert built < first_await
    assert "self.generation," in source[built:first_await]
    assert "self.member_id," in source[built:first_await]
    assert "async def ensure_coordinator_known" in inspect.getsource(
        group_coordinator.GroupCoordinator
    )
    init = inspect.getsource(group_coordinator.GroupCoordinator.__init__)
    assert "self._retry_backoff_ms = retry_backoff_ms" in init
    consumer_source = inspect.getsource(consumer.AIOKafkaConsumer)
    assert "self._coordinator = GroupCoordinator(" in consumer_source
    assert "self._subscription = SubscriptionState(" in consumer_source
