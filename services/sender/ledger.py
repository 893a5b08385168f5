"""The send ledger: every (campaign, step, contact) is delivered once, across crashes.

One row per ``(campaign_id, step_id or '', contact_id)``; ``mail.system`` uses
``('mail:<mail_id>', '', <recipient index>)``. A row moves ``claimed → done``.

Across ``kill -9``
------------------
An SMTP relay takes responsibility for a message when it receives the end-of-data
terminator (``CRLF.CRLF``) and not before: a connection that closes earlier makes it
discard the partial message. So the only moment that matters is the terminator write:

1. **claim**: one transaction per consumed batch inserts the batch's keys as ``claimed``
   (``ON CONFLICT DO NOTHING``; what was there already says what to do instead).
2. each pooled connection sends MAIL, RCPT and DATA and, once the relay said 354, the
   content with its terminator (smtp.py), then reads the reply.
3. outcomes (``done``, with the DeliveryResult stored in the row) are written by the
   :class:`Ledger`'s group committer, batched, and each cycle's results go to
   ``delivery.results`` right after its commit. The consumed batch's offsets are committed
   only once every result of the batch is acknowledged by the broker, so the ledger itself
   is the record of what must be (re)published: no outbox table.
4. on restart or redelivery, a row not ``done`` is sent again and a ``done`` row
   re-publishes its stored result with the **same result_id** (consumers count a result id
   or a recipient once, and the scheduler needs an answer for every recipient it released).

The window SMTP leaves open whatever the order (RFC 5321 §4.1.1.4, RFC 1047) is between
the terminator reaching the relay and its reply being recorded: only the relay knows
whether it kept the message. We resolve it towards **nothing lost**: such a row is still
``claimed`` and is resent, with the same Message-ID (compose.py makes it from the ledger
key), so a copy that did get through is the same message, recognisable and dropped by
Message-ID by mailbox providers and by ``tests/integration/test_sender_crash.py``, which
counts mail per (recipient, Message-ID). The alternative, reporting such rows as sent,
loses the mail whose terminator never left: on a loaded 2-core machine a kill landed there
in 2 runs of 16.

How many messages a crash can send twice is bounded: a connection writes a terminator only
while at most one earlier message of its own waits for its outcome's commit
(``smtp.UNRECORDED_PER_CONNECTION``), so at most two per connection. (Earlier versions
also committed a ``handed`` status before each terminator: it told resends apart in a
metric but changed no outcome, and cost every message a wait for a commit. A ``handed`` row
an older sender left is treated as ``claimed``.)

Cycles commit without waiting for the WAL flush (``synchronous_commit`` off for that
transaction): on this kind of machine the flush is most of PostgreSQL's work per message.
A crash of the sender loses nothing PostgreSQL committed; before the offsets of a batch
are committed, :meth:`Ledger.flush` makes every earlier cycle durable with one flushing
commit. Only a crash of PostgreSQL itself can lose the last cycles, and what they recorded
is then resent and re-reported under the rule above.

Two senders, one partition: a rebalance can give a partition to a new member while the old
one still sends its batch. Every row records its ``owner``, a random key whose session-level
advisory lock the owning process holds on a connection of its own for as long as it runs
(:class:`OwnerLock`). A ``claimed`` row whose owner's lock is free is a dead sender's and is
taken over; one whose owner still holds it is left to that owner, and the handler waits
until it is done before its offsets are committed. A row whose delivery its owner abandoned
(its campaign or domain stopped while it queued: holding.Holder.abandoned) is let go, its
owner set to none: the sender its request reaches after a resume takes it over.

Held deliveries
---------------
The one case where a batch's offsets are committed before an outcome (holding.py): a
delivery whose domain would keep it waiting longer than ``SENDER_DOMAIN_HOLD_SECONDS`` is
written to ``held_delivery`` (its request, re-encoded, with its headers and trace), and
only then its handler stops waiting for it. The write commits asynchronously like a cycle;
the handler's flush before the batch's offsets makes it durable. Nothing is lost: from
that flush on the request is in the table rather than in the consumer's offsets, and the
row goes only once the outcome is recorded here and its result acknowledged by the broker.
A request that comes again for an unfinished row with a held row is skipped by the claim
(:func:`claim`: not resent, not waited for; its result comes when it goes). The held rows of
a sender that is gone are taken over by a sweep (agents.sweep_held): a done row's stored
result is published again, an unfinished one is adopted only if its owner is still the one
found gone (so two sweeps never both take it) and sent under the rules above — a resend
carries the same Message-ID.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from libs.common import trace
from libs.common.aio import woken
from libs.common.db import Queries, connect
from libs.common.kafka import Publisher, still_working
from libs.common.logging import get_logger
from libs.common.metrics import SENDER_GROUP_COMMIT_SIZE, SENDER_SENDS
from libs.common.retry import FOREVER, retry
from services.sender.models import Claimed, Done, LedgerKey, Outcome
from services.sender.processor import ledger_row
from services.sender.replan import ReplannedConnection, close_or_drop, replan_transaction
from services.sender.results import ResultsOut

if TYPE_CHECKING:
    from services.sender.pacing import DomainState

log = get_logger(__name__)
QUERIES = Queries(Path(__file__).with_name("queries.sql"))


#: statuses of a row whose sending is not over: its owner may still be at it ('handed':
#: written by older senders, the same as 'claimed' now).
UNFINISHED = ("claimed", "handed")

#: Delivery.hold: its held row is being written; written (its batch no longer waits).
HOLDING, HELD = "holding", "held"


@dataclass(eq=False)
class Delivery:
    """One message to one recipient, from claim to outcome."""

    key: LedgerKey
    kind: str  # campaign | test | system
    email: str
    #: builds (content with CRLF line ends, Message-ID, MAIL FROM) on first use.
    compose: Callable[[], tuple[bytes, str, str]]
    #: set when the outcome is recorded (or the delivery is abandoned).
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    temp_failures: int = 0
    #: (DATA payload without terminator, Message-ID, MAIL FROM), made once.
    composed: tuple[bytes, str, str] | None = None
    paths: tuple[bytes, bytes] = (b"", b"")  # MAIL FROM and RCPT TO arguments
    relay: str | None = None
    #: its result's publication on delivery.results (set with ``done``; None: no result).
    published: asyncio.Future[None] | None = None
    #: the trace it was claimed in (its handler's), which its result carries.
    trace: str | None = field(default_factory=trace.current)
    #: its recipient domain, lower-cased (set by pacing.py on first use).
    domain: str = ""
    #: the domain pacing state whose in-flight place it holds (pacing.py), if any.
    paced: DomainState | None = None
    #: when it first had to wait for its domain (monotonic; bounds its total wait).
    waiting_since: float | None = None
    #: its send.requests record, decoded (None: mail.system, never held).
    request: dict[str, Any] | None = None
    #: "" | HOLDING (its held row being written) | HELD (written: its handler stopped
    #: waiting for it; holding.py).
    hold: str = ""

    @property
    def campaign_id(self) -> str:
        return self.key.campaign_id


def columns(keys: Sequence[LedgerKey]) -> list[list[Any]]:
    """Keys as the three arrays the queries unnest."""
    return [
        [k.campaign_id for k in keys],
        [k.step_id for k in keys],
        [k.contact_id for k in keys],
    ]


async def claim(
    conn: asyncpg.Connection,
    rows: Sequence[tuple[LedgerKey, str, str, str | None]],
    owner: OwnerLock,
) -> tuple[list[Claimed], list[Claimed]]:
    """Claim (key, kind, email, request_id) rows in the caller's transaction.

    Returns (claimed, busy): busy rows are unfinished ('claimed' or 'handed') rows of
    another sender that is alive (a rebalance gave us its partition while it still sends
    them): they must not be sent here. Unfinished rows of a sender that is gone are taken
    over (they are in ``claimed``).
    """
    keys = [r[0] for r in rows]
    # The claim joins send_ledger too: planned with the table as it is now (replan.py).
    await replan_transaction(conn)
    records = await conn.fetch(
        QUERIES["claim"],
        *columns(keys),
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        owner.key,
    )
    claimed = [
        Claimed(
            LedgerKey(r["campaign_id"], r["step_id"], r["contact_id"]),
            r["fresh"],
            r["status"],
            r["result"],
            r["owner"],
        )
        for r in records
    ]
    again = [c.key for c in claimed if not c.fresh and c.status in UNFINISHED]
    if again:
        # A held row's request came again (a redelivery, the scheduler's re-release after a
        # checkpoint): it waits in its sender's pacing queue, or a sweep's; its result comes
        # when it is sent. Neither sent here nor waited for.
        held = {
            LedgerKey(r["campaign_id"], r["step_id"], r["contact_id"])
            for r in await conn.fetch(QUERIES["held-among"], *columns(again))
        }
        if held:
            log.info("held_rows_skipped", rows=len(held))
            claimed = [c for c in claimed if c.key not in held]
    foreign = [c for c in claimed if c.status in UNFINISHED and c.owner != owner.key]
    if not foreign:
        return claimed, []
    alive = await owner.alive(conn, {c.owner for c in foreign if c.owner is not None})
    busy = [c for c in foreign if c.owner in alive]
    adopted = [c.key for c in foreign if c.owner not in alive]
    if adopted:
        await conn.execute(QUERIES["adopt"], *columns(adopted), owner.key)
    return [c for c in claimed if c not in busy], busy


async def wait_for_owners(pool: asyncpg.Pool, owner: OwnerLock, busy: Sequence[Claimed]) -> bool:
    """Wait until no busy row is unfinished by a live sender any more; False when one of
    them was left unfinished by a sender that is gone, or let go by its sender (the batch
    must be handled again)."""
    keys = [c.key for c in busy]
    while True:
        async with pool.acquire() as conn:
            rows = await conn.fetch(QUERIES["owners"], *columns(keys))
            pending = {r["owner"] for r in rows if r["status"] in UNFINISHED}
            if not pending:
                return True
            # No owner: let go by a sender that abandoned it (holding.Holder.abandoned).
            if pending - await owner.alive(conn, pending - {None}):
                return False
        await asyncio.sleep(0.2)


class OwnerLock:
    """This process's identity in the ledger: a random key whose session-level advisory
    lock a dedicated connection holds for as long as the process runs. Another sender can
    tell a live owner (the lock is taken) from a dead one (PostgreSQL freed it)."""

    def __init__(self, dsn: str, schema: str, *, connect_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout = connect_timeout  # DB_CONNECT_TIMEOUT_SECONDS
        self.key = int.from_bytes(uuid.uuid4().bytes[:8], "big", signed=True)
        self.held = asyncio.Event()

    async def hold(self) -> None:
        """Take the lock and keep it. If its connection is lost (the database restarted or
        failed over) the lock is gone with it: new batches wait (``held`` is cleared) and
        this raises a transient error, after which the runtime calls ``hold`` again to take
        the same key back once the database answers. Rows this process left unfinished in
        the meantime are adopted by another sender only if their requests are redelivered
        to it (a rebalance) while the key is free."""
        conn = await connect(self.dsn, self.schema, connect_timeout=self.connect_timeout)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", self.key)
            self.held.set()
            while True:
                await asyncio.sleep(1.0)
                await conn.fetchval("SELECT 1")
        finally:
            self.held.clear()
            await close_or_drop(conn)

    async def wait_held(self, keepalive: float) -> None:
        """Until the lock is held. While it is not (its connection lost with the database,
        not taken back yet) a batch waits here and tells its consumer every ``keepalive``
        seconds that it still works: an outage is no reason for /healthz to have the
        sender restarted."""
        while not self.held.is_set():
            still_working()
            await woken(self.held, keepalive)

    async def alive(self, conn: asyncpg.Connection, owners: set[int]) -> set[int]:
        """The owners among ``owners`` whose process still runs (holds its lock)."""
        living = set()
        for key in owners:
            if key == self.key:
                living.add(key)  # ours, and not in flight: the rows of an abandoned delivery
                continue
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
            else:
                living.add(key)
        return living


async def record(conn: asyncpg.Connection | ReplannedConnection, done: Sequence[Done]) -> None:
    """Record outcomes (key, kind, outcome, result) in one statement (queries.sql
    "finish"); in the caller's transaction when ``conn`` is in one."""
    keys = [d[0] for d in done]
    await conn.execute(
        QUERIES["finish"],
        *columns(keys),
        [d[2].outcome for d in done],
        [d[2].relay for d in done],
        [d[2].message_id for d in done],
        [None if d[3] is None else json.dumps(d[3]) for d in done],
    )


