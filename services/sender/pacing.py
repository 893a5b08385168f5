"""Per-recipient-domain pacing inside the relay pool: token buckets, in-flight caps, AIMD.

Every delivery a relay worker takes from the pool's queue is first **admitted** for its
recipient domain (:meth:`DomainPacing.admit`): the domain's policy (domains.py) must not be
paused, its warm-up cap for today not reached, fewer than its cap of transactions in
flight, and its token bucket must hold a token. A delivery that may not go now is
**parked** with its domain, not put back in front of the others: the worker takes the next
delivery at once, so mail to other domains keeps its full speed (no head-of-line blocking
of the batch). A domain's parked deliveries go back to the queue when its next token is
due, its pause ends or one of its transactions ends.

Nothing is lost or sent twice by waiting: a parked delivery is still claimed in the ledger
and its batch's handler waits for its outcome, as for a 4xx backoff (``RelayPool.later``);
on stop it stays claimed and is sent after the restart. One whose wait in all (what it
waited already plus :func:`projected_wait`) passes ``SENDER_DOMAIN_HOLD_SECONDS`` is also
*held* (holding.py; decided again for every parked delivery when its domain slows):
its request is written to ``held_delivery`` and its handler stops waiting for it, so its
batch commits and the next comes in while it stays parked here. A delivery that would wait longer
than ``SENDER_DOMAIN_MAX_WAIT_SECONDS`` in all is not held: it is recorded as a
``temporary_error`` (not sent), the path a 4xx takes once its retries are spent, so the
batch ends and the operator (or a resend) tries it again later.

The replies feed the domain back (:meth:`deferred`, :meth:`delivered`): a 4xx multiplies
its rate down, each delivery adds some back (AIMD), and repeated 421 / 4.7.x answers pause
it (domains.deferred).

Cost per recipient when nothing waits: a dict lookup, a monotonic clock read and the
bucket's arithmetic (a few hundred nanoseconds); policies are recomputed only when an
input changes or a timed one ends.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from libs.common.logging import get_logger
from libs.common.metrics import SENDER_DOMAIN_GAVE_UP, SENDER_DOMAIN_THROTTLES, SENDER_DOMAIN_WAITS
from services.sender import domains
from services.sender.domains import PAUSED, Aimd, Learned, Limits, Override, Policy, Published
from services.sender.settings import SenderSettings

if TYPE_CHECKING:
    from services.sender.ledger import Delivery

log = get_logger(__name__)

#: seconds between two rankings of the domains by volume (the metrics' top N) and
#: forgetting of idle domains.
RANK_SECONDS = 60.0
#: a domain with nothing learned, parked or in flight is forgotten after this long idle.
IDLE_SECONDS = 600.0
OTHER = "other"


class TokenBucket:
    """``rate`` tokens a second (0 = unlimited), at most ``burst`` kept."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = 0.0
        self.burst = 1.0
        self.tokens = 1.0
        self.at = now
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        """A new rate; tokens kept stay within the new burst (a tenth of a second's worth,
        at least one: even spacing, a little slack for several workers)."""
        self.rate = rate
        self.burst = max(1.0, rate / 10)
        self.tokens = min(self.tokens, self.burst)

    def take(self, now: float) -> float:
        """0.0 when a token was taken; else the seconds until one is due (nothing taken)."""
        rate = self.rate
        if rate <= 0:
            return 0.0
        tokens = min(self.burst, self.tokens + (now - self.at) * rate)
        self.at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / rate

    def available(self, now: float) -> int:
        if self.rate <= 0:
            return 1 << 30
        return int(min(self.burst, self.tokens + (now - self.at) * self.rate))


class DomainState:
    """One domain's pacing in this process: its policy, bucket, transactions in flight,
    what it taught (AIMD), the deliveries waiting for it, and its volume."""

    __slots__ = (
        "bucket",
        "day",
        "domain",
        "in_flight",
        "last_used",
        "learned",
        "observed",
        "parked",
        "policy",
        "sent",
        "sent_today",
        "timer",
        "timer_at",
        "window_count",
        "window_start",
    )

    def __init__(self, domain: str, policy: Policy, now: float) -> None:
        self.domain = domain
        self.policy = policy
        self.bucket = TokenBucket(policy.rate, now)
        self.in_flight = 0
        self.learned: Learned | None = None
        self.parked: deque[Delivery] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.sent = 0
        self.day = datetime.now(UTC).date()
        self.sent_today = 0
        self.last_used = now
        self.window_start = now
        self.window_count = 0
        self.observed = 0.0  # messages admitted per second over the last full second

    def rate_now(self) -> float:
        """The rate it is sent at: the policy's, or for an unlimited domain the observed."""
        return self.policy.rate or max(1.0, self.observed, float(self.window_count))


