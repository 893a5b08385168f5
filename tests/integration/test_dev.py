"""`tayori dev` (SPEC §10): the whole system from one command, state kept across restarts,
a Maildir sink, and a clean stop on Ctrl-C with no process left behind. It supervises: a
killed service is started again, a killed embedded broker comes back with its topics, a
killed embedded PostgreSQL comes back with its data."""

from __future__ import annotations

import email
import email.policy
import functools
import json
import mailbox
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from libs.common.topics import all_topic_names
from tayori.dev import PORTS
from tayori.embedded import free_port
from tayori.services import SERVICES
from tests.integration.test_embedded import topic_names

T = TypeVar("T")


class DevRun:
    """`tayori dev` as a subprocess on free ports; a thread keeps what it prints (stdout and
    stderr) in ``lines``."""

    def __init__(self, home: Path, ports: dict[str, int]) -> None:
        self.ports = ports
        env = dict(os.environ, TAYORI_HOME=str(home), TAYORI_ADMIN_TOKEN="dev-test-token")
        for name, number in ports.items():
            env[f"TAYORI_{name.upper()}_PORT"] = str(number)
        for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP", "SMTP_HOST", "CONTACTS_URL"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tayori", "dev"],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, name="tayori-dev-output")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_banner(self) -> str:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"tayori dev exited before it was ready:\n{self.output()}")
            return any(line.startswith("  try: curl") for line in self.lines)

        _eventually(ready, "the banner", timeout=180)
        return self.output()

    def wait_line(self, *parts: str, nth: int = 1) -> str:
        """The ``nth`` line printed that holds every one of ``parts``."""

        def printed() -> str | None:
            found = [x for x in self.lines if all(p in x for p in parts)]
            return found[nth - 1] if len(found) >= nth else None

        try:
            return _eventually(printed, f"line {nth} with {parts}")
        except AssertionError as error:
            raise AssertionError(f"{error}; tayori dev printed:\n{self.output()}") from None

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def service(self, name: str) -> psutil.Process | None:
        """The live process of service ``name``, if dev runs one now."""
        for child in self.children():
            try:
                running = child.status() != psutil.STATUS_ZOMBIE
                if running and child.cmdline()[-2:] == ["tayori", name]:
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def broker(self) -> psutil.Process:
        found = [c for c in self.children() if "--listener-url" in c.cmdline()]
        assert len(found) == 1, found
        return found[0]

    def ready(self, name: str) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports[name]}/readyz"
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> list[psutil.Process]:
        """Ctrl-C; returns the processes dev had, for the caller to check they are gone."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGINT)
        code = self.close()
        assert code == 0, self.output()
        return children

    def close(self) -> int:
        """Wait for dev to end (after a stop, or on its own) and read the last of its output."""
        code = self.proc.wait(60)
        self._reader.join(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def _eventually(check: Callable[[], T | None], what: str, timeout: float = 120.0) -> T:
    """Poll ``check`` until it returns something truthy (a generous deadline, not a speed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def _free_ports() -> dict[str, int]:
    """Every dev port free, so nothing else on the machine is in the way."""
    return {name: free_port() for name in PORTS}


def _assert_all_gone(children: list[psutil.Process]) -> None:
    assert children, "tayori dev started no child processes"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def dev(pg_home: Path) -> Iterator[DevRun]:
    run = DevRun(pg_home / "home", _free_ports())
    try:
        run.wait_banner()
        yield run
    finally:
        if run.proc.poll() is None:
            _assert_all_gone(run.stop())
        elif not run.proc.stdout.closed:  # type: ignore[union-attr]
            run.close()


def _request(method: str, url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": "Bearer dev-test-token", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_dev_runs_everything_keeps_state_and_stops_cleanly(pg_home: Path) -> None:
    home = pg_home / "home"
    ports = _free_ports()
    base = f"http://127.0.0.1:{ports['contacts']}"

    dev = DevRun(home, ports)
    try:
        banner = dev.wait_banner()
        assert "dev-test-token" in banner
        assert f"127.0.0.1:{ports['contacts']}" in banner
        assert "not yet built" not in banner
        created = _request(
            "POST", f"{base}/v1/contacts", {"email": "dev@example.jp", "name": "開発"}
        )
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@example.jp", "b@example.jp", "件名"
        message.set_content("本文")
        with smtplib.SMTP("127.0.0.1", ports["smtp_sink"]) as smtp:
            smtp.send_message(message)
        stored = [
            email.message_from_bytes(m.as_bytes(), policy=email.policy.default)
            for m in mailbox.Maildir(str(home / "maildir"), create=False)
        ]
        assert [m["Subject"] for m in stored] == ["件名"]
        assert stored[0]["X-Tayori-Envelope-To"] == "b@example.jp"
    finally:
        children = dev.stop()
    _assert_all_gone(children)

    dev = DevRun(home, ports)  # the same home: PostgreSQL data survives the restart
    try:
        dev.wait_banner()
        again = _request("GET", f"{base}/v1/contacts/{created['id']}")
        assert again["email"] == "dev@example.jp"
        assert again["name"] == "開発"
    finally:
        dev.stop()


def test_dev_restarts_a_killed_service_and_stops_during_its_backoff(dev: DevRun) -> None:
    sender = dev.service("sender")
    assert sender is not None
    sender.kill()

    line = dev.wait_line("tayori dev: sender exited with -9 (SIGKILL); restarting in 1.0 s")
    assert str(Path("logs") / "sender.log") in line
    again = _eventually(lambda: dev.service("sender"), "a new sender process")
    assert again.pid != sender.pid
    _eventually(lambda: dev.ready("sender"), "the restarted sender's /readyz")
    assert dev.proc.poll() is None

    # Killed again (within a minute, so it waits 2 s): Ctrl-C during the wait stops it all.
    again.kill()
    dev.wait_line("tayori dev: sender exited with -9 (SIGKILL); restarting in", nth=2)
    _assert_all_gone(dev.stop())


async def test_dev_restarts_a_killed_broker_and_creates_the_topics_again(dev: DevRun) -> None:
    broker = dev.broker()
    broker.kill()

    dev.wait_line("tayori dev: the embedded Kafka broker exited with -9 (SIGKILL)", "broker.log")
    dev.wait_line(
        f"tayori dev: restarted the embedded Kafka broker on 127.0.0.1:{dev.ports['kafka']}",
        "Kafka state (topics, offsets, in-flight records) was lost",
    )
    assert dev.broker().pid != broker.pid
    assert set(all_topic_names()) <= await topic_names(f"127.0.0.1:{dev.ports['kafka']}")
    assert dev.proc.poll() is None
    # The services ride it out or are restarted by dev: either way each one runs.
    for name in SERVICES:
        _eventually(functools.partial(dev.service, name), f"a {name} process")


def test_dev_restarts_a_killed_postgresql_with_its_data(dev: DevRun, pg_home: Path) -> None:
    base = f"http://127.0.0.1:{dev.ports['contacts']}"
    created = _request("POST", f"{base}/v1/contacts", {"email": "kept@example.jp"})
    pid_file = pg_home / "home" / "pg" / "postmaster.pid"
    postmaster = int(pid_file.read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)

    dev.wait_line("tayori dev: the embedded PostgreSQL stopped", "pg/log")
    dev.wait_line("tayori dev: restarted the embedded PostgreSQL on its data directory")
    assert int(pid_file.read_text().split()[0]) != postmaster
    assert dev.proc.poll() is None

    def contact() -> dict | None:
        try:
            return _request("GET", f"{base}/v1/contacts/{created['id']}")
        except (urllib.error.HTTPError, OSError):  # contacts reconnecting, or restarted
            return None

    assert _eventually(contact, "the contact, read again")["email"] == "kept@example.jp"
