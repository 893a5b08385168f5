"""Avro encoding of every topic's messages (fastavro, schemaless, versioned by header).

``schemas/avro/<topic>.avsc`` is the current schema of ``<topic>``; it carries a top-level
``"tayori_version": N``. Every earlier version stays in ``schemas/avro/history/
<topic>.vN.avsc`` so a consumer can read a message written by an older producer: the
producer puts its version in the ``tayori-schema-version`` header and the reader resolves
that writer schema against its own (Avro schema resolution). Example payloads live in
``schemas/avro/examples/<topic>/*.json``.

Framing. A record with the ``tayori-schema-version`` header is Tayori's: schemaless Avro
written with that version (the fast path). On an upstream topic (``Topic.upstream``) a
record without it whose first byte is 0 is the Confluent wire format (magic byte 0, a
4-byte big-endian schema id, the Avro body): its writer schema comes from the Schema
Registry (:mod:`libs.common.registry`) and is resolved against the current one. Any other
record without the header is read as the current version, as before; when that fails, the
dead letter's reason says which framings were expected.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form
from fastavro.types import Schema

from libs.common import avrocodec
from libs.common.errors import InvalidMessage
from libs.common.registry import SchemaRegistry, confluent_schema_id
from libs.common.topics import UPSTREAM, Topic

VERSION_HEADER = "tayori-schema-version"

_DECODE_ERRORS = (
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    UnicodeDecodeError,
    OverflowError,
    StopIteration,
    AttributeError,
    SchemaResolutionError,
)


def schemas_dir() -> Path:
    override = os.environ.get("TAYORI_SCHEMAS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "schemas" / "avro"


def _parse(path: Path) -> tuple[int, Schema]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    version = int(raw.get("tayori_version", 1))
    return version, fastavro.parse_schema(raw)


@cache
def current_schema(topic: str) -> tuple[int, Schema]:
    """(version, parsed schema) of ``topic``'s current schema."""
    path = schemas_dir() / f"{topic}.avsc"
    if not path.exists():
        raise LookupError(f"no Avro schema for topic {topic!r} at {path}")
    return _parse(path)


@cache
def schema_version(topic: str, version: int) -> Schema:
    """The writer schema of ``topic`` at ``version`` (current or from history/)."""
    current_version, current = current_schema(topic)
    if version == current_version:
        return current
    path = schemas_dir() / "history" / f"{topic}.v{version}.avsc"
    if not path.exists():
        raise LookupError(f"unknown schema version {version} of {topic}")
    return _parse(path)[1]


#: what a compiled codec raises for a value or input it leaves to fastavro
_COMPILED_ERRORS = (
    avrocodec.Fallback,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    OverflowError,
)


@cache
def _compiled_writer(topic: str) -> Any:
    return avrocodec.compile_writer(current_schema(topic)[1])


@cache
def _compiled_reader(topic: str) -> Any:
    return avrocodec.compile_reader(current_schema(topic)[1])


def _base(topic: Topic | str) -> str:
    return topic.value if isinstance(topic, Topic) else topic


