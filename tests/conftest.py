"""Fixtures: the real embedded stack, one database and one set of topics per test.

- ``stack`` (session): PostgreSQL (pgserver), the Tansu broker, started once.
- ``database``: a fresh database cloned from a migrated template (fast: ~0.1 s).
- ``prefix``: a topic prefix of this test's own, with every topic created.
- ``contacts``: the contacts service running in this process against both (likewise
  ``suppression``, ``scheduler``, ``exporter``, ``sender``).
- ``kafka``: a publisher and a reader for this test's topics.
- ``smtp_sink``: a real SMTP server on loopback storing into a Maildir.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import shutil
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer

from libs.common import avro, db
from libs.common.kafka import Publisher, ensure_topics, make_producer
from libs.common.settings import CommonSettings
from libs.common.topics import Topic, topic_name
from tayori.embedded import EmbeddedBroker, EmbeddedPostgres, SmtpSink, free_port, temp_home
from tayori.services import service_parts

T = TypeVar("T")
ADMIN_TOKEN = "test-admin-token"
OPERATOR_TOKEN = "test-operator-token"
VIEWER_TOKEN = "test-viewer-token"
SERVICE_MIGRATIONS = {
    name: Path(__file__).resolve().parents[1] / "services" / name / "migrations"
    for name in ("contacts", "suppression")
}


@dataclasses.dataclass
class Stack:
    postgres: EmbeddedPostgres
    broker: EmbeddedBroker
    home: Path


@contextlib.contextmanager
def own_stack(prefix: str = "tayori-") -> Iterator[Stack]:
    """An embedded PostgreSQL and broker in a temporary home, removed afterwards."""
    home = temp_home(prefix)
    postgres = EmbeddedPostgres(home / "pg", fast_unsafe=True)
    broker = EmbeddedBroker(free_port(), log_path=home / "broker.log")
    try:
        yield Stack(postgres, broker, home)
    finally:
        broker.stop()
        postgres.stop()
        # Every test's database lives here: ~1.5 GB a run, which filled the disk after a
        # few hundred runs when it was left behind.
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def pg_home() -> Iterator[Path]:
    """A directory of its own for a test that starts an embedded PostgreSQL (or a whole
    ``tayori dev``). Not under ``tmp_path``: pgserver runs PostgreSQL as another user, who
    must traverse every parent directory, and any pytest starting on this machine sets
    pytest's shared temporary root back to 0700 — under a server that is running there."""
    home = temp_home()
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with own_stack() as shared:
        yield shared


@pytest.fixture(scope="session")
async def template_db(stack: Stack) -> str:
    name = "tayori_template"
    dsn = await stack.postgres.create_database(name)
    for schema, migrations in SERVICE_MIGRATIONS.items():
        await db.migrate(dsn, schema, migrations)
    return name


