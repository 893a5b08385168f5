"""Typed settings from environment variables only; defaults live here, in code.

Each service has one settings class (a frozen dataclass). A field is read from the
variable named in its metadata (``env("NAME")``); secrets may also come from a file named
by ``NAME_FILE`` (Kubernetes Secrets mounted as files) and are never printed: ``repr``
masks every field marked ``secret=True``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


def env(name: str, default: Any = dataclasses.MISSING, *, secret: bool = False) -> Any:
    """Declare a settings field read from environment variable ``name``."""
    metadata = {"env": name, "secret": secret}
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


def masked_repr(obj: Any) -> str:
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        shown = "***" if f.metadata.get("secret") and value else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


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
    admin_token: str = env("TAYORI_ADMIN_TOKEN", "", secret=True)
    # Further bearer tokens: "role:token,role:token" (roles: admin, operator, viewer).
    api_tokens: str = env("TAYORI_API_TOKENS", "", secret=True)
    # HMAC keys for signed tokens: "kid:secret,kid:secret"; the first one signs.
    signing_keys: str = env("TAYORI_SIGNING_KEYS", "dev:insecure-dev-signing-key", secret=True)
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

    def __repr__(self) -> str:
        return masked_repr(self)

    def __post_init__(self) -> None:
        if self.kafka_profile not in ("kafka", "embedded"):
            raise ValueError(
                f"KAFKA_PROFILE: expected kafka or embedded, got {self.kafka_profile!r}"
            )

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
