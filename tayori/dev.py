"""``tayori dev``: the whole system on one machine, on embedded defaults.

Starts (unless overridden) PostgreSQL in ``$TAYORI_HOME/pg`` (kept across restarts), the
Kafka-protocol broker (memory only), and an SMTP sink storing into
``$TAYORI_HOME/maildir``; creates the topics, applies migrations, runs every implemented
service as its own process, prints where everything is, and on Ctrl-C stops it all.
``DATABASE_URL``, ``KAFKA_BOOTSTRAP`` and ``SMTP_HOST``/``SMTP_PORT`` replace the parts.

Then it supervises: a service that exits, however it ends, is started again after a backoff
(:class:`Backoff`), and so are the embedded broker — empty, so the topics are created again —
and the embedded PostgreSQL, on its kept data. Each restart is one line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiokafka.errors import KafkaError

from libs.common import logging as tlog
from libs.common.db import migrate
from libs.common.kafka import ensure_topics
from libs.common.settings import CommonSettings, load
from tayori.embedded import (
    EmbeddedBroker,
    EmbeddedPartMissing,
    EmbeddedPostgres,
    SmtpSink,
    die_with_parent,
)
from tayori.services import CONSOLE, SERVICES, service_parts

#: SPEC §10 dev ports; each can be changed with TAYORI_<NAME>_PORT.
PORTS = {
    "console": 8080,
    "contacts": 8081,
    "suppression": 8082,
    "scheduler": 8083,
    "sender": 8084,
    "bounce_processor": 8085,
    "exporter": 8086,
    "deliverability": 8087,
    "bounce_smtp": 2525,
    "smtp_sink": 1025,
    "kafka": 9092,
}


def port(name: str) -> int:
    return int(os.environ.get(f"TAYORI_{name.upper()}_PORT", PORTS[name]))


def _secret(home: Path, env_name: str, file_name: str, make: str) -> str:
    if os.environ.get(env_name):
        return os.environ[env_name]
    path = home / file_name
    if not path.exists():
        path.write_text(make)
        path.chmod(0o600)
    return path.read_text().strip()


#: Restart delays: 1 s, doubling up to 30 s; a run of 60 s counts as healthy and the next
#: death starts from 1 s again.
FIRST_DELAY, MAX_DELAY, HEALTHY_RUN = 1.0, 30.0, 60.0


def say(line: str) -> None:
    print(f"tayori dev: {line}", file=sys.stderr, flush=True)


def shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is under it (``.tayori/logs/…``)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def exit_status(code: int) -> str:
    """``1``, or ``-9 (SIGKILL)`` for a process a signal ended."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


@dataclass
class Backoff:
    """When to start again something that died: FIRST_DELAY after its death, doubling with
    each death in a row up to MAX_DELAY; a run of HEALTHY_RUN seconds ends the row."""

    streak: int = 0  # deaths since the last healthy run
    started_at: float = 0.0
    next_start: float | None = None  # set while waiting to start again

    def started(self, now: float) -> None:
        self.started_at, self.next_start = now, None

    def died(self, now: float) -> float:
        """Schedule the next start (after a death, or a start that failed); returns the delay."""
        if self.next_start is None and now - self.started_at >= HEALTHY_RUN:
            self.streak = 0
        delay = min(FIRST_DELAY * 2**self.streak, MAX_DELAY)
        self.streak += 1
        self.next_start = now + delay
        return delay

    def due(self, now: float) -> bool:
        return self.next_start is not None and now >= self.next_start


class Supervised(Protocol):
    """Something ``tayori dev`` starts again when it dies."""

    name: str
    log_path: Path
    backoff: Backoff

    def death(self) -> str | None:
        """How it ended (``exited with 1``), or None while it runs."""

    def restart(self, now: float) -> str | None:
        """Start it again (raising if it cannot); returns a line to print, if any."""


