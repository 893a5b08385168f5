"""The records the deliverability tables hold."""

from __future__ import annotations

from typing import Any

import faust

from services.deliverability import processor


class Counts(faust.Record, serializer="json", namespace="tayori.deliverability.Counts"):
    """One domain's counters in one window (names: :data:`processor.COUNTERS`, plus
    ``deferred:<code>``). ``+`` adds counter by counter, which is what a windowed table's
    ``table[domain] += counts`` applies to every window the record falls in."""

    n: dict[str, int]

    def __add__(self, other: Any) -> Counts:
        return Counts(n=processor.add(self.n, other.n))


def no_counts() -> Counts:
    return Counts(n={})
