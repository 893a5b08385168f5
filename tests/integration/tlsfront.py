"""A TLS endpoint in front of the embedded broker, with a CA and certificates made here.

The Tansu broker speaks plaintext; :class:`TlsFront` terminates TLS on its own port and
forwards each connection's bytes to the broker, which advertises the front's port
(``EmbeddedBroker(advertised_port=...)``) so clients that follow the metadata come back
through TLS. The front can require a client certificate (``ssl.CERT_REQUIRED``) and
records the subject of every one presented.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from libs.common.settings import CommonSettings
from tayori.embedded import EmbeddedBroker, free_port

#: the password of the test client's encrypted key (KAFKA_SSL_KEY_PASSWORD).
KEY_PASSWORD = "client-key-S3cret-0f1e"


@dataclass
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


class Authority:
    """A CA that issues server and client certificates into ``folder``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        self._subject = subject
        self._cert = (
            _builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = folder / f"{name}-ca.pem"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        common_name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
        password: str | None = None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _builder(subject, self._subject, key.public_key())
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else None
        usage = usage or x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = self.folder / f"{self.name}-{common_name}"
        issued = Issued(Path(f"{stem}.crt"), Path(f"{stem}.key"))
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password
            else serialization.NoEncryption()
        )
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )
        return issued


def _builder(subject: x509.Name, issuer: x509.Name, public_key: object) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


@dataclass
class TlsFront:
    """Terminates TLS on ``127.0.0.1:port`` with ``server`` and forwards to the broker at
    ``127.0.0.1:upstream``; with ``client_ca``, a client certificate it signed is required."""

    port: int
    upstream: int
    server: Issued
    client_ca: Path | None = None
    #: the common name of every client certificate presented, one per connection.
    clients: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _pumps: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server.cert, self.server.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, ssl=context, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        if peer:
            subject = dict(item for rdn in peer["subject"] for item in rdn)
            self.clients.append(subject.get("commonName", "?"))
        task = asyncio.current_task()
        assert task is not None
        self._pumps.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            self._pumps.discard(task)
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._pumps.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


@dataclass
class Secured:
    """A broker reached only through a TLS front that requires a client certificate."""

    broker: EmbeddedBroker
    front: TlsFront
    ca: Authority
    other_ca: Authority
    client: Issued
    folder: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.front.port}"

    def environ(self, prefix: str, **overrides: str) -> dict[str, str]:
        """The variables that point a service or a command at the front."""
        return {
            "KAFKA_BOOTSTRAP": self.bootstrap,
            "KAFKA_TOPIC_PREFIX": prefix,
            "KAFKA_SESSION_TIMEOUT_MS": "1000",
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CA_FILE": str(self.ca.cert),
            "KAFKA_SSL_CERT_FILE": str(self.client.cert),
            "KAFKA_SSL_KEY_FILE": str(self.client.key),
            "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
            **overrides,
        }

    def settings(self, prefix: str = "", **overrides: Any) -> CommonSettings:
        values: dict[str, Any] = dict(
            kafka_bootstrap=self.bootstrap,
            topic_prefix=prefix,
            service="test",
            kafka_session_timeout_ms=1000,
            kafka_fetch_max_wait_ms=20,
            kafka_security_protocol="SSL",
            kafka_ssl_ca_file=str(self.ca.cert),
            kafka_ssl_cert_file=str(self.client.cert),
            kafka_ssl_key_file=str(self.client.key),
            kafka_ssl_key_password=KEY_PASSWORD,
        )
        values.update(overrides)
        return CommonSettings(**values)


@pytest.fixture(scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    folder = tmp_path_factory.mktemp("tls")
    ca, other = Authority(folder, "tayori"), Authority(folder, "other")
    server = ca.issue("kafka", dns=("localhost",), ips=("127.0.0.1",))
    client = ca.issue("tayori-client", client=True, password=KEY_PASSWORD)
    front_port = free_port()
    broker = EmbeddedBroker(free_port(), log_path=folder / "broker.log", advertised_port=front_port)
    front = TlsFront(front_port, broker.port, server, client_ca=ca.cert)
    try:
        await front.start()
        yield Secured(broker, front, ca, other, client, folder)
    finally:
        await front.stop()
        broker.stop()
