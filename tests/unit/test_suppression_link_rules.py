"""The decisions the unsubscribe link's one statement (queries.sql reader-unsubscribe) takes
from processor.py: which states it stops, and that it only runs when nothing propagates."""

from __future__ import annotations

import pytest

from services.suppression.processor import READER_STOPS, STATES, propagation, reader_unsubscribe


def test_the_link_stops_exactly_the_states_a_reader_unsubscribe_changes():
    assert READER_STOPS == ("deliverable",)
    for state in STATES:
        assert reader_unsubscribe(state).allowed
        assert reader_unsubscribe(state).changes == (state in READER_STOPS)


@pytest.mark.parametrize("sync_ban", [False, True])
def test_an_unsubscribe_propagates_only_with_the_unsubscribe_switch(sync_ban):
    # The statement checks `NOT sync_policy.unsubscribe`; with the switch on it hands over.
    assert propagation("unsubscribed", sync_unsubscribe=False, sync_ban=sync_ban) is None
    assert propagation("unsubscribed", sync_unsubscribe=True, sync_ban=sync_ban) is not None
