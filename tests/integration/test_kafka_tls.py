"""Kafka over TLS and SASL, for real: a TLS endpoint (tests/integration/tlsfront.py) in
front of an embedded broker of this module's own, with a CA and certificates made here.

Covered: records round-trip through TLS with a client certificate (an encrypted key and
its password) between a producer and the shared Consumer loop; the operator commands
(admin client, reader, producer) go through the same options; a CA that did not sign the
broker's certificate and a certificate for another host name are refused at once with the
server and the reason named, and a service given a wrong CA exits with one JSON log line;
a missing or untrusted client certificate (the broker closes the connection after the
handshake) is retried with the likely cause named. SASL: the embedded broker (Tansu 0.6,
``--authentication``) speaks SCRAM-SHA-256/512 but cannot be given a user while it
requires authentication (its ``user create`` is refused, and its memory storage does not
outlive a restart), and does not offer PLAIN: the SCRAM exchange is run against it up to
the broker's refusal, in plaintext and through TLS, and PLAIN's closed connection is
named. A successful SASL login is not covered here (README, "Connecting to a secured
Kafka"; tests/unit/test_kafkasecurity.py checks what aiokafka is given).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError

from libs.common.kafka import Consumer, Message, Publisher, ensure_topics, make_producer
from libs.common.kafkasecurity import check_connection
from libs.common.settings import ConfigError
from libs.common.topics import Topic
from tayori import operate
from tayori.embedded import EmbeddedBroker, free_port
from tests.conftest import ADMIN_TOKEN, Stack, eventually
from tests.integration.test_dlq_cli import event
from tests.integration.tlsfront import Secured, TlsFront
from tests.integration.tlsfront import secured as secured  # the fixture

pytestmark = pytest.mark.integration

EVENTS = Topic.CONTACTS_EVENTS
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def tls_prefix(secured: Secured) -> str:
    prefix = f"s{uuid.uuid4().hex[:10]}."
    await ensure_topics(secured.settings(), prefix, partitions=2)
    return prefix


async def test_records_round_trip_through_tls_with_a_client_certificate(
    secured: Secured, tls_prefix: str
) -> None:
    settings = secured.settings(tls_prefix)
    seen_before = len(secured.front.clients)
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    received: list[Message] = []

    async def handler(batch: list[Message]) -> None:
        received.extend(batch)

    publisher = Publisher(settings, producer)
    consumer = Consumer(settings, publisher, group="tls.test", topics=[EVENTS], handler=handler)
    environ = secured.environ(tls_prefix)

    async def both_committed() -> bool:
        # The two keys may land on two partitions, handled in two rounds: the poison record is
        # dead-lettered when its offset is committed, not when the good one is received.
        shown = await _tayori(environ, "offsets", "show", "--group", "tls.test", "--json")
        return sum(p["committed"] or 0 for p in json.loads(shown[1])["partitions"]) == 2

    await consumer.start()
    task = asyncio.ensure_future(consumer.run())
    try:
        await publisher.send_and_wait(EVENTS, "k1", event("tls@example.jp"))
        # A record no codec reads: the loop dead-letters it (over TLS too).
        await (await publisher.send_raw(EVENTS, "k2", b"\x00not avro"))
        await eventually(both_committed)
        assert len(received) == 1
        assert received[0].value["email"] == "tls@example.jp"
        assert received[0].key == "k1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
    presented = secured.front.clients[seen_before:]
    # Bootstrap and broker connections of the producer and the consumer, every one of them
    # through the front (the broker advertises the front's port), with the client's cert.
    assert len(presented) >= 3 and set(presented) == {"tayori-client"}, presented

    # The operator commands: the admin client, the reader and the producer, same options.
    listing = await _tayori(environ, "dlq", "list", "--json")
    assert listing[0] == 0, listing
    counts = {row["topic"]: row["records"] for row in json.loads(listing[1])}
    assert counts == {"contacts.events": 1}, listing
    replay = await _tayori(environ, "dlq", "replay", "contacts.events", "--all")
    assert replay[0] == 0, replay
    shown = await _tayori(environ, "offsets", "show", "--group", "tls.test", "--json")
    assert shown[0] == 0, shown
    assert sum(p["committed"] or 0 for p in json.loads(shown[1])["partitions"]) == 2, shown


async def test_a_wrong_ca_is_refused_naming_the_server_and_the_reason(secured: Secured) -> None:
    settings = secured.settings(kafka_ssl_ca_file=str(secured.other_ca.cert))
    with pytest.raises(ConfigError) as refused:
        await check_connection(settings)
    said = str(refused.value)
    assert secured.bootstrap in said and "certificate verify failed" in said, said
    assert "KAFKA_SSL_CA_FILE" in said, said

    environ = secured.environ("", KAFKA_SSL_CA_FILE=str(secured.other_ca.cert))
    status, out, err = await _tayori(environ, "dlq", "list")
    assert (status, out) == (2, ""), err
    assert err.startswith("tayori: Kafka (SSL) refused the connection: ") and err.count("\n") == 1
    assert secured.bootstrap in err and "certificate verify failed" in err


async def test_the_host_name_is_verified_unless_turned_off(secured: Secured) -> None:
    elsewhere = secured.ca.issue("elsewhere", dns=("elsewhere.example",))
    front = TlsFront(free_port(), secured.broker.port, elsewhere)
    await front.start()
    try:
        bootstrap = f"127.0.0.1:{front.port}"
        with pytest.raises(ConfigError) as refused:
            await check_connection(secured.settings(kafka_bootstrap=bootstrap))
        said = str(refused.value)
        assert bootstrap in said and "mismatch" in said, said
        # Off: the chain is still verified against the CA, the name is not.
        await check_connection(
            secured.settings(kafka_bootstrap=bootstrap, kafka_ssl_check_hostname=False)
        )
        with pytest.raises(ConfigError):
            await check_connection(
                secured.settings(
                    kafka_bootstrap=bootstrap,
                    kafka_ssl_check_hostname=False,
                    kafka_ssl_ca_file=str(secured.other_ca.cert),
                )
            )
    finally:
        await front.stop()


async def test_a_broker_that_wants_a_client_certificate_refuses_one_without(
    secured: Secured,
) -> None:
    """The front ends the handshake with a TLS alert, which asyncio's TLS reads as the end
    of the stream: a closed connection (retried, as a broker restarting could do the same)
    that names the likely cause."""
    settings = secured.settings(
        kafka_ssl_cert_file="", kafka_ssl_key_file="", kafka_ssl_key_password=""
    )
    with pytest.raises(KafkaConnectionError) as closed:
        await check_connection(settings)
    said = str(closed.value)
    assert secured.bootstrap in said and "KAFKA_SSL_CERT_FILE" in said, said
    # A certificate the broker's CA did not sign: the same.
    stranger = secured.other_ca.issue("stranger", client=True)
    settings = secured.settings(
        kafka_ssl_cert_file=str(stranger.cert),
        kafka_ssl_key_file=str(stranger.key),
        kafka_ssl_key_password="",
    )
    with pytest.raises(KafkaConnectionError, match="trust the client certificate"):
        await check_connection(settings)


async def test_a_wrong_key_password_names_the_variable(secured: Secured) -> None:
    with pytest.raises(ConfigError, match="KAFKA_SSL_KEY_PASSWORD"):
        await check_connection(secured.settings(kafka_ssl_key_password="not-it"))


async def test_a_service_given_a_wrong_ca_exits_with_one_json_line(
    secured: Secured, stack: Stack, database: str, tls_prefix: str
) -> None:
    env = dict(
        os.environ,
        **secured.environ(tls_prefix, KAFKA_SSL_CA_FILE=str(secured.other_ca.cert)),
        DATABASE_URL=database,
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(free_port()),
        TAYORI_ADMIN_TOKEN=ADMIN_TOKEN,
        TAYORI_SIGNING_KEYS="k1:a-test-signing-key-of-this-test",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tayori",
        "suppression",
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 2, err.decode()
    lines = [json.loads(line) for line in (out + err).decode().splitlines()]  # JSON only
    refused = [line for line in lines if line["level"] == "error"]
    assert len(refused) == 1 and refused[0]["event"] == "service_start_refused", lines
    (problem,) = refused[0]["problems"]
    assert secured.bootstrap in problem and "certificate verify failed" in problem, problem


# SASL against the embedded broker -------------------------------------------------------


@pytest.fixture(scope="module")
async def authenticating(secured: Secured) -> AsyncIterator[tuple[EmbeddedBroker, TlsFront]]:
    """A broker that requires SASL, reached directly and through a TLS front."""
    front_port = free_port()
    broker = EmbeddedBroker(
        free_port(),
        log_path=secured.folder / "sasl-broker.log",
        advertised_port=front_port,
        authentication=True,
    )
    server = secured.ca.issue("sasl-kafka", ips=("127.0.0.1",))
    front = TlsFront(front_port, broker.port, server)
    try:
        await front.start()
        yield broker, front
    finally:
        await front.stop()
        broker.stop()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_scram_is_spoken_and_a_refusal_names_the_mechanism(
    authenticating: tuple[EmbeddedBroker, TlsFront], secured: Secured, mechanism: str
) -> None:
    broker, front = authenticating
    sasl = dict(
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="tayori",
        kafka_sasl_password="sasl-S3cret",
        kafka_ssl_cert_file="",
        kafka_ssl_key_file="",
        kafka_ssl_key_password="",
    )
    plaintext = secured.settings(
        kafka_bootstrap=broker.bootstrap,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_ssl_ca_file="",
        **sasl,
    )
    over_tls = secured.settings(
        kafka_bootstrap=f"127.0.0.1:{front.port}", kafka_security_protocol="SASL_SSL", **sasl
    )
    for settings in (plaintext, over_tls):
        with pytest.raises(ConfigError) as refused:
            await check_connection(settings)
        said = str(refused.value)
        assert settings.kafka_bootstrap in said and f"SASL {mechanism}" in said, said
        assert "sasl-S3cret" not in said


async def test_plain_on_a_broker_that_does_not_offer_it_is_named(
    authenticating: tuple[EmbeddedBroker, TlsFront], secured: Secured
) -> None:
    broker, _ = authenticating
    settings = secured.settings(
        kafka_bootstrap=broker.bootstrap,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_ssl_ca_file="",
        kafka_ssl_cert_file="",
        kafka_ssl_key_file="",
        kafka_ssl_key_password="",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="tayori",
        kafka_sasl_password="sasl-S3cret",
    )
    # Tansu closes the connection instead of answering the handshake with the mechanisms it
    # has (Apache Kafka answers, and that is a ConfigError like the refusals above).
    with pytest.raises(KafkaConnectionError) as closed:
        await check_connection(settings)
    said = str(closed.value)
    assert broker.bootstrap in said and "KAFKA_SASL_MECHANISM=PLAIN" in said, said
    assert "sasl-S3cret" not in said


# helpers ----------------------------------------------------------------------------------


async def _tayori(environ: dict[str, str], *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await operate.main_async(argv, environ, out, err)
    return status, out.getvalue(), err.getvalue()