@pytest.fixture
async def database(stack: Stack, template_db: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    return await stack.postgres.create_database(name, template=template_db)


@pytest.fixture
async def prefix(stack: Stack) -> str:
    value = f"t{uuid.uuid4().hex[:10]}."
    await ensure_topics(stack.broker.bootstrap, value, partitions=2)
    return value


def settings_for(cls: type[T], stack: Stack, database: str, prefix: str, **overrides: Any) -> T:
    values = dict(
        database_url=database,
        kafka_bootstrap=stack.broker.bootstrap,
        topic_prefix=prefix,
        kafka_session_timeout_ms=1000,
        kafka_profile="embedded",
        kafka_fetch_max_wait_ms=20,
        http_host="127.0.0.1",
        http_port=0,
        admin_token=ADMIN_TOKEN,
        api_tokens=f"operator:{OPERATOR_TOKEN},viewer:{VIEWER_TOKEN}",
        db_pool_size=5,
    )
    values.update(overrides)
    return cls(**values)


def service_environ(stack: Stack, database: str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a service started as a process of its own (``tayori <service>``)
    on this test's database and topics, as settings_for configures one in this process, at
    a free HTTP port (``HTTP_PORT``); ``extra`` on top."""
    return (
        dict(
            os.environ,
            DATABASE_URL=database,
            KAFKA_BOOTSTRAP=stack.broker.bootstrap,
            KAFKA_TOPIC_PREFIX=prefix,
            KAFKA_SESSION_TIMEOUT_MS="1000",
            KAFKA_PROFILE="embedded",
            KAFKA_FETCH_MAX_WAIT_MS="20",
            HTTP_HOST="127.0.0.1",
            HTTP_PORT=str(free_port()),
            TAYORI_ADMIN_TOKEN=ADMIN_TOKEN,
        )
        | extra
    )


class Api:
    """A small HTTP client for one service, authenticated as admin unless told otherwise."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        token: str | None = ADMIN_TOKEN,
        **kwargs: Any,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        async with self.session.request(
            method, self.base + path, json=json, headers=headers, **kwargs
        ) as response:
            if response.content_type in ("application/json", "application/problem+json"):
                return response.status, await response.json()
            return response.status, await response.text()

    async def ok(self, method: str, path: str, json: Any = None, **kwargs: Any) -> Any:
        status, body = await self.call(method, path, json, **kwargs)
        assert 200 <= status < 300, f"{method} {path} → {status}: {body}"
        return body


@dataclasses.dataclass
class Service:
    runtime: Any
    api: Api


@contextlib.asynccontextmanager
async def running(
    name: str, stack: Stack, database: str, prefix: str, **overrides: Any
) -> AsyncIterator[Service]:
    """Service ``name`` running in this process against this test's database and topics."""
    app, settings_cls = service_parts(name)
    runtime = app.build(settings_for(settings_cls, stack, database, prefix, **overrides))
    await within(HANG_SECONDS, f"{name}'s start", runtime.start())
    try:
        await runtime.wait_for_consumers()
        async with aiohttp.ClientSession() as session:
            yield Service(runtime, Api(session, f"http://127.0.0.1:{runtime.port}"))
    finally:
        await within(HANG_SECONDS, f"{name}'s stop", runtime.stop())


@contextlib.asynccontextmanager
async def running_all(
    stack: Stack, database: str, prefix: str, home: Path
) -> AsyncIterator[dict[str, Service]]:
    """Every service on one database and one set of topics, wired to each other as in
    ``tayori dev`` (the sender to an SMTP sink of its own, exports under ``home``)."""
    sink = SmtpSink(home / "maildir", free_port())
    services: dict[str, Service] = {}
    try:
        async with contextlib.AsyncExitStack() as started:
            services["contacts"] = await started.enter_async_context(
                running("contacts", stack, database, prefix)
            )
            contacts_url = services["contacts"].api.base
            services["suppression"] = await started.enter_async_context(
                running("suppression", stack, database, prefix)
            )
            services["scheduler"] = await started.enter_async_context(
                running("scheduler", stack, database, prefix, contacts_url=contacts_url)
            )
            services["exporter"] = await started.enter_async_context(
                running(
                    "exporter",
                    stack,
                    database,
                    prefix,
                    contacts_url=contacts_url,
                    scheduler_url=services["scheduler"].api.base,
                    export_dir=home / "exports",
                )
            )
            services["sender"] = await started.enter_async_context(
                running("sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{sink.port}")
            )
            services["bounce_processor"] = await started.enter_async_context(
                running(
                    "bounce_processor",
                    stack,
                    database,
                    prefix,
                    smtp_host="127.0.0.1",
                    smtp_port=free_port(),
                )
            )
            # its faust topics have the inputs' partition count (the test topics' two)
            services["deliverability"] = await started.enter_async_context(
                running("deliverability", stack, database, prefix, partitions=2)
            )
            yield services
    finally:
        sink.stop()


#: a service's start or stop still under way after this long is stuck: its test fails then,
#: with every task's stack, instead of hanging until pytest-timeout, whose failure would leave
#: the stuck service running under the later tests (they share the session's event loop).
HANG_SECONDS = 60.0

#: a test still running after this long has every task's stack printed (before pytest-timeout
#: ends it, which shows threads only).
HUNG_TEST_SECONDS = 240.0


def task_stacks(tasks: Any) -> str:
    out = io.StringIO()
    for task in tasks:
        task.print_stack(limit=12, file=out)
    return out.getvalue()


async def within(seconds: float, what: str, step: Awaitable[T]) -> T:
    """``await step``; a step that hangs fails after ``seconds`` with every task's stack."""
    task = asyncio.ensure_future(step)
    await asyncio.wait({task}, timeout=seconds)
    if task.done():
        return task.result()
    stacks = task_stacks(t for t in asyncio.all_tasks() if t is not asyncio.current_task())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise AssertionError(f"{what} did not end in {seconds:.0f} s; tasks:\n{stacks}")


@pytest.fixture
async def contacts(stack: Stack, database: str, prefix: str) -> AsyncIterator[Service]:
    async with running("contacts", stack, database, prefix) as service:
        yield service


@pytest.fixture
async def suppression(stack: Stack, database: str, prefix: str) -> AsyncIterator[Service]:
    async with running("suppression", stack, database, prefix) as service:
        yield service


@pytest.fixture
async def scheduler(
    stack: Stack, database: str, prefix: str, contacts: Service
) -> AsyncIterator[Service]:
    """The scheduler, asking this test's contacts service for field definitions."""
    async with running(
        "scheduler", stack, database, prefix, contacts_url=contacts.api.base
    ) as service:
        yield service


@pytest.fixture
async def exporter(
    stack: Stack, database: str, prefix: str, contacts: Service, tmp_path: Path
) -> AsyncIterator[Service]:
    """The exporter, streaming rows from this test's contacts service into ``tmp_path``.
    A test that exports a campaign's recipients runs its own with ``scheduler_url``."""
    async with running(
        "exporter",
        stack,
        database,
        prefix,
        contacts_url=contacts.api.base,
        export_dir=tmp_path / "exports",
        sweep_seconds=0.2,
    ) as service:
        yield service


@pytest.fixture
async def sender(
    stack: Stack, database: str, prefix: str, smtp_sink: SmtpSink
) -> AsyncIterator[Service]:
    """The sender delivering to this test's SMTP sink."""
    async with running(
        "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{smtp_sink.port}"
    ) as service:
        yield service


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@pytest.fixture
async def bounce_processor(stack: Stack, database: str, prefix: str) -> AsyncIterator[Service]:
    """The bounce processor, its inbound SMTP listener on a free loopback port
    (``service.runtime.settings.smtp_port``)."""
    port = free_port()
    async with running(
        "bounce_processor", stack, database, prefix, smtp_host="127.0.0.1", smtp_port=port
    ) as service:
        await eventually(lambda: _listening(port))
        yield service


class Kafka:
    """Publish to and read from this test's topics."""

    def __init__(self, stack: Stack, prefix: str, publisher: Publisher) -> None:
        self.stack = stack
        self.prefix = prefix
        self.publisher = publisher

    async def send(self, topic: Topic, key: Any, value: dict[str, Any]) -> None:
        await self.publisher.send_and_wait(topic, key, value)

    async def send_raw(self, topic: Topic, key: Any, data: bytes | None) -> None:
        await (await self.publisher.send_raw(topic, key, data))

    async def read(
        self,
        topic: Topic | str,
        *,
        until: Callable[[list[Any]], bool],
        raw: bool = False,
        timeout: float = 60.0,
    ) -> list[Any]:
        """Records of ``topic`` from the beginning until ``until(records)`` holds."""
        name = topic_name(topic, self.prefix)
        consumer = self._reader(name)
        await consumer.start()
        records: list[Any] = []
        try:
            async with asyncio.timeout(timeout):
                while not until(records):
                    batches = await consumer.getmany(timeout_ms=200)
                    for batch in batches.values():
                        for record in batch:
                            if raw or not isinstance(topic, Topic):
                                records.append(record)
                            else:
                                records.append(avro.decode(topic, record.value, record.headers))
        except TimeoutError:
            raise AssertionError(
                f"{name}: condition not met; got {len(records)} records: {records[-5:]}"
            ) from None
        finally:
            await consumer.stop()
        return records

    def _reader(self, name: str) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            name,
            bootstrap_servers=self.stack.broker.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=20,
        )

    async def read_to_end(self, topic: Topic | str) -> list[Any]:
        """Every record of ``topic`` up to the end offsets as they are now: decoded for a
        Topic, raw ConsumerRecords for a name (a DLQ)."""
        consumer = self._reader(topic_name(topic, self.prefix))
        await consumer.start()
        records: list[Any] = []
        try:

            async def assigned() -> Any:
                return consumer.assignment()

            partitions = sorted(await eventually(assigned))
            async with asyncio.timeout(60):
                ends = await consumer.end_offsets(partitions)
                while True:
                    behind = [tp for tp in partitions if await consumer.position(tp) < ends[tp]]
                    if not behind:
                        break
                    for batch in (await consumer.getmany(*behind, timeout_ms=200)).values():
                        records.extend(
                            avro.decode(topic, r.value, r.headers)
                            if isinstance(topic, Topic)
                            else r
                            for r in batch
                        )
        finally:
            await consumer.stop()
        return records


@contextlib.asynccontextmanager
async def publishing(stack: Stack, prefix: str) -> AsyncIterator[Kafka]:
    """A publisher and a reader for ``prefix``'s topics, as a service publishes to them; the
    producer is stopped on the way out."""
    settings = CommonSettings(
        kafka_bootstrap=stack.broker.bootstrap, topic_prefix=prefix, service="test"
    )
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    try:
        yield Kafka(stack, prefix, Publisher(settings, producer))
    finally:
        await producer.stop()


@pytest.fixture
async def kafka(stack: Stack, prefix: str) -> AsyncIterator[Kafka]:
    async with publishing(stack, prefix) as publisher:
        yield publisher


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    sink = SmtpSink(tmp_path / "maildir", free_port())
    yield sink
    sink.stop()


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout: float = 60.0, interval: float = 0.05
) -> T:
    """Poll ``check`` until it returns a truthy value (or stops raising AssertionError), and
    return that value (so never None: a check may answer None for "not yet")."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        try:
            result = await check()
            if result:
                return result
            last = result
        except AssertionError as exc:
            last = exc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {last!r}")
        await asyncio.sleep(interval)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running behind it, and cancel them, so that the
    tests after it do not run beside them. A test that hangs has its tasks' stacks printed."""
    before = set(asyncio.all_tasks())
    hung = asyncio.get_running_loop().call_later(HUNG_TEST_SECONDS, _print_hung_tasks)
    yield
    hung.cancel()
    await asyncio.sleep(0)
    leaked = [
        t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
    ]
    if leaked:  # a connection closing, say: give it a moment on a slow machine
        await asyncio.wait(leaked, timeout=5)
        leaked = [t for t in leaked if not t.done()]
    if leaked:
        stacks = task_stacks(leaked)
        for task in leaked:
            task.cancel()
        await asyncio.wait(leaked, timeout=5)
        raise AssertionError(f"tasks leaked (now cancelled):\n{stacks}")


def _print_hung_tasks() -> None:
    print(
        f"\n--- asyncio tasks of a test running for {HUNG_TEST_SECONDS:.0f} s ---", file=sys.stderr
    )
    print(task_stacks(asyncio.all_tasks()), file=sys.stderr, flush=True)


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A loopback port kept bound (SO_REUSEADDR, not listening) until the block ends, so
    nothing else takes it — an outgoing connection's ephemeral port, another worker's
    server — while the server meant for it is still starting; that server binds it anyway
    (SO_REUSEADDR, as aiohttp's sites set it, and this socket does not listen).
    :func:`free_port` gives a port up at once: fine for a server started right after, not
    for one started after minutes of other work."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
