"""What the operator commands (``tayori dlq``, ``tayori offsets``) share: how they talk to
Kafka, name topics and groups, and print for people (tables) or scripts (``--json``).

A refusal or an error is a :class:`Failure`: one line on stderr and exit status 2, never a
traceback (see ``tayori/operate.py``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from libs.common.kafka import make_producer
from libs.common.kafkasecurity import check_connection, connection_options
from libs.common.settings import CommonSettings
from libs.common.topics import Topic, topic_name

EXIT_OK = 0
#: done, but some of what was asked was refused (said on stderr).
EXIT_PARTLY = 1
EXIT_FAILED = 2

CLIENT_ID = "tayori-cli"


class Failure(Exception):
    """What the operator is told in one line on stderr; the command exits with 2."""


@dataclasses.dataclass(frozen=True)
class GroupState:
    """A consumer group as the broker describes it."""

    state: str
    members: list[dict[str, Any]]

    def describe_members(self) -> str:
        return ", ".join(
            f"{m.get('member_id') or '?'}"
            + (f" ({m['client_id']}@{m['client_host']})" if m.get("client_host") else "")
            for m in self.members
        )


@dataclasses.dataclass
class Output:
    """Where a command writes: tables and messages for people, or JSON for scripts."""

    out: TextIO
    err: TextIO
    as_json: bool = False

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def note(self, text: str) -> None:
        """A remark beside the result (a refusal among many, a warning): on stderr."""
        print(text, file=self.err)

    def json(self, data: Any) -> None:
        json.dump(data, self.out, ensure_ascii=False, indent=2, default=json_default)
        self.out.write("\n")


# Text ------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; ``None`` shows as ``-``."""
    cells = [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [list(headers), *cells]
    ]
    return "\n".join(lines)


def one_line(text: str | None, width: int = 80) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``width`` with an ellipsis."""
    flat = re.sub(r"\s+", " ", text or "").strip()
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def as_text(data: bytes | None) -> str | None:
    """``data`` as text when it is UTF-8 without control characters, else None."""
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any((ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 for c in text):
        return None
    return text


def show_bytes(data: bytes | None) -> str:
    """A header value or key for people: its text, or ``0x`` and its hex."""
    if data is None:
        return "(none)"
    text = as_text(data)
    return text if text is not None else "0x" + data.hex()


def bytes_json(data: bytes | None) -> dict[str, str] | None:
    """A key or header value for scripts: ``{"text": ...}`` or ``{"base64": ...}``."""
    if data is None:
        return None
    text = as_text(data)
    if text is not None:
        return {"text": text}
    return {"base64": base64.b64encode(data).decode()}


def excerpt(data: bytes, limit: int = 256) -> dict[str, str]:
    """The first ``limit`` bytes as UTF-8 (undecodable bytes replaced) and as hex."""
    head = data[:limit]
    more = "…" if len(data) > limit else ""
    return {"utf8": head.decode("utf-8", "replace") + more, "hex": head.hex() + more}


def escaped(text: str) -> str:
    """``text`` on one line with its control characters written as escapes (``\\x00``)."""
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text
    )


def json_default(value: Any) -> Any:
    """How a decoded Avro value's non-JSON parts are written: bytes as base64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def timestamp(ms: int) -> str:
    """A record timestamp (ms since the epoch) in UTC, to the millisecond."""
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Names -----------------------------------------------------------------------------------


def resolve_topic(name: str, prefix: str) -> tuple[Topic, bool]:
    """The Topic an operator names, and whether they named its DLQ.

    Accepts the logical name (``contacts.events``), its DLQ (``contacts.events.dlq``), and
    either with the ``KAFKA_TOPIC_PREFIX`` in front.
    """
    bare = name[len(prefix) :] if prefix and name.startswith(prefix) else name
    is_dlq = bare.endswith(".dlq")
    base = bare.removesuffix(".dlq")
    try:
        return Topic(base), is_dlq
    except ValueError:
        known = ", ".join(t.value for t in Topic)
        raise Failure(f"unknown topic {name!r}; Tayori's topics are: {known}") from None


def logical(name: str | None, prefix: str) -> str | None:
    """A broker-side topic or group name without the prefix (as people know it)."""
    if name is None or not prefix or not name.startswith(prefix):
        return name
    return name[len(prefix) :]


