"""Kafka security settings (libs/common/settings.py) and what every aiokafka client is given
(libs/common/kafkasecurity.py), with no broker: the TLS handshake and SCRAM exchange run
for real in tests/integration/test_kafka_tls.py."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from libs.common.kafkasecurity import bootstrap_servers, connection_options
from libs.common.settings import CommonSettings, ConfigError, load
from tests.integration.tlsfront import Authority

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "unit")
    client = ca.issue("client", client=True, password="pw-of-the-key")
    plain = ca.issue("plain", client=True)
    return {
        "ca": str(ca.cert),
        "cert": str(client.cert),
        "key": str(client.key),
        "plain_cert": str(plain.cert),
        "plain_key": str(plain.key),
    }


def test_plaintext_is_the_default_and_gives_no_tls_or_sasl() -> None:
    options = connection_options(CommonSettings(kafka_bootstrap="k1:9092,k2:9092"))
    assert options == {"bootstrap_servers": "k1:9092,k2:9092", "security_protocol": "PLAINTEXT"}


def test_ssl_verifies_the_server_and_its_name_by_default(pki: dict[str, str]) -> None:
    options = connection_options(
        CommonSettings(kafka_security_protocol="ssl", kafka_ssl_ca_file=pki["ca"])
    )
    assert options["security_protocol"] == "SSL"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert not any(key.startswith("sasl_") for key in options)
    off = connection_options(
        CommonSettings(
            kafka_security_protocol="SSL",
            kafka_ssl_ca_file=pki["ca"],
            kafka_ssl_check_hostname=False,
        )
    )["ssl_context"]
    # Off: the name is not checked, the chain still is.
    assert off.verify_mode is ssl.CERT_REQUIRED and not off.check_hostname


def test_ssl_without_a_ca_file_trusts_the_system_cas() -> None:
    context = connection_options(CommonSettings(kafka_security_protocol="SSL"))["ssl_context"]
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_sasl_gives_every_client_its_mechanism_and_credentials(
    protocol: str, mechanism: str, pki: dict[str, str]
) -> None:
    settings = CommonSettings(
        kafka_security_protocol=protocol,
        kafka_ssl_ca_file=pki["ca"] if protocol == "SASL_SSL" else "",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="tayori",
        kafka_sasl_password="sasl-pw",
    )
    options = connection_options(settings)
    assert options["security_protocol"] == protocol
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == (
        mechanism.upper(),
        "tayori",
    )
    assert options["sasl_plain_password"] == "sasl-pw"
    assert ("ssl_context" in options) is (protocol == "SASL_SSL")
    # Each kind of client takes them as they are (aiokafka checks them when made).
    producer = AIOKafkaProducer(**options, enable_idempotence=False)
    consumer = AIOKafkaConsumer(**options)
    admin = AIOKafkaAdminClient(**options)
    for client in (producer.client, consumer._client, admin._client):
        assert client._security_protocol == protocol
        assert client._sasl_mechanism == mechanism.upper()
        assert client._sasl_plain_username == "tayori"
        assert client._sasl_plain_password == "sasl-pw"
        assert client._ssl_context is options.get("ssl_context")
    await producer.stop()
    await consumer.stop()
    await admin.close()


def test_a_client_certificate_with_an_encrypted_key(pki: dict[str, str]) -> None:
    settings = CommonSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_file=pki["ca"],
        kafka_ssl_cert_file=pki["cert"],
        kafka_ssl_key_file=pki["key"],
        kafka_ssl_key_password="pw-of-the-key",
    )
    assert isinstance(connection_options(settings)["ssl_context"], ssl.SSLContext)
    wrong = CommonSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_file=pki["ca"],
        kafka_ssl_cert_file=pki["cert"],
        kafka_ssl_key_file=pki["key"],
        kafka_ssl_key_password="not-the-password",
    )
    with pytest.raises(ConfigError, match="KAFKA_SSL_KEY_PASSWORD"):
        connection_options(wrong)
    mismatched = CommonSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_cert_file=pki["cert"],
        kafka_ssl_key_file=pki["plain_key"],
    )
    with pytest.raises(ConfigError, match="KAFKA_SSL_CERT_FILE / KAFKA_SSL_KEY_FILE"):
        connection_options(mismatched)


def test_a_ca_file_that_is_no_certificate_names_the_variable(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    settings = CommonSettings(kafka_security_protocol="SSL", kafka_ssl_ca_file=str(bogus))
    with pytest.raises(ConfigError, match="KAFKA_SSL_CA_FILE"):
        connection_options(settings)


@pytest.mark.parametrize(
    ("environ", "said"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL: expected one of"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI"},
            "KAFKA_SASL_MECHANISM: expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM: expected one of"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN"},
            "KAFKA_SASL_USERNAME is required with KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        ),
        (
            {
                "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "KAFKA_SASL_MECHANISM": "PLAIN",
                "KAFKA_SASL_USERNAME": "u",
            },
            "KAFKA_SASL_PASSWORD is required",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "{cert}"},
            "KAFKA_SSL_CERT_FILE is set without KAFKA_SSL_KEY_FILE",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEY_FILE": "{key}"},
            "KAFKA_SSL_KEY_FILE is set without KAFKA_SSL_CERT_FILE",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEY_PASSWORD": "pw"},
            "KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_KEY_FILE",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_FILE": "/nowhere/ca.pem"},
            "KAFKA_SSL_CA_FILE: /nowhere/ca.pem does not exist",
        ),
        (
            {"KAFKA_SSL_CA_FILE": "{ca}"},
            "KAFKA_SSL_CA_FILE set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use them",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_USERNAME": "u"},
            "KAFKA_SASL_USERNAME set, but KAFKA_SECURITY_PROTOCOL=SSL does not use them",
        ),
        ({"KAFKA_SSL_CHECK_HOSTNAME": "perhaps"}, "KAFKA_SSL_CHECK_HOSTNAME: expected a boolean"),
    ],
)
def test_a_configuration_that_cannot_work_is_refused_naming_the_variable(
    environ: dict[str, str], said: str, pki: dict[str, str]
) -> None:
    filled = {name: value.format(**pki) for name, value in environ.items()}
    with pytest.raises(ValueError) as refused:
        load(CommonSettings, filled)
    assert said in str(refused.value)


def test_secrets_come_from_files_too(tmp_path: Path, pki: dict[str, str]) -> None:
    (tmp_path / "sasl").write_text("from-a-file\n")
    (tmp_path / "key").write_text("pw-of-the-key\n")
    settings = load(
        CommonSettings,
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SSL_CA_FILE": pki["ca"],
            "KAFKA_SSL_CERT_FILE": pki["cert"],
            "KAFKA_SSL_KEY_FILE": pki["key"],
            "KAFKA_SSL_KEY_PASSWORD_FILE": str(tmp_path / "key"),
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "tayori",
            "KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "sasl"),
        },
    )
    assert settings.kafka_sasl_password == "from-a-file"
    assert connection_options(settings)["sasl_plain_password"] == "from-a-file"
    shown = repr(settings)
    assert "from-a-file" not in shown and "pw-of-the-key" not in shown


def test_bootstrap_servers_are_split_with_the_default_port() -> None:
    assert bootstrap_servers("a:9093, b ,[::1]:9094") == [
        ("a", 9093),
        ("b", 9092),
        ("::1", 9094),
    ]


#: the aiokafka clients: each is made with ``**connection_options(...)`` everywhere.
CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}


def _client_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, whether it gets the options) of every aiokafka client made in ``path``: its
    ``**`` argument is ``connection_options(...)``, or a dict its function built from it
    (make_producer, ensure_topics)."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for function in functions:
        builds = any(_is_options_call(n) for n in ast.walk(function))
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in CLIENTS:
                continue
            spread = [k.value for k in node.keywords if k.arg is None]
            ok = any(_is_options_call(v) or (isinstance(v, ast.Name) and builds) for v in spread)
            found.append((node.lineno, ok))
    return sorted(set(found))


def _is_options_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "connection_options"


def test_every_kafka_client_of_the_code_base_gets_the_connection_options() -> None:
    """Services and operator commands alike (tests and benchmarks talk to the embedded
    broker and are left out): a client made without the options would ignore TLS and SASL."""
    made = []
    for folder in ("libs", "services", "tayori"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, ok in _client_calls(path):
                made.append(f"{path.relative_to(ROOT)}:{line}")
                assert ok, f"{path.relative_to(ROOT)}:{line} is made without connection_options"
    # make_producer, ensure_topics, Consumer, the fence's two, the CLI's reader and admin,
    # and offsets' two consumers: if this shrinks, the walk above stopped finding them.
    assert len(made) >= 8, made
