"""SMTP relays: pools of persistent connections, rate limits, failover, per-message replies.

Each relay (``SMTP_RELAYS``, in failover order) gets ``SMTP_CONNECTIONS`` workers; a worker
owns one persistent connection and takes deliveries from one queue shared by every relay.
A relay that cannot be reached (connect error, 421, connection lost) is backed off (its
workers wait, doubling up to 30 s) and its delivery goes back to the queue, where the
workers of the other relays take it: that is the failover. When every relay is down the
deliveries wait in the queue and go out when one comes back; the consumer commits nothing
meanwhile, so nothing is lost, and the ledger makes sure nothing goes twice.

aiosmtplib opens each connection (connect, EHLO, STARTTLS, AUTH); the transactions on it
go through :mod:`services.sender.exchange`, a reply reader of our own: MAIL, RCPT and DATA
(pipelined when the relay offers PIPELINING), then the dot-stuffed content with its final
``CRLF.CRLF`` — with PIPELINING in one write with the next delivery's MAIL, RCPT and DATA,
so a message costs one round trip — then its reply. A connection has at most
:data:`UNRECORDED_PER_CONNECTION` messages whose end of data is out and whose outcome the
:class:`~services.sender.ledger.Ledger` has not committed yet: what a crash can send twice
(ledger.py); a stop lets the replies it waits for arrive first. Replies are classified by
:mod:`libs.common.mail.smtp_reply`: 4xx → tried again after a backoff, a bounded number of times;
5xx → permanent or policy error; 421 → a relay problem, not a message outcome — but a 421
in answer to RCPT TO (its MAIL accepted) is the recipient domain's rate limit: the domain
is slowed or paused, not the relay. Each 4xx that is tried again (that 421 included) is
also handed to :mod:`services.sender.deferrals` for ``delivery.deferrals``, without
waiting; the last one, whose retries are spent, is the message's result instead.

Before a worker sends a delivery, its recipient domain admits it (:mod:`services.sender.pacing`:
token bucket, in-flight cap, pause, warm-up cap); one that must wait is parked with its
domain while the worker takes the next, so a throttled domain never holds up the others.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiosmtplib import SMTP, SMTPException, SMTPHeloError
from aiosmtplib.protocol import normalize_message_line_endings

from libs.common.errors import InvalidMessage
from libs.common.logging import get_logger, mask_email
from libs.common.mail.smtp_reply import Reply, classify, outcome_of
from libs.common.metrics import (
    SENDER_AHEAD,
    SENDER_CONNECTIONS,
    SENDER_RELAY_ERRORS,
    SENDER_RETRIES,
    SENDER_SMTP_SECONDS,
)
from services.sender import domains, processor
from services.sender.exchange import Exchange, take_over
from services.sender.ledger import Delivery, Ledger, fail
from services.sender.models import Outcome
from services.sender.pacing import DomainPacing
from services.sender.settings import SenderSettings

log = get_logger(__name__)

TERMINATOR = b"\r\n.\r\n"
_LEADING_DOT = re.compile(rb"(?m)^\.")
_DOT_AFTER_LF = re.compile(rb"\n\.")
_MAX_RELAY_BACKOFF = 30.0
#: messages per connection whose end of data went out while their outcome is not recorded
#: yet: what a crash may have the relay receive twice (ledger.py). With one, each message
#: waited for a ledger commit between its DATA reply and its end of data; with two, the
#: commit of one overlaps the next one's exchange.
UNRECORDED_PER_CONNECTION = 2
#: on stop, how long a connection whose end of data is out may wait for its reply.
STOP_GRACE_SECONDS = 5.0
#: errors that mean the connection (not the message) failed.
CONNECTION_ERRORS = (OSError, SMTPException, TimeoutError)


def data_payload(content: bytes, *, crlf: bool = False) -> bytes:
    """``content`` as sent after DATA: CRLF line ends, lines starting with ``.`` doubled
    (RFC 5321 §4.5.2), **without** the final CRLF — the terminator ``CRLF.CRLF`` is written
    separately (:data:`TERMINATOR`), after the ledger commit. ``crlf``: the content is known
    to end its lines in CRLF only (what compose.py makes), so that check is skipped."""
    if not crlf:
        pairs = content.count(b"\r\n")
        if content.count(b"\n") != pairs or content.count(b"\r") != pairs:  # bare CR or LF
            content = normalize_message_line_endings(content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    # Looking for a line that starts with a dot: on a 10 KB message (148 lines) the regular
    # expression search costs ~5 µs, ``b"\n." in content`` ~13 µs (its two-byte search
    # stops at every LF), the substitution ~40 µs; so substitute only when one is found.
    if content.startswith(b".") or _DOT_AFTER_LF.search(content):
        content = _LEADING_DOT.sub(b"..", content)
    return content[:-2]


def smtp_path(address: str) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO (what aiosmtplib's quote_address makes, without
    its ~45 µs address parser); InvalidMessage for what no relay would take."""
    address = address.strip()
    if not address or "@" not in address or _NOT_IN_PATH.search(address):
        raise InvalidMessage(f"not a deliverable address: {address!r}", field="email")
    return b"<" + address.encode("utf-8") + b">"