# Kafka -----------------------------------------------------------------------------------


class Kafka:
    """The clients a command needs, started on first use and closed together.

    ``reader`` has no consumer group: it reads by position and never commits.
    """

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.prefix = settings.topic_prefix
        self._admin: AIOKafkaAdminClient | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, list[int]] | None = None

    async def __aenter__(self) -> Kafka:
        if self.settings.kafka_security_protocol.upper() != "PLAINTEXT":
            # A TLS or SASL refusal said once, naming the server and why (ConfigError),
            # instead of the clients' "Unable to bootstrap".
            await check_connection(self.settings, CLIENT_ID)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        if self._reader is not None:
            await self._reader.stop()
        if self._admin is not None:
            await self._admin.close()
        self._admin = self._reader = self._producer = None

    def name(self, topic: Topic | str) -> str:
        return topic_name(topic, self.prefix)

    def shown(self, name: str) -> str:
        """A broker-side name as people know it: without the prefix."""
        return logical(name, self.prefix) or name

    def group_id(self, group: str) -> str:
        """The broker-side id of a group as its service declares it (``ConsumerSpec``)."""
        return f"{self.prefix}{group}"

    async def admin(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            admin = AIOKafkaAdminClient(**connection_options(self.settings), client_id=CLIENT_ID)
            try:
                await admin.start()
            except BaseException:
                await admin.close()
                raise
            self._admin = admin
        return self._admin

    async def reader(self) -> AIOKafkaConsumer:
        if self._reader is None:
            reader = AIOKafkaConsumer(
                **connection_options(self.settings),
                client_id=CLIENT_ID,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=100,
            )
            try:
                await reader.start()
            except BaseException:
                await reader.stop()
                raise
            self._reader = reader
        return self._reader

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = make_producer(self.settings, client_id=CLIENT_ID, linger_ms=0)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def topics(self) -> dict[str, list[int]]:
        """Every topic on the broker and its partition numbers (no topic is created)."""
        if self._partitions is None:
            described = await (await self.admin()).describe_topics(None)
            self._partitions = {
                t["topic"]: sorted(p["partition"] for p in t["partitions"])
                for t in described
                if not t["error_code"]
            }
        return self._partitions

    async def partitions(self, name: str) -> list[TopicPartition]:
        partitions = (await self.topics()).get(name)
        if not partitions:
            raise Failure(
                f"topic {self.shown(name)} does not exist on {self.settings.kafka_bootstrap}"
            )
        return [TopicPartition(name, p) for p in partitions]

    async def partition(self, name: str, partition: int) -> TopicPartition:
        tps = await self.partitions(name)
        tp = TopicPartition(name, partition)
        if tp not in tps:
            have = ", ".join(str(t.partition) for t in tps)
            raise Failure(f"{self.shown(name)} has no partition {partition} (it has {have})")
        return tp

    async def bounds(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        """Each partition's first offset and end offset (the next one to be written)."""
        reader = await self.reader()
        begin = await reader.beginning_offsets(list(tps))
        end = await reader.end_offsets(list(tps))
        return {tp: (begin[tp], end[tp]) for tp in tps}

    async def group_state(self, group_id: str) -> GroupState | None:
        """The group's state and members as the broker describes them (None: it cannot)."""
        try:
            responses = await (await self.admin()).describe_consumer_groups([group_id])
        except KafkaError:
            return None
        for response in responses:
            for group in response.to_object()["groups"]:
                if group["group"] == group_id and not group["error_code"]:
                    return GroupState(group["state"], list(group["members"]))
        return None

    async def committed(
        self, group_id: str, tps: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The group's committed offset of each partition; -1 where it has none."""
        admin = await self.admin()
        offsets = await admin.list_consumer_group_offsets(group_id, partitions=tps)
        return {tp: offsets[tp].offset if tp in offsets else -1 for tp in tps}

    async def position_of(self, tp: TopicPartition, offset: int) -> None:
        """Fail unless ``offset`` holds a record of ``tp`` (retention may have removed it)."""
        begin, end = (await self.bounds([tp]))[tp]
        if not begin <= offset < end:
            where = f"{self.shown(tp.topic)}[{tp.partition}]"
            held = "is empty" if begin == end else f"holds offsets {begin}..{end - 1}"
            raise Failure(f"{where} {held}; there is no offset {offset}")
