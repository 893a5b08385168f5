"""The runtime every service shares: pool, migrations, producer, outbox, consumers, HTTP.

A service describes itself (schema, migrations, consumers, routes); :class:`Runtime`
starts the parts in dependency order and stops them in reverse on SIGTERM/SIGINT:
stop taking HTTP requests, let consumers finish the batch in hand (uncommitted work is
redelivered to the next owner), publish what the outbox holds, close connections.

Health is "the loops are making progress": every consumer must have polled recently, and
every background loop that reports progress (:meth:`Runtime.beat`) must have done so.
Readiness is "the dependencies answer": PostgreSQL and the Kafka cluster.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import asyncpg
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client.registry import Collector, CollectorRegistry

from libs.common import db, http, metrics, runner
from libs.common.errors import is_transient
from libs.common.kafka import (
    Concurrency,
    Consumer,
    Handler,
    Latency,
    Message,
    Publisher,
    make_producer,
)
from libs.common.kafkasecurity import check_connection
from libs.common.logging import get_logger
from libs.common.outbox import OutboxRelay
from libs.common.retry import retry, supervise
from libs.common.settings import CommonSettings
from libs.common.topics import Topic

log = get_logger(__name__)

#: a consumer that has not polled, or a loop that has not beaten, for this long is reported
#: unhealthy.
STALL_SECONDS = 60.0
#: on stop, how long the pool may wait for its connections to come back before they are
#: closed by force.
POOL_CLOSE_SECONDS = 10.0
#: on stop, how long requests in flight may take to finish before they are cancelled: a
#: plain request ends in milliseconds; a stream (an export's rows) is cut either way, and
#: the pod's terminationGracePeriodSeconds (30) must cover this, the consumers and the pool.
HTTP_SHUTDOWN_SECONDS = 5.0
#: a new connection sends its request line and headers within this time, an idle kept-alive
#: one is closed after it (slowloris: a client trickling bytes cannot hold a connection).
HTTP_HEADER_SECONDS = 15.0


C = TypeVar("C")
T = TypeVar("T")


async def started_producer(settings: CommonSettings) -> AIOKafkaProducer:
    """A started producer for ``settings``' cluster, its connection checked first: a TLS or
    SASL refusal is a :class:`~libs.common.settings.ConfigError` naming the server and why
    (one line, exit 2), which stops the start; a broker that does not answer yet raises
    what aiokafka raises (the caller retries it like any outage). A start that fails stops
    the producer again: a failed start leaves its client's connections open."""
    if settings.kafka_security_protocol.upper() != "PLAINTEXT":
        await check_connection(settings, f"tayori-{settings.service}")
    producer = make_producer(settings)
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    return producer


class LazyContext(Generic[C]):
    """A service's shared context, made on first use — once the runtime has its pool and
    producer — and ``bind`` to turn ``handler(context, batch)`` into a consumer handler."""

    def __init__(self, make: Callable[[], C]) -> None:
        self._make = make
        self._made: list[C] = []

    def __call__(self) -> C:
        if not self._made:
            self._made.append(self._make())
        return self._made[0]

    @property
    def made(self) -> C | None:
        """The context if it has been made (a stop hook should not make one)."""
        return self._made[0] if self._made else None

    def bind(self, handler: Callable[[C, list[Message]], Awaitable[None]]) -> Handler:
        @functools.wraps(handler)
        async def run(batch: list[Message]) -> None:
            await handler(self(), batch)

        return run


@dataclass
class ConsumerSpec:
    """A consumer of the service: its group and topics, its handler, who waits on its
    records (``latency``: the fetch pacing follows, see :class:`~libs.common.kafka.Pacing`)
    and how a poll's partitions reach the handler (``concurrency``). ``max_records`` is the
    most records one handler call takes."""

    group: str
    topics: list[Topic]
    handler: Handler
    latency: Latency = Latency.NORMAL
    concurrency: Concurrency = Concurrency.SEQUENTIAL
    max_records: int = 2000


