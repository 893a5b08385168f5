"""The SMTP transaction exchange of one pooled connection, without aiosmtplib's per-command
machinery.

aiosmtplib opens the connection (connect, EHLO, STARTTLS, AUTH); then :func:`take_over`
puts a :class:`Exchange` in front of its protocol, and MAIL, RCPT, DATA, the content, the
end of data and RSET go through it. Why a protocol of our own:

* **Cost.** aiosmtplib reads one reply per ``read_response``: a new future and an
  ``asyncio.wait_for`` per reply, its parser copying each line, a waiter recreated after
  each. A message costs four replies (three when pipelined, one at end of data). Here a
  reply is parsed once when its bytes arrive and a transaction waits once per round trip
  (``replies(3)`` for pipelined MAIL/RCPT/DATA) with one timer.
* **Pipelining.** aiosmtplib's ``data_received`` drops bytes that arrive while a parsed
  reply waits to be picked up; pipelined replies arriving in separate segments were lost
  that way and the connection stalled until SMTP_TIMEOUT. Here every byte goes to one
  buffer and every reply is kept, in order, until it is asked for.

Replies are parsed as aiosmtplib does (``code`` from the first three characters of each
line, continuation lines ``NNN-``, the text of each line stripped and joined with LF), so
:mod:`libs.common.mail.smtp_reply` classifies the same strings. The connection's end is still
aiosmtplib's business: ``connection_lost`` and ``eof_received`` reach its protocol too, so
``SMTP.is_connected`` and ``SMTP.close`` keep working.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

from aiosmtplib import SMTP, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol

#: a reply longer than this without its last line is not SMTP (aiosmtplib's limit too).
MAX_REPLY_BYTES = 1 << 20


class Exchange(asyncio.Protocol):
    """Writes commands and content; keeps every reply until :meth:`replies` asks for it."""

    def __init__(self, inner: SMTPProtocol, transport: asyncio.Transport) -> None:
        self.inner = inner
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._failure: Exception | None = None

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data``; SMTPServerDisconnected when the connection is gone (so a caller
        never believes a terminator went out that did not)."""
        if self._failure is not None or self.transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    def discard_unasked(self) -> int:
        """Drop replies nobody asked for (a relay talking out of turn) before a new
        transaction, so they are never paired with its commands; how many were dropped."""
        dropped = len(self._replies)
        self._replies.clear()
        return dropped

    # -- reading ---------------------------------------------------------------------

    async def replies(self, count: int, timeout: float) -> list[tuple[int, str]]:
        """The next ``count`` replies as (code, text), waiting at most ``timeout`` seconds
        for them all. SMTPServerDisconnected / SMTPResponseException when the connection
        ended or spoke no SMTP, TimeoutError when the replies did not come."""
        if len(self._replies) < count:
            if self._failure is not None:
                raise self._failure
            waiter = self._loop.create_future()
            self._waiter, self._wanted = waiter, count
            timer = self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return [self._replies.popleft() for _ in range(count)]

    def received(self) -> list[tuple[int, str]]:
        """The replies read and not yet taken (what came before the connection ended)."""
        return list(self._replies)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            # A reply is complete at a line whose fourth character is not '-'.
            if buffer[start + 3 : start + 4] == b"-":
                start = end + 1
                continue
            self._parse(bytes(buffer[: end + 1]))
            del buffer[: end + 1]
            start = 0
            if self._failure is not None:
                return
        if len(buffer) > MAX_REPLY_BYTES:
            self._fail(SMTPResponseException(-1, "Response too long"))
            return
        waiter = self._waiter
        if waiter is not None and len(self._replies) >= self._wanted and not waiter.done():
            waiter.set_result(None)

    def _parse(self, reply: bytes) -> None:
        code = -1
        lines = []
        for line in reply.split(b"\n")[:-1]:
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                self._fail(SMTPResponseException(-1, f"Malformed SMTP response line: {text}"))
                return
            lines.append(line[4:].strip(b" \t\r\n"))
        self._replies.append((code, b"\n".join(lines).decode("utf-8", "surrogateescape")))

    def _fail(self, exc: Exception) -> None:
        if self._failure is None:
            self._failure = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if not self.transport.is_closing():
            self.transport.close()

    # -- the connection's end: ours and aiosmtplib's ----------------------------------

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            SMTPServerDisconnected(f"Connection lost: {exc!r}" if exc else "Connection lost")
        )
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("Timed out waiting for server response"))


def take_over(client: SMTP) -> Exchange:
    """Put an :class:`Exchange` in front of a connected client's protocol (after STARTTLS,
    which replaces the transport); SMTPServerDisconnected if it is not connected."""
    protocol = client.protocol
    transport = None if protocol is None else protocol.transport
    if protocol is None or transport is None or transport.is_closing():
        raise SMTPServerDisconnected("Connection lost")
    # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
    exchange = Exchange(protocol, cast(asyncio.Transport, transport))
    transport.set_protocol(exchange)
    return exchange