_NOT_IN_PATH = re.compile(r"[<>\s\x00-\x1f\x7f]")


def _commands(reverse_path: bytes, forward_path: bytes) -> bytes:
    """MAIL, RCPT and DATA, pipelined."""
    return b"MAIL FROM:" + reverse_path + b"\r\nRCPT TO:" + forward_path + b"\r\nDATA\r\n"


class RateLimit:
    """At most ``rate`` messages per second (0 = unlimited), spaced evenly."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    def take_now(self) -> bool:
        """Take the next slot if it is due now, without waiting."""
        if not self.interval:
            return True
        now = time.monotonic()
        if self._next > now:
            return False
        self._next = now + self.interval
        return True

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        at = max(now, self._next)
        self._next = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


class Relay:
    """One relay: its address, rate limit and backoff state."""

    def __init__(self, host: str, port: int, settings: SenderSettings) -> None:
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.limit = RateLimit(settings.smtp_rate_limit)
        self.smtp_seconds = SENDER_SMTP_SECONDS.labels(self.name)
        self.ahead = SENDER_AHEAD.labels(self.name)
        self.base_backoff = settings.smtp_relay_backoff
        self.down_until = 0.0
        self.open_connections = 0
        self._failures = 0

    def failed(self, kind: str) -> None:
        SENDER_RELAY_ERRORS.labels(self.name, kind).inc()
        now = time.monotonic()
        if now < self.down_until:  # another worker already backed it off
            return
        self._failures += 1
        delay = min(_MAX_RELAY_BACKOFF, self.base_backoff * 2 ** (self._failures - 1))
        self.down_until = now + delay * random.uniform(0.8, 1.2)
        log.warning("smtp_relay_down", relay=self.name, kind=kind, retry_in=round(delay, 3))

    def recovered(self) -> None:
        if self._failures:
            log.info("smtp_relay_up", relay=self.name)
        self._failures = 0
        self.down_until = 0.0


class RelayPool:
    """Every relay's workers and the queue of deliveries they share."""

    def __init__(
        self,
        settings: SenderSettings,
        ledger: Ledger,
        *,
        still_wanted: Callable[[Delivery], bool] = lambda d: True,
        hold: Callable[[Delivery], None] | None = None,
        abandoned: Callable[[Delivery], None] = lambda d: None,
        deferrals: Callable[[dict[str, Any]], None] = lambda record: None,
    ) -> None:
        self.settings = settings
        #: takes each 4xx answer retried here, as a DeliveryDeferral (deferrals.py).
        self.deferrals = deferrals
        self.ledger = ledger
        self.still_wanted = still_wanted
        #: told of a delivery abandoned because its campaign stopped (holding.py).
        self.abandoned = abandoned
        self.relays = [Relay(host, port, settings) for host, port in settings.relays()]
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._workers: dict[asyncio.Task[None], _Worker] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._helo = settings.smtp_helo_name or socket.gethostname() or "localhost"
        #: per-recipient-domain admission (pacing.py).
        self.pacing = DomainPacing(settings, requeue=self.submit, give_up=self._give_up, hold=hold)
        #: stopping: workers take no more deliveries.
        self.closing = False

    def start(self) -> None:
        for relay in self.relays:
            for n in range(max(1, self.settings.smtp_connections)):
                worker = _Worker(self, relay)
                task = asyncio.ensure_future(worker.run())
                task.set_name(f"smtp:{relay.name}:{n}")
                self._workers[task] = worker

    async def stop(self) -> None:
        """Take no more deliveries. A connection whose end of data is out reads its reply
        first (for at most STOP_GRACE_SECONDS), so that the message is not sent again after
        the restart (ledger.py); every other one stops at once, before its end of data."""
        self.closing = True
        self.pacing.stop()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        tasks = set(self._workers)
        if not tasks:  # stopped already
            return
        for task, worker in self._workers.items():
            if not worker.ended:
                task.cancel()
        _, late = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
        for task in late:
            log.warning("smtp_reply_not_awaited_at_stop", relay=self._workers[task].relay.name)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()

    def submit(self, delivery: Delivery) -> None:
        self.queue.put_nowait(delivery)

    def _give_up(self, delivery: Delivery, why: str) -> None:
        """Its domain would keep it waiting too long: recorded as not sent (temporary), as
        a 4xx whose retries are spent, so its batch ends; a resend tries it again."""
        self.ledger.finish(delivery, Outcome("temporary_error", diagnostic=f"not sent: {why}"))

    def deferral(self, d: Delivery, reply: Reply, relay: str) -> None:
        """``d`` met a 4xx from ``relay`` and will be tried again: the answer goes on
        ``delivery.deferrals`` (in the background; a 4xx whose retries are spent is its
        result instead, never both)."""
        domain = d.domain or domains.domain_of(d.email)
        self.deferrals(
            processor.deferral(
                d.key,
                domain,
                reply.code,
                reply.enhanced_code,
                reply.diagnostic,
                relay,
                datetime.now(UTC),
            )
        )

    def later(self, delay: float, delivery: Delivery) -> None:
        """Put ``delivery`` back on the queue after ``delay`` seconds (4xx backoff)."""
        if self.closing:
            return  # still claimed: sent after the restart
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def due() -> None:
            self._timers.discard(timer)
            self.queue.put_nowait(delivery)

        timer = loop.call_later(delay, due)
        self._timers.add(timer)

    def new_client(self, relay: Relay) -> SMTP:
        s = self.settings
        start_tls = {"off": False, "required": True}.get(s.smtp_starttls)  # else: if offered
        return SMTP(
            hostname=relay.host,
            port=relay.port,
            username=s.smtp_username or None,
            password=s.smtp_password or None,
            local_hostname=self._helo,
            timeout=s.smtp_timeout,
            start_tls=start_tls,
            validate_certs=s.smtp_tls_verify,
        )


