"""A Schema Registry client (the Confluent REST API, the subset Tayori uses).

Upstream systems that produce with Confluent's serializers write the Confluent wire format
(magic byte 0, a 4-byte big-endian schema id, the Avro body): the writer schema is not in
the record but in a registry, under that id. A consumer of an upstream topic
(``kafka.Consumer``) asks :meth:`SchemaRegistry.prefetch` for the ids of a poll's records
before decoding them; :func:`libs.common.avro.decode` then finds each writer schema with
:meth:`SchemaRegistry.writer`, without I/O. An id never changes what it names, so a schema
is fetched once per process.

A registry that does not answer (refused, timed out, 5xx, credentials refused) is weather:
the lookup is retried for as long as it takes and the records wait uncommitted. An id the
registry does not know (404 with error code 40403), or a schema that is not Avro, makes the
records naming it invalid: they are dead-lettered with that reason.

``tayori schemas register`` (tayori/schemas.py) writes every topic's schema here with
:meth:`SchemaRegistry.register` and :meth:`SchemaRegistry.set_compatibility`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import fastavro
from fastavro.schema import to_parsing_canonical_form
from fastavro.types import Schema

from libs.common.errors import InvalidMessage, TransientError
from libs.common.logging import get_logger
from libs.common.retry import FOREVER, retry
from libs.common.settings import CommonSettings
from libs.common.topics import Topic

log = get_logger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
#: Confluent's error codes: schema (id) not found, subject not found, version not found,
#: no compatibility level set for the subject.
SCHEMA_NOT_FOUND = 40403
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SUBJECT_LEVEL_NOT_CONFIGURED = 40408
#: one request to the registry, connection included, in seconds.
TIMEOUT_SECONDS = 10.0

#: the Confluent wire format: this byte, then the schema id in 4 bytes big-endian.
MAGIC = 0
PREFIX_BYTES = 5


@dataclass(frozen=True)
class WriterSchema:
    """A writer schema from the registry: parsed for fastavro, and its Parsing Canonical
    Form (equal to the reader's: the record is read with the compiled reader)."""

    schema_id: int
    parsed: Schema
    canonical: str
    name: str


class RegistryError(Exception):
    """The registry refused a request for a reason a retry does not change (an
    incompatible schema, a schema it cannot parse); ``code`` is its error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def shown_url(url: str) -> str:
    """``url`` without credentials (``https://user:secret@host`` → ``https://host``)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url.rstrip("/")
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host)).rstrip("/")


def confluent_schema_id(data: bytes | None) -> int | None:
    """The schema id of a value in the Confluent wire format (None if it is not)."""
    if data is None or len(data) < PREFIX_BYTES or data[0] != MAGIC:
        return None
    return int.from_bytes(data[1:PREFIX_BYTES], "big")


def registry_for(settings: CommonSettings, topics: Iterable[Topic]) -> SchemaRegistry | None:
    """The registry a consumer of ``topics`` reads writer schemas from: one when
    SCHEMA_REGISTRY_URL is set and an upstream topic is among them."""
    if not settings.schema_registry_url or not any(topic.upstream for topic in topics):
        return None
    return from_settings(settings)


def from_settings(settings: CommonSettings) -> SchemaRegistry:
    return SchemaRegistry(
        settings.schema_registry_url,
        settings.schema_registry_username,
        settings.schema_registry_password,
        service=settings.service,
    )


