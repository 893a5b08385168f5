"""How every Kafka client of Tayori connects: TLS and SASL from the settings, in one place.

:func:`connection_options` gives the keyword arguments every aiokafka client takes
(``bootstrap_servers``, ``security_protocol``, ``ssl_context``, ``sasl_*``): producers,
consumers and admin clients, in the services and in the operator commands, are all made
with ``**connection_options(settings)`` (tests/unit/test_kafkasecurity.py checks that no
client is made without it).

:func:`check_connection` connects to the bootstrap servers once, TLS handshake and SASL
exchange included, before a service starts its clients: a certificate the configured CA
does not verify, a host name the certificate does not name, a client certificate the
broker wants and did not get, or credentials the broker refuses are a
:class:`~libs.common.settings.ConfigError` naming the bootstrap server and the reason —
one line at start instead of a client that retries for ever with "Unable to bootstrap".
A broker that does not answer at all is weather (an ``OSError``, retried by the caller).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import Any

from aiokafka import errors as kafka_errors
from aiokafka.conn import create_conn

from libs.common.settings import CommonSettings, ConfigError

#: how long the check waits for one bootstrap server to answer.
CHECK_TIMEOUT_MS = 10_000

#: what a broker says when it refuses the SASL exchange.
_SASL_REFUSALS = (
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.IllegalSaslStateError,
)


def connection_options(settings: CommonSettings) -> dict[str, Any]:
    """The keyword arguments that point an aiokafka client at the configured cluster:
    bootstrap servers, security protocol, TLS context and SASL credentials."""
    protocol = settings.kafka_security_protocol.upper()
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": protocol,
    }
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(
            settings.kafka_ssl_ca_file,
            settings.kafka_ssl_cert_file,
            settings.kafka_ssl_key_file,
            settings.kafka_ssl_key_password,
            settings.kafka_ssl_check_hostname,
        )
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism.upper()
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


@functools.lru_cache(maxsize=8)
def _ssl_context(
    ca_file: str, cert_file: str, key_file: str, key_password: str, check_hostname: bool
) -> ssl.SSLContext:
    """A client TLS context: the server's certificate is verified against ``ca_file`` (the
    system's CAs when empty: managed clusters with public certificates), its host name
    checked unless ``check_hostname`` is off, and ``cert_file``/``key_file`` presented
    when the broker asks for a client certificate. One context per configuration."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"KAFKA_SSL_CA_FILE: cannot read CA certificates: {exc}") from None
    context.check_hostname = check_hostname
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file or None, password=key_password or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "KAFKA_SSL_CERT_FILE / KAFKA_SSL_KEY_FILE: cannot load the client certificate "
                f"and key (wrong KAFKA_SSL_KEY_PASSWORD, or a key of another certificate?): {exc}"
            ) from None
    return context