class DomainPacing:
    """Admission of deliveries by recipient domain; see the module's docstring."""

    def __init__(
        self,
        settings: SenderSettings,
        *,
        requeue: Callable[[Delivery], None],
        give_up: Callable[[Delivery, str], None],
        hold: Callable[[Delivery], None] | None = None,
        defaults: Mapping[str, Limits] = domains.DEFAULTS,
    ) -> None:
        self.enabled = settings.domain_pacing
        self.requeue = requeue
        self.give_up = give_up
        #: writes a delivery's held row (holding.py); None: nothing is held.
        self.hold = hold
        self.hold_seconds = settings.domain_hold_seconds
        self.defaults = defaults
        self.unlisted = Limits(settings.domain_rate, settings.domain_connections)
        self.max_wait = settings.domain_max_wait_seconds
        self.aimd = Aimd(
            decrease=settings.domain_aimd_decrease,
            increase=settings.domain_aimd_increase,
            floor=settings.domain_aimd_floor,
            pause_after=settings.domain_pause_after,
            window=settings.domain_pause_window_seconds,
            pause_seconds=settings.domain_pause_seconds,
            decrease_interval=settings.domain_aimd_decrease_interval_seconds,
        )
        self.top_n = settings.domain_metrics_top
        self.states: dict[str, DomainState] = {}
        self.overrides: dict[str, Override] = {}
        self.published: dict[str, Published] = {}
        self._top: frozenset[str] = frozenset()
        self._next_rank = 0.0
        self.closing = False

    # Admission (the hot path) ---------------------------------------------------------------

    def admit(self, d: Delivery) -> bool:
        """True: ``d`` may go now (it holds one of its domain's in-flight places until
        :meth:`release`). False: it is parked, or given up (its outcome recorded)."""
        if not self.enabled:
            return True
        domain = d.domain or self._domain_of(d)
        now = time.monotonic()
        if now >= self._next_rank:
            self._rank(now)  # before the lookup: it may forget an idle domain
        state = self.states.get(domain)
        if state is None:
            state = self._state(domain, now)
        elif state.policy.expires and now >= state.policy.expires:
            self._refresh(state, wake=True)
        policy = state.policy
        wait = 0.0
        reason = ""
        if policy.state == PAUSED and now < policy.until:
            wait, reason = policy.until - now, "paused"
        elif policy.daily_cap is not None and self._today(state) >= policy.daily_cap:
            wait, reason = _to_midnight(), "daily_cap"
        elif policy.connections and state.in_flight >= policy.connections:
            wait, reason = -1.0, "connections"  # until one of its transactions ends
        else:
            wait = state.bucket.take(now)
            reason = "rate"
        if wait:
            self._park(d, state, wait, reason, now)
            return False
        state.in_flight += 1
        d.paced = state
        state.sent += 1
        state.sent_today += 1
        state.last_used = now
        if now - state.window_start >= 1.0:
            state.observed = state.window_count / (now - state.window_start)
            state.window_start, state.window_count = now, 0
        state.window_count += 1
        return True

    def release(self, d: Delivery) -> None:
        """``d``'s transaction ended (or it goes back to the queue): its place is free."""
        state = d.paced
        if state is None:
            return
        d.paced = None
        state.in_flight -= 1
        if state.parked and state.timer is None and not self.closing:
            self._wake(state)

    def _domain_of(self, d: Delivery) -> str:
        d.domain = domains.domain_of(d.email)
        return d.domain

    def _today(self, state: DomainState) -> int:
        today = datetime.now(UTC).date()
        if state.day != today:
            state.day, state.sent_today = today, 0
        return state.sent_today

    # Waiting --------------------------------------------------------------------------------

    def _park(self, d: Delivery, state: DomainState, wait: float, reason: str, now: float) -> None:
        """Hold ``d`` with its domain until it may go: woken after ``wait`` seconds (-1:
        when one of the domain's transactions ends; infinite: a pause with no end, until
        an operator lifts it or the bound is reached). Given up when a known wait would
        pass the bound, or when the bound is reached."""
        if d.waiting_since is None:
            d.waiting_since = now
        label = self.label(state.domain)
        waited = now - d.waiting_since
        if wait == float("inf") and waited < self.max_wait:
            wait = self.max_wait - waited  # held, in case the pause is lifted meanwhile
        if waited + max(0.0, wait) > self.max_wait or (wait < 0 and waited > self.max_wait):
            SENDER_DOMAIN_GAVE_UP.labels(label, reason).inc()
            log.warning(
                "domain_wait_too_long",
                domain=state.domain,
                reason=reason,
                campaign_id=d.campaign_id,
                contact_id=d.key.contact_id,
            )
            self.give_up(d, f"{state.domain} {reason}: would wait more than {self.max_wait:g} s")
            return
        SENDER_DOMAIN_WAITS.labels(label, reason).inc()
        if (
            self.hold is not None
            and not d.hold
            and d.request is not None
            and should_hold(
                waited + projected_wait(wait, reason, len(state.parked), state.rate_now()),
                self.hold_seconds,
            )
        ):
            self.hold(d)
        state.parked.append(d)
        if wait > 0:
            self._wake_at(state, now + wait)

    def _hold_parked(self, state: DomainState, now: float) -> None:
        """The domain got slower (paused, its rate lowered) while deliveries were parked
        with it: their waits grew since :meth:`_park` decided not to hold them, and each
        would keep its batch — and the next batch, other domains' mail with it — waiting
        for the new wait (a 421 pausing the domain: the whole pause). Hold each one whose
        wait in all (what it waited already, then what it has now ahead of it) passes the
        threshold."""
        if self.hold is None or not state.parked:
            return
        policy = state.policy
        paused = policy.state == PAUSED and now < policy.until
        wait, reason = (policy.until - now, "paused") if paused else (0.0, "rate")
        rate = state.rate_now()
        for ahead, d in enumerate(state.parked):
            if d.hold or d.request is None:
                continue
            waited = now - d.waiting_since if d.waiting_since is not None else 0.0
            if should_hold(waited + projected_wait(wait, reason, ahead, rate), self.hold_seconds):
                self.hold(d)

    def _wake_at(self, state: DomainState, at: float) -> None:
        if self.closing:
            return
        if state.timer is not None:
            if state.timer_at <= at:
                return
            state.timer.cancel()
        loop = asyncio.get_running_loop()
        state.timer = loop.call_at(loop.time() + max(0.0, at - time.monotonic()), self._wake, state)
        state.timer_at = at

    def _wake(self, state: DomainState) -> None:
        """Put back on the queue as many parked deliveries as may go now (at least one:
        a delivery that may not go parks again, with a new wake-up)."""
        state.timer = None
        now = time.monotonic()
        n = min(len(state.parked), state.bucket.available(now))
        if state.policy.connections:
            n = min(n, state.policy.connections - state.in_flight)
        for _ in range(max(1, n)):
            if not state.parked:
                break
            self.requeue(state.parked.popleft())

    # Feedback -------------------------------------------------------------------------------

    def deferred(self, d: Delivery, code: int, enhanced: str | None) -> None:
        """A 4xx from ``d``'s domain about its intake (:func:`domains.about_the_domain`): its
        rate goes down; rate-limit answers may pause it. A mailbox's own 4xx changes nothing
        here (the delivery is retried by itself)."""
        if not self.enabled or not domains.about_the_domain(code, enhanced):
            return
        domain = d.domain or self._domain_of(d)
        now = time.monotonic()
        state = self.states.get(domain) or self._state(domain, now)
        rate_limit = domains.is_rate_limit(code, enhanced)
        before = state.policy
        state.learned = domains.deferred(
            state.learned, rate_now=state.rate_now(), rate_limit=rate_limit, at=now, aimd=self.aimd
        )
        self._refresh(state, wake=False)
        label = self.label(domain)
        SENDER_DOMAIN_THROTTLES.labels(label, "decrease").inc()
        if state.policy.state == PAUSED and before.state != PAUSED:
            SENDER_DOMAIN_THROTTLES.labels(label, "pause").inc()
            log.warning(
                "domain_paused",
                domain=domain,
                reason=state.policy.reason,
                seconds=round(state.policy.until - now, 1),
            )
        else:
            log.info("domain_slowed", domain=domain, code=code, rate=round(state.policy.rate, 2))

    def delivered(self, d: Delivery) -> None:
        """A delivery to ``d``'s domain: a learning domain's rate goes back up."""
        state = d.paced if d.paced is not None else self.states.get(d.domain)
        if state is None or state.learned is None:
            return
        state.learned = domains.delivered(state.learned, at=time.monotonic(), aimd=self.aimd)
        self._refresh(state, wake=False)
        if state.learned is None:
            log.info("domain_recovered", domain=state.domain)

    # Policies -------------------------------------------------------------------------------

    def set_overrides(self, overrides: Mapping[str, Override]) -> None:
        """The operator overrides in force now (loaded from the database)."""
        self.overrides = dict(overrides)
        for state in self.states.values():
            self._refresh(state, wake=True)

    def set_published(self, domain: str, record: Published | None) -> None:
        """A ``domain.policy`` record (None: its tombstone). For the deliverability service's
        topic; nothing feeds it yet."""
        if record is None:
            self.published.pop(domain, None)
        else:
            self.published[domain] = record
        if (state := self.states.get(domain)) is not None:
            self._refresh(state, wake=True)

    def waiting(self) -> int:
        """Deliveries parked for their domain now."""
        return sum(len(state.parked) for state in self.states.values())

    def policy_of(self, domain: str) -> Policy:
        """The policy in force for ``domain`` now (for the API)."""
        state = self.states.get(domain)
        return self._policy(domain, state.learned if state is not None else None)

    def _policy(self, domain: str, learned: Learned | None) -> Policy:
        return domains.policy_in_force(
            self.defaults.get(domain, self.unlisted),
            learned=learned,
            override=self.overrides.get(domain),
            published=self.published.get(domain),
            now=datetime.now(UTC),
            mono=time.monotonic(),
        )

    def _state(self, domain: str, now: float) -> DomainState:
        state = DomainState(domain, self._policy(domain, None), now)
        self.states[domain] = state
        return state

    def _refresh(self, state: DomainState, *, wake: bool) -> None:
        """Recompute the domain's policy. ``wake``: an input changed that may let its
        parked deliveries go sooner (an override, a record, a timed input ending): they are
        tried again now rather than at the wake-up the old policy set. One that makes them
        wait longer may have them held (:meth:`_hold_parked`)."""
        before, state.policy = state.policy, self._policy(state.domain, state.learned)
        if state.parked and slower(before, state.policy):
            self._hold_parked(state, time.monotonic())
        if state.bucket.rate != state.policy.rate:
            state.bucket.set_rate(state.policy.rate)
        if state.parked and (wake or state.timer is None):
            self._wake_at(state, time.monotonic())

    # Metrics --------------------------------------------------------------------------------

    def label(self, domain: str) -> str:
        """The domain as a metric label: its name among the top N by volume, else "other"
        (bounded cardinality: at most N names at a time; until the first ranking with
        volume, the first N domains that need a label)."""
        if domain in self._top:
            return domain
        if len(self._top) < self.top_n:
            self._top = self._top | {domain}
            return domain
        return OTHER

    def _rank(self, now: float) -> None:
        """Every RANK_SECONDS: idle domains forgotten (nothing learned, parked or in
        flight), then the top N of the others by volume since they were first seen."""
        self._next_rank = now + RANK_SECONDS
        states = self.states
        for domain in [
            s.domain
            for s in states.values()
            if s.learned is None
            and not s.parked
            and not s.in_flight
            and s.timer is None
            and now - s.last_used > IDLE_SECONDS
        ]:
            del states[domain]
        ranked = heapq.nlargest(self.top_n, states.values(), key=lambda s: s.sent)
        self._top = frozenset(s.domain for s in ranked if s.sent)

    def stop(self) -> None:
        """No more wake-ups: parked deliveries stay claimed, sent after the restart."""
        self.closing = True
        for state in self.states.values():
            if state.timer is not None:
                state.timer.cancel()
                state.timer = None
            state.parked.clear()