class SchemaRegistry:
    """One registry at ``url`` (optionally with HTTP basic auth), its schemas cached by id."""

    def __init__(
        self,
        url: str,
        username: str = "",
        password: str = "",
        *,
        service: str = "tayori",
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"SCHEMA_REGISTRY_URL: expected an http(s) URL, got {url!r}")
        self.url = url.rstrip("/")
        self.shown = shown_url(url)
        self.service = service
        self._headers = {"Accept": CONTENT_TYPE}
        if username:
            self._headers["Authorization"] = aiohttp.encode_basic_auth(username, password)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._schemas: dict[int, WriterSchema] = {}
        #: ids the registry said it does not know, with the reason: for one prefetch only
        #: (a registry replica that lags its primary may know them later).
        self._missing: dict[int, str] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> SchemaRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Reading: writer schemas by id ---------------------------------------------------------

    def writer(self, schema_id: int) -> WriterSchema:
        """The writer schema of ``schema_id`` as looked up by :meth:`prefetch`; an id the
        registry does not know raises InvalidMessage."""
        found = self._schemas.get(schema_id)
        if found is not None:
            return found
        reason = self._missing.get(schema_id)
        if reason is None:  # the consumer prefetches every id it decodes: not reached
            reason = f"schema id {schema_id} was not looked up in the Schema Registry"
        raise InvalidMessage(reason)

    async def prefetch(
        self,
        values: Iterable[tuple[bytes | None, Any]],
        *,
        unframed: Callable[[Any], bool],
        waiting: Callable[[], None] | None = None,
    ) -> None:
        """Look up the schema ids of the Confluent-framed values among ``values`` ((value,
        headers) pairs; ``unframed(headers)`` says a value carries no Tayori version header)
        that are not cached yet, retrying while the registry does not answer."""
        self._missing = {}
        wanted = set()
        for data, headers in values:
            schema_id = confluent_schema_id(data)
            if schema_id is not None and schema_id not in self._schemas and unframed(headers):
                wanted.add(schema_id)
        for schema_id in sorted(wanted):
            try:
                await retry(
                    lambda schema_id=schema_id: self.fetch(schema_id),  # type: ignore[misc]
                    name="schema_registry",
                    service=self.service,
                    strategy=FOREVER,
                    waiting=waiting,
                )
            except InvalidMessage as exc:
                self._missing[schema_id] = exc.reason

    async def fetch(self, schema_id: int) -> WriterSchema:
        """``GET /schemas/ids/{id}``, parsed and cached."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        status, body = await self._request("GET", f"/schemas/ids/{schema_id}")
        if status == 404 and _code(body) == SCHEMA_NOT_FOUND:
            raise InvalidMessage(
                f"schema id {schema_id} is not in the Schema Registry at {self.shown}"
            )
        try:
            self._check(status, body, f"schema id {schema_id}")
        except RegistryError as exc:  # the registry refuses this id for good
            raise InvalidMessage(str(exc)) from None
        if not isinstance(body, dict):
            raise TransientError(
                f"{self.shown} answered {status} for schema id {schema_id} with no schema:"
                " is SCHEMA_REGISTRY_URL a Schema Registry?"
            )
        kind = body.get("schemaType") or "AVRO"
        if kind != "AVRO":
            raise InvalidMessage(
                f"schema id {schema_id} is a {kind} schema; Tayori's topics are Avro"
            )
        if body.get("references"):
            raise InvalidMessage(
                f"schema id {schema_id} uses schema references, which Tayori does not resolve:"
                " register the schema self-contained"
            )
        try:
            raw = json.loads(body["schema"])
            parsed = fastavro.parse_schema(raw)
            canonical = to_parsing_canonical_form(parsed)
        except (KeyError, TypeError, ValueError, fastavro.schema.SchemaParseException) as exc:
            raise InvalidMessage(
                f"schema id {schema_id} from the Schema Registry is not a readable Avro"
                f" schema: {exc!r}"
            ) from None
        name = parsed.get("name", "?") if isinstance(parsed, dict) else str(parsed)
        schema = WriterSchema(schema_id, parsed, canonical, name)
        self._schemas[schema_id] = schema
        log.info("schema_registry_schema_loaded", schema_id=schema_id, record=name)
        return schema

    # Writing: subjects, versions, compatibility ---------------------------------------------

    async def subjects(self) -> list[str]:
        """``GET /subjects``."""
        status, body = await self._request("GET", "/subjects")
        self._check(status, body, "the subjects")
        return list(body)

    async def lookup(self, subject: str, schema: str) -> tuple[int, int] | None:
        """(id, version) of ``schema`` under ``subject`` if registered there
        (``POST /subjects/{subject}``), else None."""
        status, body = await self._request(
            "POST", f"/subjects/{_path(subject)}", {"schema": schema}
        )
        if status == 404 and _code(body) in (SUBJECT_NOT_FOUND, SCHEMA_NOT_FOUND):
            return None
        self._check(status, body, f"subject {subject}")
        return int(body["id"]), int(body["version"])

    async def register(self, subject: str, schema: str) -> int:
        """``POST /subjects/{subject}/versions``: the schema's id (the registry keeps an
        identical schema once and answers its id again)."""
        status, body = await self._request(
            "POST", f"/subjects/{_path(subject)}/versions", {"schema": schema}
        )
        self._check(status, body, f"subject {subject}")
        return int(body["id"])

    async def compatibility(self, subject: str) -> str | None:
        """The compatibility level set on ``subject`` (``GET /config/{subject}``), None when
        it has none of its own."""
        status, body = await self._request("GET", f"/config/{_path(subject)}")
        if status == 404 and _code(body) in (SUBJECT_LEVEL_NOT_CONFIGURED, SUBJECT_NOT_FOUND):
            return None
        self._check(status, body, f"the compatibility of {subject}")
        level = body.get("compatibilityLevel") or body.get("compatibility")
        return str(level) if level else None

    async def set_compatibility(self, subject: str, level: str) -> None:
        """``PUT /config/{subject}``."""
        status, body = await self._request(
            "PUT", f"/config/{_path(subject)}", {"compatibility": level}
        )
        self._check(status, body, f"the compatibility of {subject}")

    # HTTP ------------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def _request(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """(status, JSON body or None); a registry that does not answer raises
        TransientError."""
        data = None if payload is None else json.dumps(payload)
        headers = {} if payload is None else {"Content-Type": CONTENT_TYPE}
        try:
            async with self._client().request(
                method, self.url + path, data=data, headers=headers
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(
                f"Schema Registry at {self.shown} does not answer: {exc!r}"
            ) from exc
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        return status, body

    def _check(self, status: int, body: Any, what: str) -> None:
        """Raise for an answer that is not a success: TransientError for what a retry or an
        operator's fix of the registry resolves (5xx, 401, 403, a 404 that is not the
        registry's: a wrong URL), RegistryError for the rest."""
        if 200 <= status < 300 and body is not None:
            return
        said = body.get("message") if isinstance(body, dict) else None
        detail = f"Schema Registry at {self.shown} answered {status} for {what}"
        if said:
            detail += f": {said}"
        if status >= 500 or status in (401, 403, 408, 429) or _code(body) is None:
            raise TransientError(detail)
        raise RegistryError(detail, _code(body))


def _code(body: Any) -> int | None:
    code = body.get("error_code") if isinstance(body, dict) else None
    return code if isinstance(code, int) else None


def _path(subject: str) -> str:
    return quote(subject, safe="")
