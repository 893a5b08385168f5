"""Bounce processor (issue 5): DSNs parsed and applied per second through its SMTP listener,
and open-pixel hits per second, each beside its ceiling measured in the same run.

The bounce processor runs as its own process (`tayori bounce_processor`) on the embedded
PostgreSQL (default durability) and broker, as in `tayori dev`; this process is the load
generator, on loopback:

- **DSNs**: ``CONNECTIONS`` SMTP connections, each sending its share of ``DSNS`` RFC 3464
  DSNs (the corpus' Postfix and Exim shapes, half hard, half soft) to signed VERP
  addresses of distinct contacts, one transaction after another (as a remote MTA reusing a
  connection). The figure is DSNs / (time until the last one is *applied*: its bounce row
  and rule effects committed, polled in PostgreSQL). The ceiling is the same client against
  a bare aiosmtpd listener whose DATA handler only answers 250 (its own process, uvloop).
- **Opens**: ``HITS`` GET /t/o/{token} (distinct contacts) over ``HTTP_CONCURRENCY``
  connections; each answered only after its hit is committed. The ceiling is the same client
  against an aiohttp handler that answers the GIF and does nothing else (its own process).

Goals are absolute, from the load a sender meets: a 1,000,000-recipient campaign sent in an
hour with 5% bounces brings ~14 DSNs/s (goal 200/s: bursts, several campaigns at once), and
its opens peak in the first hour at a few hundred per second (goal 1,000/s). The ceilings
say how much of the machine the pipeline leaves on the table.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import aiosmtplib
import asyncpg

from bench.processes import ready, start, stop
from bench.report import Result, n, progress, rate
from libs.common import db
from libs.common.kafka import ensure_topics
from libs.common.mail.tracking import PIXEL_GIF, TrackingLinks
from libs.common.mail.verp import VerpAddresses
from services.bounce_processor.app import MIGRATIONS
from tayori.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, wait_for_port

DSNS = 6_000
CONNECTIONS = 16
HITS = 20_000
HTTP_CONCURRENCY = 64
DSN_GOAL = 200
HIT_GOAL = 1_000
KEYS = "k1:bench-bounce-signing-key"
DOMAIN = "bounces.bench.example"
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bounces"
SHAPES = ("postfix_user_unknown", "exim_mailbox_full")


def _dsns(count: int) -> list[tuple[str, bytes]]:
    """(VERP address, DSN) for ``count`` contacts of one campaign."""
    verp = VerpAddresses(KEYS, DOMAIN)
    campaign = str(uuid.uuid4())
    shapes = [(FIXTURES / f"{name}.eml").read_bytes() for name in SHAPES]
    return [(verp.address(campaign, i + 1), shapes[i % len(shapes)]) for i in range(count)]


async def _send_all(port: int, mails: list[tuple[str, bytes]]) -> float:
    """Send ``mails`` over CONNECTIONS connections; seconds until the last 250."""

    async def connection(share: list[tuple[str, bytes]]) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60) as smtp:
            for rcpt, raw in share:
                errors, _ = await smtp.sendmail("", [rcpt], raw)
                assert not errors, errors

    started = time.perf_counter()
    await asyncio.gather(*(connection(mails[i::CONNECTIONS]) for i in range(CONNECTIONS)))
    return time.perf_counter() - started


async def _hit_all(urls: list[str]) -> float:
    """GET every URL with HTTP_CONCURRENCY workers; seconds for all of them."""
    queue = list(reversed(urls))
    connector = aiohttp.TCPConnector(limit=HTTP_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                async with session.get(queue.pop()) as response:
                    assert response.status == 200, response.status
                    assert await response.read() == PIXEL_GIF

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(HTTP_CONCURRENCY)))
        return time.perf_counter() - started


def _ceiling_process(kind: str, port: int, root: Path) -> subprocess.Popen[bytes]:
    with open(root / f"bounce-ceiling-{kind}.log", "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.bounce", kind, str(port)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    wait_for_port("127.0.0.1", port, timeout=30, proc=process)
    return process


async def _applied(dsn: str, count: int) -> float:
    """Poll until ``count`` bounces are applied and nothing waits; returns that moment."""
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            done = await conn.fetchval("SELECT count(*) FROM bounce_processor.bounce")
            waiting = await conn.fetchval(
                "SELECT count(*) FROM bounce_processor.inbound_mail WHERE status = 'pending'"
            )
            if done >= count and not waiting:
                return time.perf_counter()
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


async def run(root: Path) -> list[Result]:
    postgres = EmbeddedPostgres(root / "bounce-pg")
    broker = EmbeddedBroker(free_port(), log_path=root / "bounce-broker.log")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        dsn = await postgres.create_database("tayori")
        await db.migrate(dsn, "bounce_processor", MIGRATIONS)
        prefix = f"b{uuid.uuid4().hex[:8]}."
        await ensure_topics(broker.bootstrap, prefix)
        http_port, smtp_port = free_port(), free_port()
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            **broker.profile(),
            "KAFKA_TOPIC_PREFIX": prefix,
            "KAFKA_SESSION_TIMEOUT_MS": "1000",
            "TAYORI_SIGNING_KEYS": KEYS,
            "TAYORI_ADMIN_TOKEN": "bench",
            "BOUNCE_DOMAIN": DOMAIN,
            "BOUNCE_SMTP_HOST": "127.0.0.1",
            "BOUNCE_SMTP_PORT": str(smtp_port),
            "LOG_LEVEL": "warning",
        }
        processes.append(start("bounce_processor", env, http_port, root / "bounce.log"))
        async with aiohttp.ClientSession() as session:
            await ready(session, http_port)
        wait_for_port("127.0.0.1", smtp_port, timeout=30)

        mails = _dsns(DSNS)
        progress(f"bounce: {DSNS:,} DSNs through the listener, {CONNECTIONS} connections")
        started = time.perf_counter()
        applied = asyncio.ensure_future(_applied(dsn, DSNS))
        accept_seconds = await _send_all(smtp_port, mails)
        dsn_seconds = await asyncio.wait_for(applied, 600) - started

        links = TrackingLinks(KEYS, f"http://127.0.0.1:{http_port}")
        campaign = str(uuid.uuid4())
        urls = [links.open_url(campaign, i + 1) for i in range(HITS)]
        progress(f"bounce: {HITS:,} opens on /t/o, {HTTP_CONCURRENCY} connections")
        hit_seconds = await _hit_all(urls)
        conn = await asyncpg.connect(dsn)
        recorded = await conn.fetchval("SELECT sum(hits) FROM bounce_processor.engagement")
        await conn.close()

        progress("bounce: ceilings (bare aiosmtpd, empty aiohttp handler)")
        raw_smtp, raw_http = free_port(), free_port()
        ceilings = [
            _ceiling_process("smtp", raw_smtp, root),
            _ceiling_process("http", raw_http, root),
        ]
        try:
            raw_accept_seconds = await _send_all(raw_smtp, _dsns(DSNS))
            raw_hit_seconds = await _hit_all([f"http://127.0.0.1:{raw_http}/t/o/x"] * HITS)
        finally:
            stop(ceilings)
    finally:
        stop(processes)
        broker.stop()
        postgres.stop()

    dsn_rate, accept_rate = rate(DSNS, dsn_seconds), rate(DSNS, accept_seconds)
    raw_accept = rate(DSNS, raw_accept_seconds)
    hit_rate, raw_hit = rate(HITS, hit_seconds), rate(HITS, raw_hit_seconds)
    data = {
        "dsns": DSNS,
        "connections": CONNECTIONS,
        "dsn_applied_per_s": round(dsn_rate, 1),
        "dsn_accepted_per_s": round(accept_rate, 1),
        "raw_aiosmtpd_accepted_per_s": round(raw_accept, 1),
        "hits": HITS,
        "hits_recorded": int(recorded or 0),
        "http_concurrency": HTTP_CONCURRENCY,
        "open_hits_per_s": round(hit_rate, 1),
        "empty_aiohttp_per_s": round(raw_hit, 1),
    }
    return [
        Result(
            "DSNs parsed and applied (SMTP → rules)",
            f"{n(dsn_rate)} DSNs/s ({n(accept_rate)}/s accepted with 250)",
            f"bare aiosmtpd {n(raw_accept)} accepted/s",
            f"≥ {n(DSN_GOAL)}/s",
            dsn_rate >= DSN_GOAL,
            ratio=dsn_rate / raw_accept,
            data=data,
        ),
        Result(
            "open pixel GET /t/o (committed before the answer)",
            f"{n(hit_rate)} hits/s ({int(recorded or 0):,} of {HITS:,} recorded)",
            f"empty aiohttp handler {n(raw_hit)}/s",
            f"≥ {n(HIT_GOAL)}/s, every hit recorded",
            hit_rate >= HIT_GOAL and recorded == HITS,
            ratio=hit_rate / raw_hit,
            data=data,
        ),
    ]


def _serve_ceiling(kind: str, port: int) -> None:
    """The ceilings, in their own process: a listener that only answers."""
    import uvloop
    from aiohttp import web
    from aiosmtpd.smtp import SMTP

    class Accept:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 2.0.0 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "smtp":
            await loop.create_server(
                lambda: SMTP(Accept(), hostname="bench", loop=loop), "127.0.0.1", port
            )
        else:

            async def pixel(_: web.Request) -> web.Response:
                return web.Response(body=PIXEL_GIF, content_type="image/gif")

            app = web.Application()
            app.router.add_get("/t/o/{token}", pixel)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(main())


if __name__ == "__main__":
    if len(sys.argv) == 3:
        _serve_ceiling(sys.argv[1], int(sys.argv[2]))
    else:
        import tempfile

        from bench.report import table

        print(table(asyncio.run(run(Path(tempfile.mkdtemp(prefix="tayori-bench-"))))))