@dataclass
class Child:
    """One service process: how to start it, and when to start it again."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)

    def start(self, now: float) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        self.backoff.started(now)

    def death(self) -> str | None:
        code = self.process.poll() if self.process else None
        return None if code is None else f"exited with {exit_status(code)}"

    def restart(self, now: float) -> str | None:
        self.restarts += 1
        self.start(now)
        return None


class BrokerPart:
    """The embedded broker. It keeps nothing, so a new one gets the topics created again."""

    name = "the embedded Kafka broker"

    def __init__(self, broker: EmbeddedBroker, topic_prefix: str) -> None:
        self.broker, self.topic_prefix = broker, topic_prefix
        self.log_path = broker.log_path or Path(os.devnull)
        self.backoff = Backoff()

    def death(self) -> str | None:
        code = self.broker.process.poll()
        return None if code is None else f"exited with {exit_status(code)}"

    def restart(self, now: float) -> str | None:
        self.broker.restart()
        asyncio.run(ensure_topics(self.broker.bootstrap, self.topic_prefix))
        return (
            f"restarted the embedded Kafka broker on {self.broker.bootstrap} and created the "
            "topics again; its Kafka state (topics, offsets, in-flight records) was lost; "
            "the services were left running"
        )


class PostgresPart:
    """The embedded PostgreSQL, started again on its kept data directory."""

    name = "the embedded PostgreSQL"

    def __init__(self, postgres: EmbeddedPostgres) -> None:
        self.postgres, self.log_path = postgres, postgres.log_path
        self.backoff = Backoff()

    def death(self) -> str | None:
        return None if self.postgres.running() else "stopped (its postmaster is gone)"

    def restart(self, now: float) -> str | None:
        self.postgres.start_server()
        return "restarted the embedded PostgreSQL on its data directory; committed data is kept"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class Dev:
    def __init__(self) -> None:
        self.home = Path(os.environ.get("TAYORI_HOME", ".tayori")).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.postgres: EmbeddedPostgres | None = None
        self.broker: EmbeddedBroker | None = None
        self.sink: SmtpSink | None = None
        self.children: dict[str, Child] = {}
        #: the embedded dependencies dev restarts, in the order they are looked after
        self.parts: list[Supervised] = []
        self.stopping = False
        self.clock: Callable[[], float] = time.monotonic

    def start(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TAYORI_ADMIN_TOKEN"] = _secret(
            self.home, "TAYORI_ADMIN_TOKEN", "admin_token", secrets.token_urlsafe(24)
        )
        env["TAYORI_SIGNING_KEYS"] = _secret(
            self.home, "TAYORI_SIGNING_KEYS", "signing_keys", f"k1:{secrets.token_urlsafe(32)}"
        )
        # The dev profile: the published development signing key is accepted here (the
        # keys above are generated, but TAYORI_SIGNING_KEYS may name it).
        env.setdefault("TAYORI_PROFILE", "dev")
        # The console calls the services with a token per role: dev makes one for the
        # operator and one for the viewer beside the admin token (all services accept them).
        env["TAYORI_API_TOKENS"] = _secret(
            self.home,
            "TAYORI_API_TOKENS",
            "api_tokens",
            f"operator:{secrets.token_urlsafe(24)},viewer:{secrets.token_urlsafe(24)}",
        )
        if not env.get("DATABASE_URL"):
            self.postgres = EmbeddedPostgres(self.home / "pg")
            env["DATABASE_URL"] = asyncio.run(self.postgres.create_database("tayori"))
        if not env.get("KAFKA_BOOTSTRAP"):
            self.broker = EmbeddedBroker(port("kafka"), log_path=self.home / "logs" / "broker.log")
            env.update(self.broker.profile())
            # The embedded broker makes a joining member wait half the session timeout.
            env.setdefault("KAFKA_SESSION_TIMEOUT_MS", "2000")
        if not env.get("SMTP_HOST"):
            self.sink = SmtpSink(self.home / "maildir", port("smtp_sink"))
            env["SMTP_HOST"], env["SMTP_PORT"] = "127.0.0.1", str(self.sink.port)
        # Services find each other on the dev ports: the scheduler asks contacts for field
        # definitions, and unsubscribe links in mail point at suppression's public pages.
        env.setdefault("CONTACTS_URL", f"http://127.0.0.1:{port('contacts')}")
        # The exporter reads campaign recipient lists from the scheduler, writes its files
        # under $TAYORI_HOME/exports and puts its own address in the download links.
        env.setdefault("SCHEDULER_URL", f"http://127.0.0.1:{port('scheduler')}")
        env.setdefault("EXPORT_DIR", str(self.home / "exports"))
        # The export mail's link opens the console, which asks for a login and downloads.
        env.setdefault("EXPORTER_PUBLIC_URL", f"http://127.0.0.1:{port(CONSOLE)}")
        env.setdefault("CONSOLE_PUBLIC_URL", f"http://127.0.0.1:{port(CONSOLE)}")
        for name in SERVICES:
            env.setdefault(f"CONSOLE_{name.upper()}_URL", f"http://127.0.0.1:{port(name)}")
        env.setdefault("TAYORI_PUBLIC_URL", f"http://127.0.0.1:{port('suppression')}")
        # Open pixel and click links in mail point at the bounce processor's public pages.
        env.setdefault("TAYORI_TRACKING_URL", f"http://127.0.0.1:{port('bounce_processor')}")
        # Its inbound SMTP (the VERP return path). Nothing routes the sender's BOUNCE_DOMAIN
        # here on one machine: send DSNs to it by hand to try it.
        env.setdefault("BOUNCE_SMTP_HOST", "127.0.0.1")
        env.setdefault("BOUNCE_SMTP_PORT", str(port("bounce_smtp")))
        # With the Kafka security variables, when KAFKA_BOOTSTRAP names a secured cluster.
        settings = load(CommonSettings, env)
        asyncio.run(ensure_topics(settings, settings.topic_prefix))
        for name in SERVICES:
            app, _ = service_parts(name)
            if getattr(app, "MIGRATIONS", None) is None:
                continue  # no database (deliverability)
            asyncio.run(migrate(env["DATABASE_URL"], app.SCHEMA, Path(app.MIGRATIONS)))
        # The dev login: `admin` with the admin token as its password (SPEC §10).
        from services.console.users import ensure_user

        try:
            asyncio.run(
                ensure_user(env["DATABASE_URL"], "admin", env["TAYORI_ADMIN_TOKEN"], "admin")
            )
        except ValueError as exc:  # an admin token too short to be a password
            say(f"no console login made for admin: {exc}")
        if self.postgres:
            self.parts.append(PostgresPart(self.postgres))
        if self.broker:
            self.parts.append(BrokerPart(self.broker, env.get("KAFKA_TOPIC_PREFIX", "")))
        for name in (CONSOLE, *SERVICES):
            self.children[name] = child = Child(
                name,
                [sys.executable, "-m", "tayori", name],
                dict(env, HTTP_PORT=str(port(name)), HTTP_HOST="127.0.0.1"),
                self.home / "logs" / f"{name}.log",
            )
            child.start(self.clock())
        deadline = time.monotonic() + 90
        for name in (*SERVICES, CONSOLE):
            while not _healthy(f"http://127.0.0.1:{port(name)}/readyz"):
                if self.stopping:
                    return env
                if self.children[name].death():
                    raise RuntimeError(f"{name} exited; see {self.children[name].log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not become ready; see its log")
                time.sleep(0.2)
        return env

    def banner(self, env: dict[str, str]) -> str:
        lines = ["", "Tayori is running (Ctrl-C stops everything).", ""]
        console = f"http://127.0.0.1:{port(CONSOLE)}"
        lines.append(f"  console           {console}  (log in as admin / the admin token below)")
        for name in SERVICES:
            base = f"http://127.0.0.1:{port(name)}"
            lines.append(f"  {name:<17} {base}  (API reference: {base}/docs; /metrics)")
        lines.append(
            f"  bounce smtp       127.0.0.1:{env['BOUNCE_SMTP_PORT']}"
            f"  (VERP return path, domain {env.get('BOUNCE_DOMAIN', 'bounces.localhost')})"
        )
        lines.append(
            f"  kafka             {env['KAFKA_BOOTSTRAP']}{' (embedded)' if self.broker else ''}"
        )
        database = f"embedded, data in {self.home / 'pg'}" if self.postgres else "DATABASE_URL"
        lines.append(f"  postgresql        {database}")
        if self.sink:
            lines.append(
                f"  smtp sink         127.0.0.1:{self.sink.port} → {self.sink.path} (Maildir)"
            )
        else:
            lines.append(f"  smtp              {env['SMTP_HOST']}:{env.get('SMTP_PORT', '25')}")
        lines.append(f"  logs              {self.home / 'logs'}")
        lines.append("")
        lines.append(f"  admin token       {env['TAYORI_ADMIN_TOKEN']}")
        lines.append(
            f"  try: curl -H 'Authorization: Bearer {env['TAYORI_ADMIN_TOKEN']}' "
            f"http://127.0.0.1:{port('contacts')}/v1/groups"
        )
        return "\n".join(lines) + "\n"

    def wait(self) -> int:
        """Supervise until Ctrl-C or SIGTERM: the dependencies first, then the services."""
        while not self.stopping:
            for unit in [*self.parts, *self.children.values()]:
                self._tend(unit)
            time.sleep(0.2)
        return 0

    def _tend(self, unit: Supervised) -> None:
        now = self.clock()
        if unit.backoff.next_start is None:
            death = unit.death()
            if death:
                delay = unit.backoff.died(now)
                log = shown(unit.log_path)
                say(f"{unit.name} {death}; restarting in {delay:.1f} s (log: {log})")
            return
        if not unit.backoff.due(now) or self.stopping:
            return
        try:
            done = unit.restart(now)
        except (OSError, RuntimeError, KafkaError) as error:
            delay = unit.backoff.died(self.clock())
            say(f"could not restart {unit.name} ({error}); trying again in {delay:.1f} s")
            return
        unit.backoff.started(self.clock())
        if done:
            say(done)

    def stop(self) -> None:
        processes = [c.process for c in self.children.values() if c.process]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.sink:
            self.sink.stop()
        if self.broker:
            self.broker.stop()
        if self.postgres:
            self.postgres.stop()


def main() -> int:
    tlog.configure("dev", os.environ.get("LOG_LEVEL", "warning"))
    dev = Dev()

    def request_stop(*_: object) -> None:
        dev.stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 1
    try:
        env = dev.start()
        print(dev.banner(env), flush=True)
        code = dev.wait()
    except EmbeddedPartMissing as error:
        print(f"tayori dev: {error}", file=sys.stderr, flush=True)
        code = 2
    finally:
        print("tayori dev: stopping…", file=sys.stderr, flush=True)
        dev.stop()
        print("tayori dev: stopped", file=sys.stderr, flush=True)
    return code
