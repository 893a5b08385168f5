"""The deliverability service: its topics, agents, tables and routes in one place.

Inputs: ``delivery.results``, ``bounce.events``, ``feedback.events`` (all keyed by
contact_id). Two faust stages:

1. ``classify`` reads the three inputs in batches, decodes them (the shared Avro codec,
   raw values), learns each contact's receiving domain in the ``contact-domains`` table
   (partitioned like the inputs, so feedback — which carries no address — finds it), sums
   the batch per domain and sends one record per domain to ``deliverability.tallies``
   keyed by the domain: the repartition by recipient domain, pre-summed.
2. ``count`` adds each tally to the ``domain-minute`` (tumbling 60 s) and ``domain-hour``
   (hopping 3600 s, step DELIVERABILITY_HOUR_STEP_SECONDS) windowed tables, partitioned
   by domain. Every table recovers from its changelog topic on restart.

faust's own web server is off; ``/v1/domains`` and the standard endpoints are ours
(aiohttp, HTTP_PORT). The tables live in this process: run one replica (a second one
would own, and answer for, half the domains).
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import faust
from aiohttp import web

from libs.common import http
from libs.common.logging import get_logger
from libs.common.topics import StreamTopic, Topic, topic_name
from services.deliverability import agents, api
from services.deliverability.api import TABLES, Tables
from services.deliverability.models import Counts, no_counts
from services.deliverability.settings import DeliverabilitySettings

log = get_logger(__name__)

INPUTS = (Topic.DELIVERY_RESULTS, Topic.BOUNCE_EVENTS, Topic.FEEDBACK_EVENTS)
#: windows older than this are dropped from the tables (and their changelogs).
MINUTE_EXPIRES = timedelta(hours=1)
HOUR_EXPIRES = timedelta(hours=2)
#: faust's heartbeat is a fifth of the session timeout, as aiokafka's default ratio.
HEARTBEATS_PER_SESSION = 5


def make_faust_app(settings: DeliverabilitySettings) -> tuple[faust.App, Tables]:
    """The faust app with its agents and tables (not started)."""
    prefix = settings.topic_prefix
    session = settings.kafka_session_timeout_ms / 1000
    app = faust.App(
        topic_name("deliverability", prefix),
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        # The embedded broker answers a JoinGroup after half the session timeout; faust's
        # default (60 s) would hold the first event ~31 s (docs/ARCHITECTURE.md).
        broker_session_timeout=session,
        broker_heartbeat_interval=session / HEARTBEATS_PER_SESSION,
        consumer_auto_offset_reset="earliest",
        datadir=tempfile.mkdtemp(prefix="tayori-deliverability-"),
        table_cleanup_interval=30.0,
        logging_config=None,
    )
    names = {topic_name(t, prefix): t for t in INPUTS}
    sources = app.topic(*names, key_serializer="raw", value_serializer="raw")
    tallies = app.topic(
        topic_name(StreamTopic.TALLIES, prefix),
        key_serializer="raw",
        value_serializer="json",
        partitions=settings.partitions,
        internal=True,
    )
    # Keyed by contact id (an int: JSON-encoded it is the inputs' key bytes) and written
    # through the partitioner: a change lands in the changelog partition of its contact's
    # input partition, whichever event of a batch is current.
    contact_domains = app.Table(
        "contact-domains", partitions=settings.partitions, use_partitioner=True
    )
    minute = app.Table(
        "domain-minute", default=no_counts, value_type=Counts, partitions=settings.partitions
    ).tumbling(60, expires=MINUTE_EXPIRES)
    hour = app.Table(
        "domain-hour", default=no_counts, value_type=Counts, partitions=settings.partitions
    ).hopping(3600, settings.hour_step_seconds, expires=HOUR_EXPIRES)

    @app.agent(sources, name="classify")
    async def classify(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_records, settings.batch_seconds):
            per_domain = agents.classify_events(events, names, contact_domains)
            for domain, counts in per_domain.items():
                await tallies.send(key=domain.encode(), value={"domain": domain, "counts": counts})

    @app.agent(tallies, name="count")
    async def count(stream: Any) -> None:
        async for tally in stream:
            agents.add_tally(tally, minute, hour)

    return app, Tables(minute=minute.table, hour=hour.table, app=app)


@dataclass
class Runtime:
    """One running deliverability service: the faust app and the HTTP server."""

    settings: DeliverabilitySettings
    port: int = field(default=0, init=False)
    app: faust.App | None = field(default=None, init=False)
    tables: Tables | None = field(default=None, init=False)
    _worker: asyncio.Task[Any] | None = field(default=None, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)

    async def start(self) -> None:
        s = self.settings
        self.app, self.tables = make_faust_app(s)
        self._worker = asyncio.ensure_future(self.app.start())
        web_app = http.create_app(
            s.service,
            s.bearer_tokens(),
            health=self.health,
            ready=self.ready,
            title="Tayori deliverability",
        )
        web_app[TABLES] = self.tables
        web_app.router.add_routes(api.routes)
        self._runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http_host, s.http_port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.http_port
        log.info("service_started", http_port=self.port)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        app = self.app
        crashed = (
            app is None
            or app.crashed
            or (
                self._worker is not None
                and self._worker.done()
                and self._worker.exception() is not None
            )
        )
        return not crashed, {"worker": "crashed" if crashed else "running"}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready once the tables are recovered from their changelogs and partitions are
        assigned: before that the figures would be short."""
        ok, detail = await self.health()
        recovered = self.tables is not None and self.tables.recovered()
        detail["tables"] = "recovered" if recovered else "recovering"
        return ok and recovered, detail

    async def wait_recovered(self, timeout: float = 120.0) -> None:
        """Until the tables are recovered and the worker consumes (tests, bench)."""
        deadline = time.monotonic() + timeout
        while not (self.tables is not None and self.tables.recovered()):
            if time.monotonic() > deadline:
                raise TimeoutError("deliverability tables not recovered")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        log.info("service_stopping")
        if self._runner is not None:
            await self._runner.cleanup()
        if self.app is not None:
            await self.app.stop()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        log.info("service_stopped")

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


def build(settings: DeliverabilitySettings) -> Runtime:
    return Runtime(settings)