class _RelayProblem(Exception):
    """The connection or the relay failed; the delivery goes back to the queue."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _DomainDeferral(_RelayProblem):
    """421 in answer to RCPT TO: the recipient's domain (through the relay) limits our rate;
    the connection closes, the relay is not to blame, the delivery waits for its domain."""

    def __init__(self, reply: Reply) -> None:
        super().__init__("domain_421")
        self.reply = reply


class _Worker:
    """One persistent connection to one relay."""

    def __init__(self, pool: RelayPool, relay: Relay) -> None:
        self.pool = pool
        self.relay = relay
        self.client: SMTP | None = None
        self.exchange: Exchange | None = None
        self.pipelining = False  # what the relay's EHLO offered
        self.timeout = pool.settings.smtp_timeout
        self.data_timeout = pool.settings.smtp_data_timeout
        #: the next delivery, whose MAIL, RCPT and DATA went out behind the last message's
        #: end of data (RFC 2920 §3.1), and when.
        self.ahead: Delivery | None = None
        self.ahead_started = 0.0
        #: outcomes of messages whose end of data went out on this connection, until the
        #: ledger has committed them (their ``done``), oldest first.
        self.recording: deque[asyncio.Future[None]] = deque()
        #: an end of data is out and its reply not read yet.
        self.ended = False

    async def run(self) -> None:
        try:
            while not self.pool.closing:  # stopping: the one ahead stays claimed, sent later
                delivery, self.ahead = self.ahead, None
                written = delivery is not None
                if delivery is None:
                    wait = self.relay.down_until - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    delivery = await self.pool.queue.get()
                    if not self._wanted(delivery) or not self.pool.pacing.admit(delivery):
                        continue
                try:
                    await self._deliver(delivery, written=written)
                except _DomainDeferral as deferral:
                    self._close()
                    self._domain_deferred(delivery, deferral.reply)
                    self._put_back_ahead()
                except _RelayProblem as problem:
                    self._close()
                    if problem.kind != "stale":
                        self.relay.failed(problem.kind)
                    self.pool.submit(delivery)
                    self._put_back_ahead()
                except Exception as exc:  # a bug: its batch's handler fails with it, loudly
                    log.error("smtp_delivery_failed", relay=self.relay.name, exc_info=exc)
                    self._close()
                    fail(delivery.done, exc)  # the service stops, failed; rows stay claimed
                    self._put_back_ahead()
                finally:
                    self.pool.pacing.release(delivery)
        finally:
            self._close()

    def _domain_deferred(self, d: Delivery, reply: Reply) -> None:
        """The domain answered 421 to RCPT: it slows down (or pauses) and ``d`` goes back
        to wait for it, within its domain's wait bound (pacing.py), not counted as one of
        its 4xx retries."""
        SENDER_RETRIES.labels(self.relay.name).inc()
        log.info(
            "smtp_domain_deferred",
            campaign_id=d.campaign_id,
            contact_id=d.key.contact_id,
            reply=reply.diagnostic,
        )
        self.pool.pacing.release(d)
        self.pool.pacing.deferred(d, reply.code, reply.enhanced_code)
        self.pool.deferral(d, reply, self.relay.name)
        if d.waiting_since is None:
            d.waiting_since = time.monotonic()
        self.pool.submit(d)

    def _put_back_ahead(self) -> None:
        """The delivery whose commands went on a connection now closed goes back to the
        queue."""
        if self.ahead is not None:
            self.pool.pacing.release(self.ahead)
            self.pool.submit(self.ahead)
            self.ahead = None

    def _wanted(self, delivery: Delivery) -> bool:
        """False for a delivery abandoned while it queued: its handler was cancelled, or its
        campaign stopped (then it is done, with no outcome)."""
        if delivery.done.done():
            return False
        if not self.pool.still_wanted(delivery):
            log.info("delivery_abandoned", campaign_id=delivery.campaign_id)
            delivery.done.set_result(None)
            self.pool.abandoned(delivery)
            return False
        return True

    async def _connect(self) -> Exchange:
        if self.client is not None and self.client.is_connected and self.exchange is not None:
            return self.exchange
        self._close()
        client = self.pool.new_client(self.relay)
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:  # connect() greets only to look for STARTTLS
                try:
                    await client.ehlo()
                except SMTPHeloError:
                    await client.helo()
            exchange = take_over(client)
        except CONNECTION_ERRORS as exc:
            client.close()
            log.warning("smtp_connect_failed", relay=self.relay.name, error=repr(exc))
            raise _RelayProblem("connect") from None
        except BaseException:  # cancelled (a stop) mid-greeting: no socket left open behind
            client.close()
            raise
        self.client = client
        self.exchange = exchange
        self.pipelining = client.supports_extension("pipelining")
        self.relay.open_connections += 1
        SENDER_CONNECTIONS.labels(self.relay.name).inc()
        self.relay.recovered()
        return exchange

    def _close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self.exchange = None
            self.relay.open_connections -= 1
            SENDER_CONNECTIONS.labels(self.relay.name).dec()

    async def _command(self, exchange: Exchange, command: bytes, *, rcpt: bool = False) -> Reply:
        try:
            exchange.write(command)
            ((code, text),) = await exchange.replies(1, self.timeout)
        except CONNECTION_ERRORS:
            raise _RelayProblem("connection_lost") from None
        reply = classify(code, text)
        if reply.verdict == "relay_problem":
            if rcpt and self._domain_421_reply(reply):
                raise _DomainDeferral(reply)
            raise _RelayProblem(f"reply_{reply.code}")
        return reply

    def _composed(self, d: Delivery) -> bool:
        """Make the delivery's content and paths once; False (its outcome recorded) when
        no mail can be made of it, e.g. a recipient address no relay would take."""
        if d.composed is not None:
            return True
        try:
            content, message_id, mail_from = d.compose()
            # compose.py writes CRLF line ends only (CampaignMessage, EmailMessage with the
            # SMTP policy, DKIM with linesep CRLF).
            d.composed = (data_payload(content, crlf=True), message_id, mail_from)
            d.paths = (smtp_path(mail_from), smtp_path(d.email))
        except InvalidMessage as exc:
            self._finish(d, Outcome("permanent_error", diagnostic=f"not sent: {exc.reason}"))
            return False
        except Exception as exc:  # a bug: its batch's handler fails with it, loudly
            log.error("mail_not_composed", campaign_id=d.campaign_id, exc_info=exc)
            fail(d.done, exc)
            return False
        return True

    async def _deliver(self, d: Delivery, *, written: bool = False) -> None:
        """One transaction: MAIL, RCPT and DATA (``written``: they went out already, behind
        the last message's end of data), then the content and end of data, then its
        reply; the outcome goes to the ledger."""
        if written and self.exchange is not None:
            exchange, started = self.exchange, self.ahead_started
            replies = await self._pipelined_replies(exchange, reused=True)
            if not self._wanted(d):  # its campaign stopped while its commands were out
                if all(r.verdict == "ok" for r in replies):
                    self._close()  # DATA is open: ending it, even empty, would deliver a mail
                else:
                    await self._reset(exchange)
                return
        else:
            if not self._composed(d):
                return
            reused = self.client is not None and self.client.is_connected
            exchange = await self._connect()
            await self.relay.limit.wait()
            d.relay = self.relay.name
            started = time.perf_counter()
            if exchange.discard_unasked():
                log.warning("smtp_reply_out_of_turn", relay=self.relay.name)
            if self.pipelining:
                replies = await self._pipelined(exchange, *d.paths, reused)
            else:
                replies = await self._one_by_one(exchange, *d.paths, reused)
        assert d.composed is not None
        payload, message_id, _ = d.composed
        refused = next((reply for reply in replies if reply.verdict != "ok"), None)
        if refused is not None:
            await self._reset(exchange)
            self._refused(d, refused, message_id)
            return
        # The content and its end of data go with the next delivery's MAIL, RCPT and DATA
        # in one write: one round trip a message, not two. Once the end of data is out,
        # only the relay knows whether it kept the message until its outcome is recorded
        # (ledger.py); at most UNRECORDED_PER_CONNECTION such messages per connection.
        await self._recorded(UNRECORDED_PER_CONNECTION - 1)
        try:
            exchange.write(payload + TERMINATOR + self._look_ahead())
        except CONNECTION_ERRORS:
            raise _RelayProblem("connection_lost") from None
        self.ahead_started = time.perf_counter()
        if self.ahead is not None:
            self.relay.ahead.inc()
        self.ended = True
        try:
            ((code, text),) = await exchange.replies(1, self.data_timeout)
        except CONNECTION_ERRORS as exc:
            # The relay got the whole message; whether it kept it is unknown. Send it again,
            # with the same Message-ID (RFC 5321 §4.1.1.4; ledger.py): nothing lost.
            log.warning("smtp_lost_after_end", relay=self.relay.name, error=repr(exc))
            raise _RelayProblem("lost_after_end") from None
        finally:
            self.ended = False
        self.relay.smtp_seconds.observe(time.perf_counter() - started)
        reply = classify(code, text)
        if reply.verdict == "relay_problem":  # 421 after the end of data: not accepted
            raise _RelayProblem(f"reply_{reply.code}")
        if reply.verdict == "ok":
            self.pool.pacing.delivered(d)
            self._finish(d, self._outcome(reply, message_id))
        else:
            self._refused(d, reply, message_id)
        if reply.verdict != "retry":
            self.recording.append(d.done)

    async def _recorded(self, allowed: int) -> None:
        """Wait until at most ``allowed`` messages this connection ended are still waiting
        for the ledger to record their outcome."""
        recording = self.recording
        while recording:
            if recording[0].done():
                recording.popleft()
            elif len(recording) > allowed:
                await asyncio.wait({recording[0]})  # its failure is its handler's to report
            else:
                return

    async def _one_by_one(
        self, exchange: Exchange, reverse_path: bytes, forward_path: bytes, reused: bool
    ) -> list[Reply]:
        """MAIL, RCPT, DATA one round trip each, stopping at the first refusal."""
        replies: list[Reply] = []
        for rcpt, command in (
            (False, b"MAIL FROM:" + reverse_path + b"\r\n"),
            (True, b"RCPT TO:" + forward_path + b"\r\n"),
        ):
            try:
                replies.append(await self._command(exchange, command, rcpt=rcpt))
            except _RelayProblem as problem:
                if not replies and reused and problem.kind == "connection_lost":
                    raise _RelayProblem("stale") from None  # the relay closed an idle one
                raise
            if replies[-1].verdict != "ok":
                return replies
        replies.append(await self._command(exchange, b"DATA\r\n"))
        return replies

    async def _pipelined(
        self, exchange: Exchange, reverse_path: bytes, forward_path: bytes, reused: bool
    ) -> list[Reply]:
        """MAIL, RCPT and DATA in one write (RFC 2920 PIPELINING), then their three replies."""
        try:
            exchange.write(_commands(reverse_path, forward_path))
        except CONNECTION_ERRORS:
            raise _RelayProblem("stale" if reused else "connection_lost") from None
        return await self._pipelined_replies(exchange, reused)

    async def _pipelined_replies(self, exchange: Exchange, reused: bool) -> list[Reply]:
        """The replies to a pipelined MAIL, RCPT and DATA. A DATA accepted after a refused
        MAIL or RCPT gets an empty message's terminator (the relay has no recipient for it)
        so the connection stays usable."""
        replies: list[Reply] = []
        try:
            replies = [
                classify(code, text) for code, text in await exchange.replies(3, self.timeout)
            ]
            if replies[2].verdict == "ok" and any(r.verdict != "ok" for r in replies[:2]):
                exchange.write(b".\r\n")
                await exchange.replies(1, self.timeout)
        except CONNECTION_ERRORS:
            early = [classify(code, text) for code, text in exchange.received()[:2]]
            if self._domain_421(early):
                raise _DomainDeferral(early[1]) from None  # 421 to RCPT, then it closed
            kind = "stale" if not replies and reused else "connection_lost"
            raise _RelayProblem(kind) from None
        problem = next((r for r in replies if r.verdict == "relay_problem"), None)
        if problem is not None:
            if self._domain_421(replies):
                raise _DomainDeferral(replies[1])
            raise _RelayProblem(f"reply_{problem.code}")
        return replies

    def _domain_421(self, replies: list[Reply]) -> bool:
        """MAIL accepted, then a domain's 421 to RCPT (:meth:`_domain_421_reply`)."""
        return (
            len(replies) >= 2 and replies[0].verdict == "ok" and self._domain_421_reply(replies[1])
        )

    def _domain_421_reply(self, reply: Reply) -> bool:
        """A 421 to RCPT is the recipient domain's rate limit unless its enhanced code says
        the relay's own system is the matter (4.3.x: shutting down, resources). With pacing
        off, every 421 is a relay problem, as before."""
        return (
            self.pool.pacing.enabled
            and reply.code == 421
            and not (reply.enhanced_code or "").startswith("4.3.")
        )

    def _look_ahead(self) -> bytes:
        """With PIPELINING, take the next queued delivery now (when the relay's rate
        allows) and return its MAIL, RCPT and DATA, to go out behind this message's end of
        data (RFC 2920 §3.1: content may open a group). Its replies come after this
        message's; if the connection fails first, it goes back to the queue (run)."""
        queue = self.pool.queue
        while (
            self.pipelining
            and not self.pool.closing
            and not queue.empty()
            and self.relay.limit.take_now()
        ):
            d = queue.get_nowait()
            if self._wanted(d) and self._composed(d) and self.pool.pacing.admit(d):
                d.relay = self.relay.name
                self.ahead = d
                return _commands(*d.paths)
        return b""

    async def _reset(self, exchange: Exchange) -> None:
        """RSET after a refused MAIL/RCPT/DATA, so the connection can be reused."""
        try:
            exchange.write(b"RSET\r\n")
            ((code, _),) = await exchange.replies(1, self.timeout)
        except CONNECTION_ERRORS:
            self._close()
            return
        if code != 250:
            self._close()

    def _outcome(self, reply: Reply, message_id: str) -> Outcome:
        return Outcome(
            outcome_of(reply),
            smtp_code=reply.code,
            enhanced_code=reply.enhanced_code,
            diagnostic=reply.diagnostic,
            relay=self.relay.name,
            message_id=message_id,
        )

    def _refused(self, d: Delivery, reply: Reply, message_id: str) -> None:
        if reply.verdict == "retry":
            self.pool.pacing.deferred(d, reply.code, reply.enhanced_code)
            d.temp_failures += 1
            if d.temp_failures <= self.pool.settings.smtp_temp_retries:
                SENDER_RETRIES.labels(self.relay.name).inc()
                delay = self.pool.settings.smtp_retry_backoff * 2 ** (d.temp_failures - 1)
                log.info(
                    "smtp_retry_later",
                    campaign_id=d.campaign_id,
                    contact_id=d.key.contact_id,
                    reply=reply.diagnostic,
                    delay=delay,
                )
                self.pool.deferral(d, reply, self.relay.name)
                self.pool.later(delay * random.uniform(0.8, 1.2), d)
                return
            reply = classify(reply.code, reply.text, final=True)
        log.info(
            "smtp_refused",
            campaign_id=d.campaign_id,
            contact_id=d.key.contact_id,
            email=mask_email(d.email),
            reply=reply.diagnostic,
        )
        self._finish(d, self._outcome(reply, message_id))

    def _finish(self, d: Delivery, outcome: Outcome) -> None:
        outcome.relay = outcome.relay or self.relay.name
        self.pool.ledger.finish(d, outcome)
