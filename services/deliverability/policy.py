"""The sending policy per receiving domain, decided from its windows, pure: which state
(normal / throttled / paused), at which rate, until when and why; and whether a decision
is worth publishing on the compacted ``domain.policy`` topic. No broker, no faust:
``tests/unit/test_deliverability_policy.py`` runs them.

Rules (thresholds: :class:`Thresholds`, README's settings table), most severe first:

1. **complaints**: complaints / delivered over the last hour above ``complaint_rate``
   (default 0.3%, the large providers' bulk-sender limit) once at least
   ``complaint_min_delivered`` were delivered → ``paused`` for ``pause_seconds``;
2. **rate-limit deferrals**: at least ``rate_limit_deferrals`` 421 / 4.7.x answers in the
   recent minutes, and more of them than deliveries → ``paused`` for ``pause_seconds``: the
   domain refuses more than it takes, it is blocking us. One that takes most of its mail
   and answers 421 to the rest is metering us: the sender's AIMD finds its rate (and the
   sender's retried deferrals, ``delivery.deferrals``, count here: 67 of them while 5,000
   went in the ``domains`` bench once paused such a domain for half an hour);
3. **deferrals**: deferred / attempts in the recent minutes at or above ``deferral_ratio``
   once at least ``deferral_min_attempts`` were attempted → ``throttled`` to the rate the
   domain accepted (its busiest recent minute's deliveries per second, not below
   ``throttle_min_rate``) for ``throttle_seconds``;
4. otherwise ``normal``.

A decision that is not ``normal`` always carries an end (``until``): a record the
service stops renewing (it stopped, the domain went quiet) ends by itself at the sender.
The reason is a stable English code with its figures (``deferral_ratio 0.42 >= 0.30 (42/100
in 5m)``), for people and for grep alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.deliverability import processor

NORMAL, THROTTLED, PAUSED = "normal", "throttled", "paused"
#: a throttle rate that moved by more than this fraction is a new policy.
RATE_CHANGE = 0.25


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a domain is throttled or paused (settings: ``DELIVERABILITY_*``)."""

    deferral_ratio: float = 0.3
    deferral_min_attempts: int = 50
    rate_limit_deferrals: int = 20
    complaint_rate: float = 0.003
    complaint_min_delivered: int = 1000
    throttle_min_rate: float = 1.0
    throttle_seconds: float = 300.0
    pause_seconds: float = 1800.0


@dataclass(frozen=True, slots=True)
class Decision:
    """One domain's policy: state, rate while throttled (msgs/s; None: no limit), reason
    (None when normal) and its end (epoch seconds; None when normal)."""

    state: str
    rate: float | None = None
    reason: str | None = None
    until: float | None = None

    def same_as(self, other: Decision | None) -> bool:
        """Whether publishing ``self`` after ``other`` would tell the sender nothing new:
        the same state and a rate within :data:`RATE_CHANGE` of it (the figures in the
        reason and the end move every evaluation; a renewal is a matter of time,
        :func:`should_publish`)."""
        if other is None:
            return self.state == NORMAL
        if self.state != other.state:
            return False
        if self.rate is None or other.rate is None:
            return self.rate == other.rate
        return abs(self.rate - other.rate) <= RATE_CHANGE * max(self.rate, other.rate)


def rate_limit_deferrals(counts: Mapping[str, int]) -> int:
    """Deferrals answered 421 or 4.7.x (the receiver limiting our rate), by their code key."""
    return sum(
        n
        for key, n in counts.items()
        if key.startswith(processor.DEFERRED_CODE)
        and (
            key[len(processor.DEFERRED_CODE) :].startswith("4.7.")
            or key[len(processor.DEFERRED_CODE) :] == "421"
        )
    )


def decide(
    minutes: Sequence[Mapping[str, int]],
    hour: Mapping[str, int],
    *,
    now: float,
    limits: Thresholds,
) -> Decision:
    """The policy for one domain from its recent minute windows' counters (``minutes``,
    :func:`recent_windows`) and its last hour's (``hour``), at epoch ``now``. The same
    figures give the same decision whenever it is made (a throttle's rate is the most the
    domain accepted in one of those minutes, per second), so an unchanged domain's
    policy does not drift with the clock."""
    delivered_h, complaints = hour.get("delivered", 0), hour.get("complaints", 0)
    if delivered_h >= limits.complaint_min_delivered and delivered_h > 0:
        ratio = complaints / delivered_h
        if ratio > limits.complaint_rate:
            reason = (
                f"complaint_rate {ratio:.4f} > {limits.complaint_rate:.4f}"
                f" ({complaints}/{delivered_h} delivered in 1h)"
            )
            return Decision(PAUSED, None, reason, now + limits.pause_seconds)
    recent: dict[str, int] = {}
    for counts in minutes:
        recent = processor.add(recent, counts)
    span = f"{len(minutes)}m"
    limited, delivered = rate_limit_deferrals(recent), recent.get("delivered", 0)
    if 0 < limits.rate_limit_deferrals <= limited and limited > delivered:
        reason = (
            f"rate_limit_deferrals {limited} >= {limits.rate_limit_deferrals}"
            f" (421/4.7.x in {span}, {delivered} delivered)"
        )
        return Decision(PAUSED, None, reason, now + limits.pause_seconds)
    attempts, deferred = recent.get("attempts", 0), recent.get("deferred", 0)
    if attempts >= limits.deferral_min_attempts and attempts > 0:
        ratio = deferred / attempts
        if ratio >= limits.deferral_ratio:
            accepted = max((m.get("delivered", 0) for m in minutes), default=0) / 60
            rate = round(max(limits.throttle_min_rate, accepted), 2)
            reason = (
                f"deferral_ratio {ratio:.2f} >= {limits.deferral_ratio:.2f}"
                f" ({deferred}/{attempts} in {span})"
            )
            return Decision(THROTTLED, rate, reason, now + limits.throttle_seconds)
    return Decision(NORMAL)


def should_publish(
    decision: Decision,
    last: Decision | None,
    last_at: float | None,
    *,
    now: float,
    republish_seconds: float,
) -> bool:
    """Whether to publish ``decision`` (``last``: the one last published at ``last_at``,
    None: none since start). On a change; a throttle or pause again every
    ``republish_seconds`` (its end moves on); a return to normal once (a tombstone), and
    nothing for a domain that was never restricted."""
    if not decision.same_as(last):
        return True
    if decision.state == NORMAL:
        return False
    return last_at is None or now - last_at >= republish_seconds


def recent_windows(
    windows: Sequence[tuple[float, float, dict[str, int]]], now: float, minutes: int
) -> list[dict[str, int]]:
    """The counters of the minute windows (start, end, counters) that started in the last
    ``minutes`` minutes, the current one included, oldest first."""
    since = now - minutes * 60
    return [counts for start, _, counts in sorted(windows) if since < start <= now]