def projected_wait(wait: float, reason: str, parked: int, rate: float) -> float:
    """How long a delivery being parked will wait for its domain, in seconds: a pause or a
    daily cap, what remains of it (``wait``); otherwise its own wait (-1: until one of the
    domain's transactions ends, counted as none) plus the deliveries parked before it at
    the domain's current ``rate`` (msgs/s)."""
    if reason in ("paused", "daily_cap"):
        return wait
    own = max(0.0, wait)
    return own + parked / rate if rate > 0 else own


def should_hold(projected: float, hold_seconds: float) -> bool:
    """Whether a delivery that would wait ``projected`` seconds in all for its domain (what
    it waited already plus :func:`projected_wait`) is held (its batch commits without it:
    ledger.py "Held deliveries") rather than kept by its batch's handler. In all, not only
    from now: a delivery waits again after a 421 or a pause, and waits each short enough
    to keep added up to its batch waiting several times the threshold (a test saw 3 s of
    a 2 s threshold, the other domains' next batch behind it). A negative
    ``hold_seconds`` holds nothing."""
    return hold_seconds >= 0 and projected > hold_seconds


def slower(before: Policy, after: Policy) -> bool:
    """Whether a domain's new policy makes its parked deliveries wait longer than the old
    one did: it is paused now, or sent at a lower rate (0 is unlimited)."""
    if after.state == PAUSED:
        return before.state != PAUSED or after.until > before.until
    return after.rate > 0 and (before.rate == 0 or after.rate < before.rate)


def _to_midnight() -> float:
    """Seconds to the next UTC midnight, when warm-up caps start a new day."""
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (midnight - now).total_seconds()
