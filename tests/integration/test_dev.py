"""`tayori dev` (SPEC §10): the whole system from one command, state kept across restarts,
a Maildir sink, and a clean stop on Ctrl-C with no process left behind."""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import signal
import smtplib
import subprocess
import sys
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import psutil

from tayori.dev import PORTS
from tayori.embedded import free_port


def _start(home: Path, ports: dict[str, int]) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        TAYORI_HOME=str(home),
        TAYORI_ADMIN_TOKEN="dev-test-token",
        TAYORI_CONTACTS_PORT=str(ports["contacts"]),
        TAYORI_KAFKA_PORT=str(ports["kafka"]),
        TAYORI_SMTP_SINK_PORT=str(ports["smtp"]),
    )
    # Every service on a free port, so nothing else on the machine is in the way.
    for name in PORTS:
        env.setdefault(f"TAYORI_{name.upper()}_PORT", str(free_port()))
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP", "SMTP_HOST", "CONTACTS_URL"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "tayori", "dev"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_banner(proc: subprocess.Popen[str]) -> str:
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("  try: curl"):
            return "".join(seen)
    raise AssertionError("tayori dev exited before it was ready:\n" + "".join(seen))


def _request(method: str, url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": "Bearer dev-test-token", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _stop(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(60)
    assert proc.stdout is not None
    proc.stdout.close()
    assert code == 0
    return children


def test_dev_runs_everything_keeps_state_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ports = {"contacts": free_port(), "kafka": free_port(), "smtp": free_port()}
    base = f"http://127.0.0.1:{ports['contacts']}"

    proc = _start(home, ports)
    try:
        banner = _wait_banner(proc)
        assert "dev-test-token" in banner
        assert f"127.0.0.1:{ports['contacts']}" in banner
        created = _request(
            "POST", f"{base}/v1/contacts", {"email": "dev@example.jp", "name": "開発"}
        )
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@example.jp", "b@example.jp", "件名"
        message.set_content("本文")
        with smtplib.SMTP("127.0.0.1", ports["smtp"]) as smtp:
            smtp.send_message(message)
        stored = [
            email.message_from_bytes(m.as_bytes(), policy=email.policy.default)
            for m in mailbox.Maildir(str(home / "maildir"), create=False)
        ]
        assert [m["Subject"] for m in stored] == ["件名"]
        assert stored[0]["X-Tayori-Envelope-To"] == "b@example.jp"
    finally:
        children = _stop(proc)
    assert children, "tayori dev started no child processes"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]

    proc = _start(home, ports)  # the same home: PostgreSQL data survives the restart
    try:
        _wait_banner(proc)
        again = _request("GET", f"{base}/v1/contacts/{created['id']}")
        assert again["email"] == "dev@example.jp"
        assert again["name"] == "開発"
    finally:
        _stop(proc)
