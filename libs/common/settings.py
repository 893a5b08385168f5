"""Typed settings from environment variables only; defaults live here, in code.

Each service has one settings class (a frozen dataclass). A field is read from the
variable named in its metadata (``env("NAME")``); secrets may also come from a file named
by ``NAME_FILE`` (Kubernetes Secrets mounted as files) and are never printed: ``repr``
masks every field marked ``secret=True`` and the password of every URL
(``postgresql://tayori:***@host/db``). :func:`refusals` is what a service refuses to
start with: a placeholder where a secret belongs, a required secret left empty, the
published development signing key outside the dev profile.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, urlsplit

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that cannot work as given, named in the message: the service refuses to
    start (one log line, exit status 2) instead of retrying what no retry mends."""


def env(
    name: str,
    default: Any = dataclasses.MISSING,
    *,
    secret: bool = False,
    required: bool = False,
) -> Any:
    """Declare a settings field read from environment variable ``name``; ``required``: a
    service refuses to start while it is empty (:func:`refusals`)."""
    metadata = {"env": name, "secret": secret, "required": required}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _parse(raw: str, kind: Any, name: str) -> Any:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(kind) if a is not type(None)]
        if raw == "":
            return None
        return _parse(raw, inner[0], name)
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {raw!r}")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    if kind is Path:
        return Path(raw)
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def load(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from ``environ`` (default ``os.environ``); ``overrides`` win."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        name = f.metadata.get("env")
        if not name:
            continue
        raw = environ.get(name)
        if raw is None and f.metadata.get("secret") and environ.get(f"{name}_FILE"):
            raw = Path(environ[f"{name}_FILE"]).read_text().strip()
        if raw is not None:
            values[f.name] = _parse(raw, hints[f.name], name)
    return cls(**values)


#: the password of a URL: ``scheme://user:PASSWORD@`` (DATABASE_URL and any other URL),
#: up to the last ``@`` before the host (an unencoded ``@`` in it stays hidden).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^\s/]*(?=@)")


#: a password in a URL's query (libpq and asyncpg take ``?password=``).
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:ssl)?password=)[^&#\s'\"]*", re.IGNORECASE)


def mask_urls(text: str) -> str:
    """``postgresql://tayori:S3cret@db/tayori`` → ``postgresql://tayori:***@db/tayori``
    (and ``?password=S3cret`` → ``?password=***``)."""
    return _QUERY_PASSWORD.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>***", text))


def masked_repr(obj: Any) -> str:
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        shown = "***" if f.metadata.get("secret") and value else mask_urls(repr(value))
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


#: what templates put where a secret belongs (compared without case and punctuation).
PLACEHOLDERS = frozenset(
    {"replaceme", "changeme", "changeit", "changethis", "placeholder", "todo", "fixme", "xxx"}
)
#: the development signing keys: published in this repository, so they sign nothing real.
DEV_SIGNING_KEYS = "dev:insecure-dev-signing-key"
#: TAYORI_PROFILE: ``production`` refuses the development signing key, ``dev`` (``tayori
#: dev``, docker-compose.yml) accepts it.
PROFILES = ("production", "dev")


def _placeholder(value: str) -> str | None:
    """The placeholder among the parts of ``value`` (``k1:REPLACE_ME``, ``operator:changeme,
    viewer:…``), if any."""
    for part in re.split(r"[\s,:;@/]+", value):
        if re.sub(r"[^a-z0-9]", "", part.lower()) in PLACEHOLDERS:
            return part
    return None


def refusals(settings: Any) -> list[str]:
    """Why a service must not start with these settings, one line per variable: a secret
    (or a URL's password) that is a template's placeholder, a required secret left empty,
    the development signing key outside the dev profile."""
    problems = []
    for f in dataclasses.fields(settings):
        name, value = f.metadata.get("env"), getattr(settings, f.name)
        if not name or not isinstance(value, str):
            continue
        if f.metadata.get("required") and not value.strip():
            problems.append(f"{name} is required and empty")
            continue
        guarded = value if f.metadata.get("secret") else _url_password(value)
        found = _placeholder(guarded) if guarded else None
        if found is not None:
            problems.append(
                f"{name} holds the placeholder {found!r} where a secret belongs: set the real value"
            )
    profile = getattr(settings, "profile", "production")
    dev_secret = DEV_SIGNING_KEYS.partition(":")[2]
    keys = getattr(settings, "signing_keys", "")
    if profile != "dev" and any(k.partition(":")[2].strip() == dev_secret for k in keys.split(",")):
        problems.append(
            "TAYORI_SIGNING_KEYS is unset or holds the published development key: set keys of "
            "your own (kid:secret,…; e.g. k1:$(openssl rand -base64 32)); only "
            "TAYORI_PROFILE=dev accepts the development key"
        )
    return problems


def _url_password(value: str) -> str | None:
    """The password a URL holds, in its user part or its query."""
    if "://" not in value:
        return None
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return None
    query = parse_qs(parts.query)
    found = [parts.password or "", *query.get("password", []), *query.get("sslpassword", [])]
    return ",".join(p for p in found if p) or None


@dataclass(frozen=True, repr=False)
class CommonSettings:
    """What every service needs: where its dependencies are and how it is reached."""

    service: str = "tayori"
    database_url: str = env("DATABASE_URL", "postgresql://postgres@localhost/tayori")
    kafka_bootstrap: str = env("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    topic_prefix: str = env("KAFKA_TOPIC_PREFIX", "")
    # Apache Kafka refuses session timeouts under group.min.session.timeout.ms (6 s);
    # the embedded broker makes a joining member wait half of it, so `tayori dev` lowers it.
    kafka_session_timeout_ms: int = env("KAFKA_SESSION_TIMEOUT_MS", 10_000)
    # The broker the consumers pace their fetches for (libs/common/kafka.Pacing): "kafka"
    # (Apache Kafka and its kind, which answer a fetch as soon as records arrive) or
    # "embedded" (the dev profile's broker, which waits out every fetch).
    kafka_profile: str = env("KAFKA_PROFILE", "kafka")
    # The fetch wait: a ceiling on Apache Kafka (its default, 500 ms); on the embedded broker
    # the latency floor of most consumers while records come (the dev profile sets 50).
    kafka_fetch_max_wait_ms: int = env("KAFKA_FETCH_MAX_WAIT_MS", 500)
    # Embedded profile only: the fetch wait of paths a person waits on while records come.
    kafka_fast_fetch_max_wait_ms: int = env("KAFKA_FAST_FETCH_MAX_WAIT_MS", 10)
    http_host: str = env("HTTP_HOST", "0.0.0.0")
    http_port: int = env("HTTP_PORT", 8080)
    admin_token: str = env("TAYORI_ADMIN_TOKEN", "", secret=True, required=True)
    # Further bearer tokens: "role:token,role:token" (roles: admin, operator, viewer).
    api_tokens: str = env("TAYORI_API_TOKENS", "", secret=True)
    # HMAC keys for signed tokens: "kid:secret,kid:secret"; the first one signs.
    # The development keys by default, which only TAYORI_PROFILE=dev accepts (refusals).
    signing_keys: str = env("TAYORI_SIGNING_KEYS", DEV_SIGNING_KEYS, secret=True, required=True)
    public_base_url: str = env("TAYORI_PUBLIC_URL", "http://127.0.0.1:8082")
    # Where the public tracking endpoints (/t/o, /t/c: bounce_processor) are reached.
    tracking_base_url: str = env("TAYORI_TRACKING_URL", "http://127.0.0.1:8085")
    db_pool_size: int = env("DB_POOL_SIZE", 10)
    # How long opening one database connection may take before it counts as a failure
    # (retried by loops, 503 for a request).
    db_connect_timeout_seconds: float = env("DB_CONNECT_TIMEOUT_SECONDS", 10.0)
    # Schema Registry (Confluent REST API): where consumers of the upstream topics find the
    # writer schema of a record in the Confluent wire format (libs/common/registry.py), and
    # where `tayori schemas register` registers every topic's schemas. Empty: not used.
    schema_registry_url: str = env("SCHEMA_REGISTRY_URL", "")
    schema_registry_username: str = env("SCHEMA_REGISTRY_USERNAME", "")
    schema_registry_password: str = env("SCHEMA_REGISTRY_PASSWORD", "", secret=True)
    dlq_limit_ratio: float = env("DLQ_LIMIT_RATIO", 0.5)
    dlq_limit_min: int = env("DLQ_LIMIT_MIN", 100)
    log_level: str = env("LOG_LEVEL", "info")
    # production (default) or dev: only dev accepts the development signing key.
    profile: str = env("TAYORI_PROFILE", "production")

    # Kafka security (README "Connecting to a secured Kafka"; libs/common/kafkasecurity.py).
    # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    kafka_security_protocol: str = env("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    # PEM CA bundle that verifies the brokers' certificates (empty: the system's CAs).
    kafka_ssl_ca_file: str = env("KAFKA_SSL_CA_FILE", "")
    # Client certificate and its key (PEM; both, or neither), for brokers that ask for one.
    kafka_ssl_cert_file: str = env("KAFKA_SSL_CERT_FILE", "")
    kafka_ssl_key_file: str = env("KAFKA_SSL_KEY_FILE", "")
    kafka_ssl_key_password: str = env("KAFKA_SSL_KEY_PASSWORD", "", secret=True)
    # Whether the broker's certificate must name the host connected to (off: only the CA).
    kafka_ssl_check_hostname: bool = env("KAFKA_SSL_CHECK_HOSTNAME", True)
    # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols only).
    kafka_sasl_mechanism: str = env("KAFKA_SASL_MECHANISM", "")
    kafka_sasl_username: str = env("KAFKA_SASL_USERNAME", "")
    kafka_sasl_password: str = env("KAFKA_SASL_PASSWORD", "", secret=True)

    def __repr__(self) -> str:
        return masked_repr(self)

    def __post_init__(self) -> None:
        if self.kafka_profile not in ("kafka", "embedded"):
            raise ValueError(
                f"KAFKA_PROFILE: expected kafka or embedded, got {self.kafka_profile!r}"
            )
        if self.profile not in PROFILES:
            raise ConfigError(
                f"TAYORI_PROFILE: expected {' or '.join(PROFILES)}, got {self.profile!r}"
            )
        _check_kafka_security(self)

    def bearer_tokens(self) -> dict[str, str]:
        """token → role for every configured API token."""
        tokens: dict[str, str] = {}
        if self.admin_token:
            tokens[self.admin_token] = "admin"
        for pair in self.api_tokens.split(","):
            role, _, token = pair.strip().partition(":")
            if token:
                tokens[token] = role
        return tokens


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _check_kafka_security(s: CommonSettings) -> None:
    """Refuse a Kafka security configuration that cannot work, naming the variable."""
    protocol = s.kafka_security_protocol.upper()
    if protocol not in KAFKA_SECURITY_PROTOCOLS:
        raise ConfigError(
            f"KAFKA_SECURITY_PROTOCOL: expected one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, "
            f"got {s.kafka_security_protocol!r}"
        )
    tls = {
        "KAFKA_SSL_CA_FILE": s.kafka_ssl_ca_file,
        "KAFKA_SSL_CERT_FILE": s.kafka_ssl_cert_file,
        "KAFKA_SSL_KEY_FILE": s.kafka_ssl_key_file,
        "KAFKA_SSL_KEY_PASSWORD": s.kafka_ssl_key_password,
    }
    sasl = {
        "KAFKA_SASL_MECHANISM": s.kafka_sasl_mechanism,
        "KAFKA_SASL_USERNAME": s.kafka_sasl_username,
        "KAFKA_SASL_PASSWORD": s.kafka_sasl_password,
    }
    if protocol not in ("SSL", "SASL_SSL"):
        _not_used(tls, protocol, "TLS (SSL or SASL_SSL)")
    if protocol not in ("SASL_PLAINTEXT", "SASL_SSL"):
        _not_used(sasl, protocol, "SASL (SASL_PLAINTEXT or SASL_SSL)")
    else:
        if s.kafka_sasl_mechanism.upper() not in KAFKA_SASL_MECHANISMS:
            raise ConfigError(
                f"KAFKA_SASL_MECHANISM: expected one of {', '.join(KAFKA_SASL_MECHANISMS)} "
                f"with KAFKA_SECURITY_PROTOCOL={protocol}, got {s.kafka_sasl_mechanism!r}"
            )
        for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
            if not sasl[name]:
                raise ConfigError(f"{name} is required with KAFKA_SECURITY_PROTOCOL={protocol}")
    if bool(s.kafka_ssl_cert_file) != bool(s.kafka_ssl_key_file):
        given, missing = (
            ("KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE")
            if s.kafka_ssl_cert_file
            else ("KAFKA_SSL_KEY_FILE", "KAFKA_SSL_CERT_FILE")
        )
        raise ConfigError(
            f"{given} is set without {missing}: a client certificate needs both "
            "(name the same file twice when it holds both)"
        )
    if s.kafka_ssl_key_password and not s.kafka_ssl_key_file:
        raise ConfigError("KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_KEY_FILE")
    for name in ("KAFKA_SSL_CA_FILE", "KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE"):
        path = tls[name]
        if path and not os.access(path, os.R_OK):
            why = "does not exist" if not os.path.exists(path) else "cannot be read"
            raise ConfigError(f"{name}: {path} {why}")


def _not_used(given: dict[str, str], protocol: str, wants: str) -> None:
    named = [name for name, value in given.items() if value]
    if named:
        raise ConfigError(
            f"{', '.join(named)} set, but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
            f"them: they need {wants}"
        )
