"""A relay for the per-domain benchmark (bench/domains.py): it accepts every message, but
answers ``421 4.7.0`` to a RCPT for one chosen domain beyond its rate (a token bucket), and
closes the connection, as a receiver that limits a sender does. It records, per recipient
domain, the time of every message it accepted and of every RCPT it deferred.

Postfix's ``smtp-sink`` cannot refuse by domain and rate, hence this small server: an
asyncio protocol on uvloop doing as little per message as it can (a line parser, a search
for the end of data, one list append per recipient). It speaks what the sender uses:
EHLO with PIPELINING, MAIL, RCPT, DATA, RSET, NOOP, QUIT. Its own ceiling is measured in
the same run (raw aiosmtplib to it, as bench/campaign.py does for smtp-sink).

    python -m bench.relay PORT OUT [--limited DOMAIN --rate 50 --burst 5]

On SIGTERM it writes what it recorded to OUT (JSON: ``accepted`` and ``deferred``, each
``{domain: [epoch seconds, ...]}``) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path

import uvloop

TERMINATOR = b"\r\n.\r\n"
EHLO_REPLY = (
    b"250-bench-relay\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250 SIZE 52428800\r\n"
)


class Bucket:
    """``rate`` tokens a second, at most ``burst`` kept (starts full): a RCPT takes one.
    In any one second it lets through at most ``rate + burst``."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, now: float) -> bool:
        """True (a token taken) or False (none left: refuse)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def domain_of(command: bytes) -> str:
    """The domain of ``RCPT TO:<user@domain> [params]``, lower-cased."""
    path = command[8:].strip().split(b" ", 1)[0].strip(b"<>")
    return path.rpartition(b"@")[2].decode("ascii", "replace").lower()


class Recorder:
    """What the relay saw: accepted messages and deferred RCPTs by domain, with times."""

    def __init__(self, limited: str | None, rate: float, burst: float) -> None:
        self.limited = limited
        self.bucket = Bucket(rate, burst, time.monotonic()) if limited else None
        self.accepted: dict[str, list[float]] = {}
        self.deferred: dict[str, list[float]] = {}

    def admit(self, domain: str) -> bool:
        """Whether a RCPT for ``domain`` is accepted now; a refusal is recorded."""
        if self.bucket is None or domain != self.limited:
            return True
        if self.bucket.take(time.monotonic()):
            return True
        self.deferred.setdefault(domain, []).append(time.time())
        return False

    def delivered(self, domains: list[str]) -> None:
        now = time.time()
        for domain in domains:
            times = self.accepted.get(domain)
            if times is None:
                times = self.accepted[domain] = []
            times.append(now)

    def dump(self, out: Path) -> None:
        out.write_text(json.dumps({"accepted": self.accepted, "deferred": self.deferred}))


class Session(asyncio.Protocol):
    """One SMTP connection: commands line by line, then data up to its terminator."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = b""
        self.in_data = False
        self.rcpts: list[str] = []
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclass of asyncio.WriteTransport; they write alike.
        self.transport = writer = transport  # type: ignore[assignment]
        writer.write(b"220 bench-relay ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        buffer = self.buffer + data if self.buffer else data
        replies: list[bytes] = []
        start = 0
        while not self.closing:
            if self.in_data:
                # The data is searched from the CRLF that ended DATA's line (start points at
                # it): an empty message's ".\r\n" right after it ends it too.
                end = buffer.find(TERMINATOR, start)
                if end < 0:
                    # Keep only what may hold the start of a terminator.
                    start = max(start, len(buffer) - 4)
                    break
                self.in_data = False
                start = end + 5
                if self.rcpts:
                    self.recorder.delivered(self.rcpts)
                    self.rcpts = []
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = buffer.find(b"\r\n", start)
            if line_end < 0:
                break
            replies.append(self.command(buffer[start:line_end]))
            start = line_end if self.in_data else line_end + 2
        self.buffer = buffer[start:]
        assert self.transport is not None
        if replies:
            self.transport.write(b"".join(replies))
        if self.closing:
            self.transport.close()

    def command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"MAIL":
            self.rcpts = []
            return b"250 2.1.0 Ok\r\n"
        if verb == b"RCPT":
            domain = domain_of(line)
            if not self.recorder.admit(domain):
                self.closing = True  # 421: the receiver closes the channel (RFC 5321 §3.8)
                return b"421 4.7.0 " + domain.encode() + b" rate limited, try again later\r\n"
            self.rcpts.append(domain)
            return b"250 2.1.5 Ok\r\n"
        if verb == b"DATA":
            if not self.rcpts:
                return b"503 5.5.1 No valid recipients\r\n"
            self.in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"EHLO":
            return EHLO_REPLY
        if verb == b"HELO":
            return b"250 bench-relay\r\n"
        if verb in (b"RSET", b"NOOP"):
            self.rcpts = []
            return b"250 2.0.0 Ok\r\n"
        if verb == b"QUIT":
            self.closing = True
            return b"221 2.0.0 Bye\r\n"
        return b"502 5.5.2 Command not recognized\r\n"


async def serve(port: int, out: Path, recorder: Recorder) -> None:
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
    server = await loop.create_server(
        lambda: Session(recorder), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    async with server:
        await stopped
    recorder.dump(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--limited", default=None, help="the domain refused beyond its rate")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--burst", type=float, default=5.0)
    args = parser.parse_args()
    recorder = Recorder(args.limited, args.rate, args.burst)
    uvloop.run(serve(args.port, args.out, recorder))


if __name__ == "__main__":
    main()
