"""``tayori dev``: the whole system on one machine, on embedded defaults.

Starts (unless overridden) PostgreSQL in ``$TAYORI_HOME/pg`` (kept across restarts), the
Kafka-protocol broker (memory only), and an SMTP sink storing into
``$TAYORI_HOME/maildir``; creates the topics, applies migrations, runs every implemented
service as its own process, prints where everything is, and on Ctrl-C stops it all.
``DATABASE_URL``, ``KAFKA_BOOTSTRAP`` and ``SMTP_HOST``/``SMTP_PORT`` replace the parts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from libs.common import logging as tlog
from libs.common.db import migrate
from libs.common.kafka import ensure_topics
from tayori.cli import IMPLEMENTED, _service_parts
from tayori.embedded import EmbeddedBroker, EmbeddedPostgres, SmtpSink, die_with_parent

#: SPEC §10 dev ports; each can be changed with TAYORI_<NAME>_PORT.
PORTS = {
    "contacts": 8081,
    "suppression": 8082,
    "scheduler": 8083,
    "sender": 8084,
    "bounce_processor": 8085,
    "exporter": 8086,
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
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TAYORI_ADMIN_TOKEN"] = _secret(
            self.home, "TAYORI_ADMIN_TOKEN", "admin_token", secrets.token_urlsafe(24)
        )
        env["TAYORI_SIGNING_KEYS"] = _secret(
            self.home, "TAYORI_SIGNING_KEYS", "signing_keys", f"k1:{secrets.token_urlsafe(32)}"
        )
        if not env.get("DATABASE_URL"):
            self.postgres = EmbeddedPostgres(self.home / "pg")
            env["DATABASE_URL"] = asyncio.run(self.postgres.create_database("tayori"))
        if not env.get("KAFKA_BOOTSTRAP"):
            self.broker = EmbeddedBroker(port("kafka"), log_path=self.home / "logs" / "broker.log")
            env["KAFKA_BOOTSTRAP"] = self.broker.bootstrap
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
        env.setdefault("EXPORTER_PUBLIC_URL", f"http://127.0.0.1:{port('exporter')}")
        env.setdefault("TAYORI_PUBLIC_URL", f"http://127.0.0.1:{port('suppression')}")
        # Open pixel and click links in mail point at the bounce processor's public pages.
        env.setdefault("TAYORI_TRACKING_URL", f"http://127.0.0.1:{port('bounce_processor')}")
        # Its inbound SMTP (the VERP return path). Nothing routes the sender's BOUNCE_DOMAIN
        # here on one machine: send DSNs to it by hand to try it.
        env.setdefault("BOUNCE_SMTP_HOST", "127.0.0.1")
        env.setdefault("BOUNCE_SMTP_PORT", str(port("bounce_smtp")))
        asyncio.run(ensure_topics(env["KAFKA_BOOTSTRAP"], env.get("KAFKA_TOPIC_PREFIX", "")))
        for name in IMPLEMENTED:
            app, _ = _service_parts(name)
            asyncio.run(migrate(env["DATABASE_URL"], app.SCHEMA, Path(app.MIGRATIONS)))
        for name in IMPLEMENTED:
            child_env = dict(env, HTTP_PORT=str(port(name)), HTTP_HOST="127.0.0.1")
            log = open(self.home / "logs" / f"{name}.log", "ab")
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "tayori", name],
                env=child_env,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
            log.close()
        deadline = time.monotonic() + 90
        for name in IMPLEMENTED:
            while not _healthy(f"http://127.0.0.1:{port(name)}/readyz"):
                if self.stopping:
                    return env
                if self.children[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.home / 'logs' / (name + '.log')}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not become ready; see its log")
                time.sleep(0.2)
        return env

    def banner(self, env: dict[str, str]) -> str:
        lines = ["", "Tayori is running (Ctrl-C stops everything).", ""]
        for name in IMPLEMENTED:
            lines.append(f"  {name:<17} http://127.0.0.1:{port(name)}  (/openapi.json, /metrics)")
        pending = [
            n
            for n in PORTS
            if n not in IMPLEMENTED and n not in ("bounce_smtp", "smtp_sink", "kafka")
        ]
        lines.append(f"  not yet built:    {', '.join(pending)}")
        if "bounce_processor" in IMPLEMENTED:
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
        while not self.stopping:
            for name, child in self.children.items():
                if child.poll() is not None:
                    print(
                        f"tayori dev: {name} exited with {child.returncode}; stopping",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.3)
        return 0

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
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
    finally:
        print("tayori dev: stopping…", file=sys.stderr, flush=True)
        dev.stop()
        print("tayori dev: stopped", file=sys.stderr, flush=True)
    return code
