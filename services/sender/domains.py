"""Per-recipient-domain sending policy, pure: defaults, learned AIMD state, overrides, warm-up.

The policy in force for a domain is one function of five inputs,
:func:`policy_in_force`:

* the **built-in default** (:data:`DEFAULTS`, else the unlisted-domain limits from the
  settings): the ceiling;
* a **published** record (the ``domain.policy`` topic of the deliverability service, once
  it exists): it may lower the ceiling and throttle or pause the domain;
* an operator **override** (``/v1/domains/{domain}/override``): replaces the ceiling and
  sets the state; ``normal`` overrules a published pause, never a learned one;
* the **learned** AIMD state (:class:`Learned`): what the domain's own replies taught this
  process — a 4xx multiplies the rate down, each delivery adds back; rate-limit answers
  (421, 4.7.x) that go on while the domain accepts nothing pause it;
* a **warm-up** schedule: a daily cap that rises day by day.

Everything here is a value or a function of values: the relay pool (pacing.py) keeps the
mutable state and calls these when something changes, never per recipient.

Rates are messages per second (0 = unlimited); connections are transactions in flight at
once for the domain across every relay connection (0 = unlimited). Through a smarthost the
relay, not us, opens the connections to the domain's MX; bounding what we have in flight
for the domain bounds what it can open when it relays at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta

#: states of a domain, mildest first.
NORMAL, THROTTLED, PAUSED = "normal", "throttled", "paused"
STATES = (NORMAL, THROTTLED, PAUSED)


@dataclass(frozen=True, slots=True)
class Limits:
    """A domain's ceiling: messages per second and transactions in flight (0 = unlimited)."""

    rate: float
    connections: int


# Built-in defaults ------------------------------------------------------------------------
#
# No Japanese carrier and no large provider publishes a number for "messages per second"
# or "connections": their pages for bulk senders ask to send slowly, with few SMTP
# sessions, and say that senders exceeding limits they do not disclose are deferred or
# blocked. Every number below is therefore a conservative choice of ours, not a quoted
# limit; the comment names the public page whose guidance it follows. Operators override
# them by API when their relay or reputation allows more.

#: Japanese carriers. NTT docomo, "迷惑メール撲滅に向けたご理解のお願い"
#: (https://www.docomo.ne.jp/info/spam_mail/request/): receiving blocks of bulk senders,
#: no rate given. The carriers' bulk-sender requests as summarised by HDE
#: (https://www.hde.co.jp/mmta/): docomo "適正なSMTPセッション数で送信ください"; au
#: "時間をかけてゆっくりと送信してください" and no sessions held "同時に多数、もしくは長時間";
#: SoftBank "時間をかけて送信を行うこと". Conservative choice: 10 msgs/s, 4 in flight.
_CARRIER = Limits(rate=10.0, connections=4)
#: Large providers. Google, "Email sender guidelines"
#: (https://support.google.com/mail/answer/81126): rate limiting (421 4.7.28 / 4.7.0) of
#: senders ramping up too fast, "increase sending volume slowly", no number. Yahoo
#: "Sender Best Practices" (https://senders.yahooinc.com/best-practices/) and Microsoft's
#: postmaster pages likewise give none. Conservative choice: 50 msgs/s, 10 in flight
#: (yahoo.co.jp, run by LY Corporation, publishes none either: same choice).
_PROVIDER = Limits(rate=50.0, connections=10)

DEFAULTS: dict[str, Limits] = {
    # NTT docomo
    "docomo.ne.jp": _CARRIER,
    # KDDI au (ezweb.ne.jp, and au.com since 2017)
    "ezweb.ne.jp": _CARRIER,
    "au.com": _CARRIER,
    # SoftBank (softbank.ne.jp: MMS; i.softbank.jp: its IMAP mail)
    "softbank.ne.jp": _CARRIER,
    "i.softbank.jp": _CARRIER,
    # Google
    "gmail.com": _PROVIDER,
    "googlemail.com": _PROVIDER,
    # Yahoo! JAPAN (LY Corporation) and Yahoo (US)
    "yahoo.co.jp": _PROVIDER,
    "yahoo.com": _PROVIDER,
    # Microsoft consumer mail
    "outlook.jp": _PROVIDER,
    "outlook.com": _PROVIDER,
    "hotmail.co.jp": _PROVIDER,
    "hotmail.com": _PROVIDER,
    "live.jp": _PROVIDER,
    # Apple iCloud
    "icloud.com": _PROVIDER,
}


def domain_of(email: str) -> str:
    """The recipient domain of an address, lower-cased (what the policies are keyed by)."""
    return email.rpartition("@")[2].lower()


# Inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WarmUp:
    """A daily cap rising day by day from ``start`` (a UTC date): ``daily_caps[0]`` on the
    first day, ``daily_caps[1]`` on the second, …; no cap once the list is over."""

    start: date
    daily_caps: tuple[int, ...]

    def cap_on(self, day: date) -> int | None:
        """The cap on ``day``; None before the start (nothing to warm yet is no reason to
        hold mail back) or after the last day."""
        n = (day - self.start).days
        if 0 <= n < len(self.daily_caps):
            return self.daily_caps[n]
        return None


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's word on a domain (persisted; api.py). ``rate`` and ``connections``
    (None: the default's) replace the ceiling; ``until`` (None: until deleted) ends the
    override, not just its state."""

    rate: float | None = None
    connections: int | None = None
    state: str = NORMAL
    until: datetime | None = None
    reason: str | None = None
    warmup: WarmUp | None = None

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True)
class Published:
    """A ``domain.policy`` record (the deliverability service's view from its windows)."""

    rate: float
    connections: int
    state: str = NORMAL
    until: datetime | None = None
    reason: str | None = None

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True)
class Aimd:
    """How deferrals and deliveries move a domain's rate (settings: README's table)."""

    #: a 4xx multiplies the rate by this.
    decrease: float = 0.5
    #: each delivery adds this many messages per second back.
    increase: float = 0.1
    #: the lowest rate the multiplier reaches (msgs/s).
    floor: float = 0.2
    #: this many rate-limit signals (421, 4.7.x; one per ``decrease_interval``, as the
    #: decreases) in a row — no delivery accepted between them — within ``window`` seconds
    #: pause the domain
    pause_after: int = 3
    window: float = 60.0
    #: for this many seconds.
    pause_seconds: float = 300.0
    #: at most one decrease per this many seconds: the 4xx of one burst (one per message
    #: in flight) are one signal, not one each (ten halvings would take 50 msgs/s to 0.05).
    decrease_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class Learned:
    """What the domain's replies taught: ``rate`` in force (None: back at the ceiling),
    the rate before the first decrease (reaching it again ends the learning), a pause
    (monotonic seconds) and the rate-limit signals since the last delivery (monotonic
    times)."""

    rate: float | None = None
    recover_to: float = 0.0
    paused_until: float = 0.0
    hits: tuple[float, ...] = ()
    #: when the rate was last multiplied down (monotonic; None: never).
    decreased_at: float | None = None


def is_rate_limit(code: int, enhanced: str | None) -> bool:
    """421 (the receiver closing on us) or an enhanced 4.7.x (a policy deferral: Gmail's
    4.7.28 / 4.7.0, the carriers' "too many" answers)."""
    return code == 421 or (enhanced is not None and enhanced.startswith("4.7."))


def about_the_domain(code: int, enhanced: str | None) -> bool:
    """Whether a 4xx speaks of the domain's intake rather than of one mailbox: a rate-limit
    answer (:func:`is_rate_limit`), or its mail system congested or not accepting mail
    (4.3.1, 4.3.2, 4.4.x). A mailbox's answer (4.2.x full or over its own rate, greylisting's
    4.3.0 or a bare 450/451) is that recipient's, retried by itself: one greylisted reader
    must not slow every other reader at gmail.com."""
    if is_rate_limit(code, enhanced):
        return True
    return enhanced is not None and (enhanced in ("4.3.1", "4.3.2") or enhanced.startswith("4.4."))


def deferred(
    learned: Learned | None,
    *,
    rate_now: float,
    rate_limit: bool,
    at: float,
    aimd: Aimd,
) -> Learned:
    """After a 4xx from the domain at monotonic time ``at``: the rate in force
    (``rate_now``, msgs/s; for an unlimited domain what it was being sent at) multiplied
    down, not below the floor — at most once per ``decrease_interval`` seconds: the rest of
    a burst's answers (one per message in flight) change nothing.

    A rate-limit answer that decreases the rate is a *signal*; the ``pause_after``-th
    signal within the window with no delivery accepted since the first (:func:`delivered`
    forgets them) pauses the domain: it went on refusing everything while it was slowed
    down, so it is blocking us, not metering us. A domain that accepts some of what it is
    offered and refuses the rest is metering: AIMD finds its rate, and a pause would only
    stop its mail for ``pause_seconds`` and start the search over."""
    learned = learned or Learned(recover_to=rate_now)
    decreased_at = learned.decreased_at
    if decreased_at is not None and at - decreased_at < aimd.decrease_interval:
        return learned
    current = learned.rate if learned.rate is not None else rate_now
    hits, paused_until = learned.hits, learned.paused_until
    if rate_limit:
        hits = (*(t for t in hits if t > at - aimd.window), at)
        if len(hits) >= aimd.pause_after:
            paused_until, hits = max(paused_until, at + aimd.pause_seconds), ()
    return replace(
        learned,
        rate=max(aimd.floor, current * aimd.decrease),
        paused_until=paused_until,
        hits=hits,
        decreased_at=at,
    )


def delivered(learned: Learned, *, at: float, aimd: Aimd) -> Learned | None:
    """After a delivery at monotonic time ``at``: the rate raised by ``increase`` and the
    rate-limit signals forgotten (the domain accepts mail); None (learning over) once the
    rate is back where it was before the first decrease and no pause is pending."""
    rate = (learned.rate or 0.0) + aimd.increase
    if rate >= learned.recover_to and learned.paused_until <= at:
        return None
    return replace(learned, rate=rate, hits=())


# The policy in force ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """What the relay pool applies to a domain until ``expires`` (monotonic; 0: until an
    input changes): rate (0 = unlimited), connections (0 = unlimited), state and why,
    ``until`` (monotonic) for a pause, and today's warm-up cap (None: none)."""

    rate: float
    connections: int
    state: str
    reason: str | None = None
    until: float = 0.0
    daily_cap: int | None = None
    expires: float = 0.0