def encode(topic: Topic | str, value: dict[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Serialise ``value`` with ``topic``'s current schema; bad values raise InvalidMessage."""
    version, schema = current_schema(_base(topic))
    write = _compiled_writer(_base(topic))
    if write is not None:
        try:
            return write(value), [(VERSION_HEADER, str(version).encode())]
        except _COMPILED_ERRORS:
            pass  # fastavro writes it or says what is wrong
    buffer = io.BytesIO()
    try:
        fastavro.schemaless_writer(buffer, schema, value)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise InvalidMessage(f"does not match schema {_base(topic)} v{version}: {exc}") from exc
    return buffer.getvalue(), [(VERSION_HEADER, str(version).encode())]


def encode_all(
    topic: Topic | str, values: Iterable[dict[str, Any]]
) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """:func:`encode` for many values of one topic (a chunk released together): the writer
    and the version header are looked up once; the header list is shared by every value."""
    base = _base(topic)
    version = current_schema(base)[0]
    headers = [(VERSION_HEADER, str(version).encode())]
    write = _compiled_writer(base)
    if write is None:
        return [encode(base, value)[0] for value in values], headers
    encoded = []
    for value in values:
        try:
            encoded.append(write(value))
        except _COMPILED_ERRORS:
            encoded.append(encode(base, value)[0])  # fastavro writes it or raises InvalidMessage
    return encoded, headers


def decode(
    topic: Topic | str,
    data: bytes | None,
    headers: Any = (),
    registry: SchemaRegistry | None = None,
) -> dict[str, Any]:
    """Read a message of ``topic``; anything unreadable raises InvalidMessage. A record in
    the Confluent wire format on an upstream topic needs ``registry``, with its schema id
    looked up already (:meth:`SchemaRegistry.prefetch`)."""
    base = _base(topic)
    if data is None:
        raise InvalidMessage("empty message value (tombstone) where a record was expected")
    reader_version, reader = current_schema(base)
    writer_version = None
    for key, raw in headers or ():
        if key == VERSION_HEADER:
            try:
                writer_version = int(raw)
            except ValueError:
                raise InvalidMessage(f"bad {VERSION_HEADER} header {raw!r}") from None
    if writer_version is None:
        return _decode_unversioned(base, data, registry)
    if writer_version == reader_version:
        read = _compiled_reader(base)
        if read is not None:
            try:
                record, end = read(data)
            except _COMPILED_ERRORS:
                pass  # malformed: fastavro says how
            else:
                if end == len(data):
                    return record
    try:
        writer = schema_version(base, writer_version)
    except LookupError as exc:
        raise InvalidMessage(str(exc)) from None
    buffer = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(buffer, writer, reader)
    except _DECODE_ERRORS as exc:
        raise InvalidMessage(f"not a valid {base} v{writer_version} record: {exc!r}") from None
    if buffer.tell() != len(data):
        raise InvalidMessage(f"{len(data) - buffer.tell()} trailing bytes after a {base} record")
    if not isinstance(record, dict):
        raise InvalidMessage(f"{base} record is not a record")
    return record


def unversioned(headers: Any) -> bool:
    """Whether ``headers`` carry no Tayori schema version (the record is not Tayori's
    framing: it may be the Confluent wire format)."""
    return not any(key == VERSION_HEADER for key, _ in headers or ())


_UPSTREAM = frozenset(topic.value for topic in UPSTREAM)
_TAYORI_FRAMING = f"Tayori's framing (schemaless Avro with a {VERSION_HEADER} header)"
_CONFLUENT_FRAMING = "the Confluent wire format (magic byte 0, a 4-byte schema id, Avro)"


def _decode_unversioned(base: str, data: bytes, registry: SchemaRegistry | None) -> Any:
    """A record without the version header: the Confluent wire format on an upstream
    topic, else the current version (what producers that set no header have always got)."""
    upstream = base in _UPSTREAM
    schema_id = confluent_schema_id(data) if upstream else None
    if schema_id is not None:
        return _decode_confluent(base, data, schema_id, registry)
    reader_version = current_schema(base)[0]
    try:
        return decode(base, data, [(VERSION_HEADER, str(reader_version).encode())])
    except InvalidMessage as exc:
        expected = _TAYORI_FRAMING
        if upstream:
            expected += f" or {_CONFLUENT_FRAMING}"
        raise InvalidMessage(
            f"unknown framing: expected {expected}; this record has no {VERSION_HEADER}"
            f" header, starts with {_first_bytes(data)}, and read as {base}"
            f" v{reader_version} it is {exc.reason}"
        ) from None


def _decode_confluent(
    base: str, data: bytes, schema_id: int, registry: SchemaRegistry | None
) -> dict[str, Any]:
    if registry is None:
        raise InvalidMessage(
            f"{_CONFLUENT_FRAMING} (schema id {schema_id}), but no Schema Registry is"
            f" configured (SCHEMA_REGISTRY_URL): expected {_TAYORI_FRAMING}"
        )
    writer = registry.writer(schema_id)
    body = data[5:]
    reader_version, reader = current_schema(base)
    if writer.canonical == _reader_canonical(base):
        read = _compiled_reader(base)
        if read is not None:
            try:
                record, end = read(body)
            except _COMPILED_ERRORS:
                pass  # malformed: fastavro says how
            else:
                if end == len(body):
                    return record
    buffer = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(buffer, writer.parsed, reader)
    except SchemaResolutionError as exc:
        name = reader.get("name") if isinstance(reader, dict) else reader
        raise InvalidMessage(
            f"schema id {schema_id} ({writer.name}) cannot be read as {base} v{reader_version}"
            f" ({name}): {str(exc)[:300]}"
        ) from None
    except _DECODE_ERRORS as exc:
        raise InvalidMessage(
            f"not a valid {base} record written with schema id {schema_id}: {exc!r}"
        ) from None
    if buffer.tell() != len(body):
        raise InvalidMessage(
            f"{len(body) - buffer.tell()} trailing bytes after a {base} record"
            f" written with schema id {schema_id}"
        )
    if not isinstance(record, dict):
        raise InvalidMessage(f"{base} record is not a record")
    return record


@cache
def _reader_canonical(topic: str) -> str:
    return to_parsing_canonical_form(current_schema(topic)[1])


def _first_bytes(data: bytes) -> str:
    """How a record starts, for a reason: its first bytes in hex, and a guess when they
    look like text (JSON)."""
    head = data[:8].hex(" ")
    if data[:1] in (b"{", b"["):
        return f"{head} (JSON?)"
    return head if data else "nothing (an empty value)"