def bootstrap_servers(bootstrap: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as (host, port) pairs (port 9092 when none is given)."""
    servers = []
    for entry in bootstrap.split(","):
        entry = entry.strip()
        if not entry:
            continue
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "9092")
        servers.append((host.strip("[]"), int(port)))
    return servers


async def check_connection(settings: CommonSettings, client_id: str = "tayori-check") -> None:
    """Connect to the bootstrap servers as the clients will and return at the first that
    accepts: first the transport (TLS handshake and a request), then, with SASL, a login.

    A refusal that no retry can mend (a certificate the CA does not verify, a host name
    it does not name, a TLS alert, a SASL mechanism or credentials the broker refuses) is a
    :class:`ConfigError` naming the server and why. A server that does not answer, or
    closes the connection without saying why, is a ``KafkaConnectionError`` (weather: the
    caller retries) that names the likely cause."""
    options = connection_options(settings)
    options.pop("bootstrap_servers")
    protocol = options["security_protocol"]
    transport = {k: v for k, v in options.items() if not k.startswith("sasl_")}
    transport["security_protocol"] = {"SASL_SSL": "SSL", "SASL_PLAINTEXT": "PLAINTEXT"}.get(
        protocol, protocol
    )
    mechanism = options.get("sasl_mechanism")
    refusals: list[str] = []
    unreachable: list[str] = []
    for host, port in bootstrap_servers(settings.kafka_bootstrap):
        where = f"{host}:{port}"
        stage = "transport"
        try:
            await _connect(host, port, client_id, transport)
            if mechanism:
                stage = "sasl"
                await _connect(host, port, client_id, options)
            return
        except ssl.SSLCertVerificationError as exc:
            refusals.append(
                f"{where}: TLS certificate verify failed: {exc.verify_message} ({_tls_hint(exc)})"
            )
        except ssl.SSLError as exc:
            refusals.append(f"{where}: TLS: {_tls_reason(exc)}")
        except _SASL_REFUSALS as exc:
            refusals.append(f"{where}: SASL {mechanism}: {_said(exc)}")
        except (KeyError, ValueError) as exc:
            # aiokafka's SCRAM client meeting a server-final message that is an error
            # ("e=unknown-user", "e=invalid-proof") or a server signature that does not
            # match: the credentials are wrong.
            if stage != "sasl":
                raise
            refusals.append(
                f"{where}: SASL {mechanism}: the broker refused the credentials of "
                f"KAFKA_SASL_USERNAME ({type(exc).__name__}: {exc})"
            )
        except (OSError, TimeoutError, kafka_errors.KafkaError) as exc:
            cause = _ssl_cause(exc)
            if cause is not None:
                refusals.append(f"{where}: TLS: {_tls_reason(cause)}")
            else:
                unreachable.append(f"{where}: {_said(exc)}{_closed_hint(exc, stage, settings)}")
    if refusals:
        raise ConfigError(f"Kafka ({protocol}) refused the connection: " + "; ".join(refusals))
    raise kafka_errors.KafkaConnectionError(
        "no Kafka bootstrap server answered: " + "; ".join(unreachable)
    )


async def _connect(host: str, port: int, client_id: str, options: dict[str, Any]) -> None:
    """One connection as aiokafka makes it (TLS, ApiVersions, SASL), closed again."""
    conn = await create_conn(
        host, port, client_id=client_id, request_timeout_ms=CHECK_TIMEOUT_MS, **options
    )
    conn.close()


def _closed_hint(exc: BaseException, stage: str, settings: CommonSettings) -> str:
    """Why a broker may have closed a connection it had accepted, without a word."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, asyncio.IncompleteReadError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return ""
    if stage == "sasl":
        return (
            " (closed during the SASL exchange: does the broker offer KAFKA_SASL_MECHANISM="
            f"{settings.kafka_sasl_mechanism.upper()}, and know KAFKA_SASL_USERNAME?)"
        )
    if settings.kafka_security_protocol.upper() in ("SSL", "SASL_SSL"):
        if not settings.kafka_ssl_cert_file:
            return (
                " (closed after the TLS handshake: a broker that wants a client certificate "
                "does that: KAFKA_SSL_CERT_FILE, KAFKA_SSL_KEY_FILE)"
            )
        return " (closed after the TLS handshake: does the broker trust the client certificate?)"
    return " (closed at once: a TLS or SASL listener? KAFKA_SECURITY_PROTOCOL)"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under a connection aiokafka reports as closed, if that is what it is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_hint(exc: ssl.SSLCertVerificationError) -> str:
    if "hostname" in (exc.verify_message or "").lower() or "IP address mismatch" in str(exc):
        return "the broker's certificate does not name this host: KAFKA_BOOTSTRAP"
    return "is KAFKA_SSL_CA_FILE the CA that signed the broker's certificate?"


def _tls_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or str(exc)
    if "CERTIFICATE_REQUIRED" in reason.upper():
        return (
            f"{reason}: the broker wants a client certificate "
            "(KAFKA_SSL_CERT_FILE, KAFKA_SSL_KEY_FILE)"
        )
    if "WRONG_VERSION_NUMBER" in reason.upper() or "RECORD_LAYER" in reason.upper():
        return f"{reason}: is this a TLS listener (KAFKA_SECURITY_PROTOCOL)?"
    return reason


def _said(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