def policy_in_force(
    default: Limits,
    *,
    learned: Learned | None = None,
    override: Override | None = None,
    published: Published | None = None,
    now: datetime,
    mono: float,
) -> Policy:
    """defaults ⊕ published ⊕ override ⊕ learned ⊕ warm-up, at wall time ``now`` and
    monotonic time ``mono`` (the learned pause is monotonic, as the pool's clocks are).

    * ceiling: the override's rate/connections if given; else the default's, lowered by a
      published record's (0 counts as unlimited, so the lower non-zero wins);
    * state: an override's ``paused``/``throttled`` wins; an override ``normal`` clears a
      published state; a learned pause applies whatever the override (the receiver said
      so); the learned rate applies below the ceiling;
    * expires: the earliest moment one of those timed inputs ends, so the pool
      recomputes then.
    """
    expires = 0.0
    rate, connections = default.rate, default.connections
    state, reason, until = NORMAL, None, 0.0

    def ends(at: datetime | None) -> None:
        nonlocal expires
        if at is not None:
            left = mono + max(0.0, (at - now).total_seconds())
            expires = left if not expires else min(expires, left)

    if published is not None and published.active(now):
        rate = _lower(rate, published.rate)
        connections = int(_lower(connections, published.connections))
        if published.state != NORMAL:
            state, reason = published.state, published.reason or "domain.policy"
            until = mono + _seconds_to(published.until, now) if published.until else 0.0
        ends(published.until)
    daily_cap = None
    if override is not None and override.active(now):
        if override.rate is not None:
            rate = override.rate
        if override.connections is not None:
            connections = override.connections
        state, reason = override.state, override.reason or "operator override"
        until = mono + _seconds_to(override.until, now) if override.until else 0.0
        if override.state == NORMAL:
            reason, until = None, 0.0
        if override.warmup is not None:
            daily_cap = override.warmup.cap_on(now.astimezone(UTC).date())
            ends(_next_day(now))
        ends(override.until)
    if learned is not None:
        if learned.rate is not None and (rate == 0 or learned.rate < rate):
            rate = learned.rate
            if state == NORMAL:
                state, reason = THROTTLED, "deferrals (AIMD)"
        if learned.paused_until > mono and state != PAUSED:
            state, reason, until = PAUSED, "rate-limit answers (421 / 4.7.x)", learned.paused_until
            expires = learned.paused_until if not expires else min(expires, learned.paused_until)
    if state == PAUSED and not until:
        until = float("inf")  # until the override or the record ends or is deleted
    return Policy(rate, connections, state, reason, until, daily_cap, expires)


def _lower(a: float, b: float) -> float:
    """The stricter of two limits where 0 means unlimited."""
    if not a:
        return b
    if not b:
        return a
    return min(a, b)


def _seconds_to(at: datetime | None, now: datetime) -> float:
    return 0.0 if at is None else max(0.0, (at - now).total_seconds())


def _next_day(now: datetime) -> datetime:
    tomorrow = now.astimezone(UTC).date() + timedelta(days=1)
    return datetime.combine(tomorrow, datetime.min.time(), UTC)
