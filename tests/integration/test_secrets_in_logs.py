"""No secret in any service's start-up log: the services are started as ``tayori
<service>`` processes with test secrets (a database password in DATABASE_URL, the admin
and API tokens, the signing keys, the SMTP password, the password of the Kafka client's
encrypted key — they reach Kafka through the TLS front of tests/integration/tlsfront.py),
at LOG_LEVEL=debug, until each is ready and then stopped; a seventh start with a SASL
password is refused by the broker. Their whole stdout and stderr must not hold any
secret value."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from libs.common.kafka import ensure_topics
from tayori.embedded import EmbeddedBroker, die_with_parent, free_port
from tayori.services import SERVICES
from tests.conftest import Stack, eventually
from tests.integration.tlsfront import KEY_PASSWORD, Secured, TlsFront
from tests.integration.tlsfront import secured as secured  # the fixture

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DB_PASSWORD = "Db-S3cret-9c41"
SECRETS = {
    "TAYORI_ADMIN_TOKEN": "adm-S3cret-5e07",
    "TAYORI_API_TOKENS": "operator:op-S3cret-77aa,viewer:vw-S3cret-31bd",
    "TAYORI_SIGNING_KEYS": "k1:sig-S3cret-a9f2,k0:sig-S3cret-old-0b3c",
    "SMTP_USERNAME": "tayori",
    "SMTP_PASSWORD": "smtp-S3cret-64e1",
}
SASL_PASSWORD = "sasl-S3cret-d05f"


def _values() -> list[str]:
    """Every secret value, and each part of a list of them (a token, a key)."""
    values = [DB_PASSWORD, KEY_PASSWORD, SASL_PASSWORD, SECRETS["SMTP_PASSWORD"]]
    for name in ("TAYORI_ADMIN_TOKEN", "TAYORI_API_TOKENS", "TAYORI_SIGNING_KEYS"):
        values.append(SECRETS[name])
        values += [pair.partition(":")[2] or pair for pair in SECRETS[name].split(",")]
    return values


async def test_no_service_logs_a_secret_at_start(
    secured: Secured, stack: Stack, database: str, tmp_path: Path
) -> None:
    prefix = "secrets."
    # The test database's URL, with a password (the socket's trust authentication ignores
    # it: the password is there only to be kept out of the logs).
    assert "postgres:@" in database
    dsn = database.replace("postgres:@", f"postgres:{DB_PASSWORD}@", 1)
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        **secured.environ(prefix),
        **SECRETS,
        "DATABASE_URL": dsn,
        "LOG_LEVEL": "debug",
        "HTTP_HOST": "127.0.0.1",
        "KAFKA_PROFILE": "embedded",
        "CONTACTS_URL": f"http://127.0.0.1:{ports['contacts']}",
        "SCHEDULER_URL": f"http://127.0.0.1:{ports['scheduler']}",
        "EXPORT_DIR": str(tmp_path / "exports"),
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(free_port()),
        "BOUNCE_SMTP_HOST": "127.0.0.1",
        "BOUNCE_SMTP_PORT": str(free_port()),
        # deliverability's faust topics have its inputs' partition count (one here)
        "DELIVERABILITY_PARTITIONS": "1",
    }
    await ensure_topics(secured.settings(), prefix, partitions=1)
    logs = {name: tmp_path / f"{name}.log" for name in SERVICES}
    processes = {}
    for name in SERVICES:
        with logs[name].open("wb") as out:
            processes[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tayori",
                name,
                env={**env, "HTTP_PORT": str(ports[name])},
                cwd=ROOT,
                stdout=out,
                stderr=out,
                preexec_fn=die_with_parent,
            )
    try:
        async with aiohttp.ClientSession() as session:
            for name in SERVICES:
                await eventually(
                    functools.partial(_ready, session, ports[name], processes[name], logs[name]),
                    timeout=180,
                    interval=0.2,
                )
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in processes.values()))
    texts = {name: path.read_text() for name, path in logs.items()}

    # The seventh: SASL over TLS to a broker that refuses the login.
    refused = await _refused_with_sasl(secured, env, tmp_path)
    texts["contacts (SASL)"] = refused

    for name, text in texts.items():
        assert "service_configuring" in text, f"{name} logged nothing of its start:\n{text}"
        for value in _values():
            assert value not in text, f"{name} logged the secret {value!r}"
    # What the scan read: started services, and the refusal with its reason.
    assert all("service_started" in texts[name] for name in SERVICES)
    masked = "postgres:***@/" + dsn.split("@/", 1)[1].split("?")[0]
    assert all(masked in texts[name] for name in SERVICES), masked
    assert "service_start_refused" in refused and "SASL SCRAM-SHA-512" in refused


async def _ready(
    session: aiohttp.ClientSession,
    port: int,
    process: asyncio.subprocess.Process,
    log: Path,
) -> bool:
    assert process.returncode is None, f"exited with {process.returncode}:\n{_text(log)}"
    try:
        async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


def _text(log: Path) -> str:
    return log.read_text()


async def _refused_with_sasl(secured: Secured, env: dict[str, str], tmp_path: Path) -> str:
    front_port = free_port()
    broker = EmbeddedBroker(
        free_port(),
        log_path=tmp_path / "sasl-broker.log",
        advertised_port=front_port,
        authentication=True,
    )
    front = TlsFront(front_port, broker.port, secured.ca.issue("scan", ips=("127.0.0.1",)))
    await front.start()
    try:
        sasl = {key: value for key, value in env.items() if not key.startswith("KAFKA_SSL_")} | {
            "KAFKA_BOOTSTRAP": f"127.0.0.1:{front_port}",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SSL_CA_FILE": str(secured.ca.cert),
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "tayori",
            "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            "HTTP_PORT": str(free_port()),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tayori",
            "contacts",
            env=sasl,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 180)
        assert process.returncode == 2, out.decode()
        return out.decode()
    finally:
        await front.stop()
        broker.stop()