@dataclass
class Runtime:
    """One running service. Fill ``consumers`` and ``routes`` before :meth:`start`."""

    settings: CommonSettings
    schema: str
    migrations: Path
    title: str
    consumers: list[ConsumerSpec] = field(default_factory=list)
    setup_routes: Callable[[web.Application], None] | None = None
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: called on stop after HTTP closed and before the pool closes (in-flight jobs).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: the service's own metric families (``libs.common.metrics.OWNED[service]``): its
    #: ``/metrics`` serves these and the common ones, nothing of the other services.
    metrics: tuple[Collector, ...] = ()

    pool: asyncpg.Pool = field(init=False)
    publisher: Publisher = field(init=False)
    outbox: OutboxRelay = field(init=False)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list, init=False)
    _consumers: list[Consumer] = field(default_factory=list, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)
    app: web.Application | None = field(default=None, init=False)
    _failure: BaseException | None = field(default=None, init=False)
    _failed: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _beats: dict[str, float] = field(default_factory=dict, init=False)
    port: int = field(default=0, init=False)

    async def start(self, *, migrate: bool = True) -> None:
        """Start every part; a dependency that is not there yet is waited for (a service
        started during an outage comes up when it ends, instead of crash-looping)."""
        s = self.settings
        if migrate:
            await self._when_up(
                "database", lambda: db.migrate(s.database_url, self.schema, self.migrations)
            )
        self.pool = await self._when_up(
            "database",
            lambda: db.create_pool(
                s.database_url,
                self.schema,
                size=s.db_pool_size,
                connect_timeout=s.db_connect_timeout_seconds,
            ),
        )
        db.observe_pool(self.pool, s.service)
        producer = await self._when_up("kafka", lambda: started_producer(s))
        self.publisher = Publisher(s, producer)
        self.outbox = OutboxRelay(self.pool, self.publisher, self.schema, dsn=s.database_url)
        self._spawn(self.outbox.run, "outbox")
        self._consumers = [self._consumer(spec) for spec in self.consumers]
        # Joining a group takes a while on some brokers: join all groups at once.
        await asyncio.gather(
            *(self._when_up("kafka", consumer.start) for consumer in self._consumers)
        )
        for consumer in self._consumers:
            self._spawn(consumer.run, f"consumer:{consumer.group}")
        for job in self.background:
            self._spawn(job, job.__name__)
        app = http.create_app(
            s.service,
            s.bearer_tokens(),
            health=self.health,
            ready=self.ready,
            title=self.title,
            registry=self.registry,
        )
        if self.setup_routes:
            self.setup_routes(app)
        self.app = app
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=HTTP_SHUTDOWN_SECONDS,
            # Also the time a new connection has to send its request line and headers:
            # aiohttp closes a connection that has not sent a whole request by then.
            keepalive_timeout=HTTP_HEADER_SECONDS,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http_host, s.http_port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.http_port
        log.info("service_started", http_port=self.port, schema=self.schema)

    @functools.cached_property
    def registry(self) -> CollectorRegistry:
        """What this service's ``/metrics`` serves (:func:`libs.common.metrics.registry`)."""
        return metrics.registry(self.metrics)

    @property
    def _loops(self) -> set[str]:
        return {"outbox", *(f"consumer:{c.group}" for c in self.consumers)}

    def _consumer(self, spec: ConsumerSpec) -> Consumer:
        return Consumer(
            self.settings,
            self.publisher,
            group=spec.group,
            topics=spec.topics,
            handler=spec.handler,
            max_records=spec.max_records,
            latency=spec.latency,
            concurrency=spec.concurrency,
        )

    async def _when_up(self, dependency: str, connect: Callable[[], Awaitable[T]]) -> T:
        return await retry(connect, name=f"connect:{dependency}", service=self.settings.service)

    def _spawn(self, loop: Callable[[], Awaitable[Any]], name: str) -> None:
        """Run ``loop`` as a task of this service, started again after a transient failure
        (:func:`~libs.common.retry.supervise`); a bug fails the service."""
        task = asyncio.ensure_future(supervise(loop, name=name, service=self.settings.service))
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failure = exc
            self._failed.set()
            log.error("service_task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)

    def beat(self, loop: str) -> None:
        """A background loop's sign of progress, once per round: from its first beat on, a
        loop silent for ``STALL_SECONDS`` (stuck on a hung call) fails ``/healthz``."""
        self._beats[loop] = time.monotonic()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        stalled = [c.group for c in self._consumers if now - c.last_progress > STALL_SECONDS]
        stalled += [loop for loop, at in self._beats.items() if now - at > STALL_SECONDS]
        # A one-shot background job that finished is fine; a loop that ended is not.
        dead = [
            t.get_name()
            for t in self._tasks
            if t.done() and (t.get_name() in self._loops or t.cancelled() or t.exception())
        ]
        ok = not stalled and not dead and self._failure is None
        return ok, {"stalled": stalled, "stopped_tasks": dead}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {"database": await db.reachable(self.pool)}
        checks["kafka"] = await self._kafka_check()
        ok = all(v == "ok" for v in checks.values()) and (await self.health())[0]
        return ok, checks

    async def _kafka_check(self) -> str:
        """The Kafka check: "ok" when a connection to a broker of the cluster is up or can be
        made."""
        client = self.publisher.producer.client
        brokers = client.cluster.brokers()
        if not brokers:
            return "unreachable: no brokers known"
        try:
            async with asyncio.timeout(2):
                for broker in brokers:
                    if await client.ready(broker.nodeId):
                        return "ok"
        except (OSError, TimeoutError):
            pass
        return "unreachable: no broker answers"

    async def stop(self) -> None:
        log.info("service_stopping")
        if self._runner is not None:
            await self._runner.cleanup()
        for hook in self.on_stop:
            await hook()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for consumer in self._consumers:
            await consumer.stop()
        try:
            async with asyncio.timeout(POOL_CLOSE_SECONDS):
                await self.outbox.drain()
        except Exception as exc:
            if not is_transient(exc):  # a time-out is transient too
                raise
            # Left in the outbox: the next relay of this schema publishes it.
            log.warning("outbox_drain_failed", error=repr(exc))
        await self.publisher.producer.stop()
        try:
            # Everything that used the pool has stopped; a connection still held now is
            # stuck (e.g. a COPY writing to a client that stopped reading): do not hang.
            async with asyncio.timeout(POOL_CLOSE_SECONDS):
                await self.pool.close()
        except TimeoutError:
            log.warning("pool_close_timed_out", seconds=POOL_CLOSE_SECONDS)
            self.pool.terminate()
        log.info("service_stopped")

    async def _abandon_start(self) -> None:
        """Close what a start cut short had opened (it waited for a dependency)."""
        for consumer in self._consumers:
            await consumer.stop()
        if hasattr(self, "publisher"):
            await self.publisher.producer.stop()
        if hasattr(self, "pool"):
            self.pool.terminate()
        log.info("service_stopped", during="start")

    async def wait_for_consumers(self, timeout: float = 60.0) -> None:
        """Until every consumer has partitions assigned (tests, `tayori dev` readiness)."""
        deadline = time.monotonic() + timeout
        while not all(c.assigned for c in self._consumers):
            if time.monotonic() > deadline:
                raise TimeoutError("consumers did not get partitions assigned")
            await asyncio.sleep(0.05)

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT or a failed task, then stop gracefully."""
        stopped = asyncio.ensure_future(runner.stop_signal().wait())
        starting = asyncio.ensure_future(self.start())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while waiting for a dependency: leave at once
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await self._abandon_start()
            return
        try:
            starting.result()
        except BaseException:
            stopped.cancel()
            raise
        failed = asyncio.ensure_future(self._failed.wait())
        await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        await self.stop()
        if self._failure is not None:
            raise SystemExit(f"stopped after a failure: {self._failure!r}")