async def finish(conn: asyncpg.Connection, done: Sequence[Done]) -> list[dict[str, Any]]:
    """Record outcomes decided without SMTP (suppressed) in the caller's transaction;
    returns the campaign rows' results, for :func:`publish` once it committed."""
    if not done:
        return []
    await record(conn, done)
    for _, kind, outcome, _ in done:
        SENDER_SENDS.labels(kind, outcome.outcome, outcome.relay or "").inc()
    return [d[3] for d in done if d[3] is not None]


#: on stop, how long the outcomes still to record (and their results' publication) may
#: take: a stop while PostgreSQL is away must end within the pod's grace period (30 s, which
#: also covers the relays' STOP_GRACE_SECONDS and the pool's close).
STOP_SECONDS = 5.0

#: group commits running at once. One: what finishes while a cycle commits waits for the
#: next, so cycles are big and PostgreSQL's cost per message small. The campaign benchmark
#: measured 1,088 msgs/s with one, 844 with two and ~750 with three (32 connections).
MAX_CYCLES_IN_FLIGHT = 1


class Ledger:
    """The group committer: records outcomes in batched cycles, one transaction each.

    Workers call :meth:`finish` with an outcome; the delivery's ``done`` resolves once it
    is committed, and its result goes to ``delivery.results`` after that commit.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        service: str,
        cycles: ReplannedConnection,
        publisher: Publisher,
    ) -> None:
        self.pool = pool
        self.service = service
        #: where cycles run: planned at each execution (replan.py says why).
        self.cycles = cycles
        self._finished: list[tuple[Delivery, Outcome]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cycles: set[asyncio.Future[None]] = set()
        #: delivery.results of committed cycles go out through it (results.py).
        self.results = ResultsOut(publisher)
        #: told of a held delivery's recorded outcome and its result's publication (None:
        #: no result), so its held row goes once that is acknowledged (holding.py).
        self.held_recorded: Callable[[Delivery, asyncio.Future[None] | None], None] = (
            lambda d, published: None
        )

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        self._task.set_name("sender:ledger")

    async def stop(self) -> None:
        """After the relay workers stopped: let the cycle in progress finish, then record
        the outcomes still pending (not published: their batch is not committed, and its
        next consumer republishes them from the ledger).

        All of it within STOP_SECONDS: while PostgreSQL (or the broker) is away the stop
        gives up instead of retrying for ever, so the process exits within the pod's grace
        period. What was not recorded stays ``claimed`` and is sent again after the restart,
        with the same Message-ID, as after a crash: at most two messages per connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        finished, self._finished = self._finished, []
        try:
            async with asyncio.timeout(STOP_SECONDS):
                await asyncio.gather(*self._cycles, return_exceptions=True)
                await self.results.stop()
                if finished:
                    await self._commit(finished, announce=False)
        except TimeoutError:
            # The cycles were cancelled with the wait: their rows stay claimed.
            await asyncio.gather(*self._cycles, return_exceptions=True)
            log.warning("ledger_outcomes_not_recorded_at_stop", seconds=STOP_SECONDS)
        await self.cycles.close()

    async def flush(self) -> None:
        """Make every cycle committed so far durable (cycles commit asynchronously; see
        queries.sql "finish"): called before a batch's offsets are committed."""

        async def transaction() -> None:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.fetchval(QUERIES["flush"])

        await retry(
            transaction,
            name="sender:flush",
            service=self.service,
            strategy=FOREVER,
            waiting=still_working,  # the batch waits for the database: its consumer is alive
        )

    def finish(self, delivery: Delivery, outcome: Outcome) -> None:
        self._finished.append((delivery, outcome))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._cycles) >= MAX_CYCLES_IN_FLIGHT:
                await asyncio.wait(self._cycles, return_when=asyncio.FIRST_COMPLETED)
            if not self._finished:
                continue
            finished, self._finished = self._finished, []
            cycle = asyncio.ensure_future(self._commit(finished))
            self._cycles.add(cycle)
            cycle.add_done_callback(self._cycles.discard)

    async def _commit(
        self, finished: list[tuple[Delivery, Outcome]], *, announce: bool = True
    ) -> None:
        now = datetime.now(UTC)
        done = [ledger_row(d.key, d.kind, d.email, o, now) for d, o in finished]

        async def transaction() -> None:
            await record(self.cycles, done)

        try:
            await retry(transaction, name="sender:ledger", service=self.service, strategy=FOREVER)
        except BaseException as exc:
            for d, _ in finished:
                fail(d.done, exc)
            raise
        SENDER_GROUP_COMMIT_SIZE.observe(len(finished))
        results = [r for _, _, _, r in done if r is not None]
        if announce and results:
            traces = [
                d.trace for (d, _), row in zip(finished, done, strict=True) if row[3] is not None
            ]
            sent = self.results.announce(results, traces)
            for d, _ in finished:
                d.published = sent
        for (d, o), row in zip(finished, done, strict=True):
            SENDER_SENDS.labels(d.kind, o.outcome, o.relay or "").inc()
            # A held delivery's ``done`` is its outcome's alone (its handler stopped waiting
            # when it was held); one abandoned meanwhile is done already: nothing to set.
            if not d.done.done():
                d.done.set_result(None)
            if d.hold == HELD and announce:
                self.held_recorded(d, d.published if row[3] is not None else None)


def fail(future: asyncio.Future[None], exc: BaseException) -> None:
    """A delivery's ``done`` raises ``exc`` in its handler (cancelled for a cancel); the row
    stays as it is, so a restart sends it again."""
    if not future.done():
        if isinstance(exc, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(exc)
