"""The deliverability service: its topics, agents, tables and routes in one place.

Inputs: ``delivery.results``, ``delivery.deferrals`` (the 4xx answers the sender retried
inside itself, when they happened), ``bounce.events``, ``feedback.events`` (all keyed by
contact_id). Two faust stages:

1. ``classify`` reads the four inputs in batches, decodes them (the shared Avro codec,
   raw values), learns each contact's receiving domain in the ``contact-domains`` table
   (partitioned like the inputs, so feedback — which carries no address — finds it), sums
   the batch per domain and sends one record per domain to ``deliverability.tallies``
   keyed by the domain: the repartition by recipient domain, pre-summed. It also sums
   the records naming a campaign per (campaign, domain) — delivered and complaints only —
   and sends one record per campaign to ``deliverability.campaign-tallies`` keyed by the
   campaign: the repartition by campaign, pre-summed the same way.
2. ``count`` adds each tally to the ``domain-minute`` (tumbling 60 s) and ``domain-hour``
   (hopping 3600 s, step DELIVERABILITY_HOUR_STEP_SECONDS) windowed tables, partitioned
   by domain; ``count-campaigns`` adds each campaign tally to the ``campaign-domains``
   table (partitioned by campaign, not windowed: a campaign's figures since it started).
   Every table recovers from its changelog topic on restart.

Output: every DELIVERABILITY_POLICY_INTERVAL_SECONDS each domain's sending policy is
decided from those windows and published, when it changed, on the compacted
``domain.policy`` topic (:mod:`services.deliverability.announce`); the senders follow it.
In the same round each campaign's complaint guard is decided
(:mod:`services.deliverability.guard`) and published on the compacted ``campaign.guard``
topic when the domains it holds grow; the scheduler holds the campaign's sends to them.

faust's own web server is off; ``/v1/domains``, ``/v1/campaigns/{id}`` and the standard
endpoints are ours (aiohttp, HTTP_PORT), ``/metrics`` serving the common families and its own
(``metrics.DELIVERABILITY``). An unreadable input record is dead-lettered through the
service's :class:`~libs.common.kafka.Publisher` (the normal producer, not faust's). The
tables live in this process: run one replica (a second one would own, and answer for,
half the domains).

Stopping: faust stops taking records and waits for its streams, then this service drains
faust's producer buffer (the tables' last changelog writes) until the broker has them,
before faust's producer stops: faust's own flush gives up after 0.1 s without an
acknowledgement, which can leave a window's last change unsent while its input offset is
committed.

Recovering: faust reads each changelog up to the end offset it asks the broker for, and
the embedded broker's answer falls short of the last batch of records (the last event's
hour windows, written together); :mod:`services.deliverability.recovery` reads them up to
a fetch's high watermark instead.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import faust
from aiohttp import web
from faust.exceptions import ConsumerNotStarted
from prometheus_client.registry import Collector, CollectorRegistry

from libs.common import http, metrics, runner
from libs.common.kafka import LAG_REFRESH_SECONDS, Publisher
from libs.common.kafkasecurity import connection_options
from libs.common.logging import get_logger
from libs.common.service import started_producer
from libs.common.topics import StreamTopic, Topic, topic_name
from services.deliverability import agents, api
from services.deliverability.announce import Announcer
from services.deliverability.api import TABLES, Tables
from services.deliverability.models import CampaignDomains, Counts, no_counts
from services.deliverability.recovery import table_manager
from services.deliverability.settings import DeliverabilitySettings

log = get_logger(__name__)

INPUTS = (
    Topic.DELIVERY_RESULTS,
    Topic.DELIVERY_DEFERRALS,
    Topic.BOUNCE_EVENTS,
    Topic.FEEDBACK_EVENTS,
)
#: the topics it publishes to besides dead letters (docs/asyncapi.json): each domain's
#: policy and each campaign's complaint guard (announce.py).
PRODUCES: tuple[Topic, ...] = (Topic.DOMAIN_POLICY, Topic.CAMPAIGN_GUARD)
#: windows older than this are dropped from the tables (and their changelogs).
MINUTE_EXPIRES = timedelta(hours=1)
HOUR_EXPIRES = timedelta(hours=2)
#: faust's heartbeat is a fifth of the session timeout, as aiokafka's default ratio.
HEARTBEATS_PER_SESSION = 5
#: on stop, how long the tables' last changelog writes may take to reach the broker.
DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class StreamConsumer:
    """Its consumer group and the Tayori topics it reads, as :class:`ConsumerSpec
    <libs.common.service.ConsumerSpec>` names them for the other services (the AsyncAPI
    document, the lag metrics). faust's agents read them, not :class:`kafka.Consumer
    <libs.common.kafka.Consumer>`; the group is faust's app id under the topic prefix."""

    group: str
    topics: list[Topic]


def faust_credentials(settings: DeliverabilitySettings) -> faust.auth.Credentials | None:
    """faust's form of :func:`~libs.common.kafkasecurity.connection_options`: the same TLS
    context and SASL credentials as every other Kafka client of Tayori."""
    options = connection_options(settings)
    context = options.get("ssl_context")
    if options["security_protocol"] in ("SASL_PLAINTEXT", "SASL_SSL"):
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            mechanism=options["sasl_mechanism"],
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def make_faust_app(
    settings: DeliverabilitySettings, publisher: Publisher
) -> tuple[faust.App, Tables]:
    """The faust app with its agents and tables (not started); ``publisher`` takes the
    dead letters."""
    prefix = settings.topic_prefix
    session = settings.kafka_session_timeout_ms / 1000
    app = faust.App(
        topic_name(agents.GROUP, prefix),
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        broker_credentials=faust_credentials(settings),
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
        # recovery reads each changelog to its fetched end, not the embedded broker's
        # short ListOffsets answer (recovery.py)
        TableManager=table_manager(settings),
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
    campaign_tallies = app.topic(
        topic_name(StreamTopic.CAMPAIGN_TALLIES, prefix),
        key_serializer="json",
        value_serializer="json",
        partitions=settings.partitions,
        internal=True,
    )
    # Keyed by campaign id and written through the partitioner: the table's JSON key is the
    # campaign tallies' key bytes, so a change lands in the changelog partition of its
    # tally's partition, and the periodic loop can drop a campaign (a tombstone) outside
    # the agent's stream.
    campaigns = app.Table(
        "campaign-domains",
        value_type=CampaignDomains,
        partitions=settings.partitions,
        use_partitioner=True,
    )

    @app.agent(sources, name="classify")
    async def classify(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_records, settings.batch_seconds):
            batch = agents.classify_events(events, names, contact_domains)
            for record in batch.unreadable:
                await agents.dead_letter(publisher, record)
            for domain, counts in batch.per_domain.items():
                await tallies.send(key=domain.encode(), value={"domain": domain, "counts": counts})
            for campaign, domains in batch.per_campaign.items():
                await campaign_tallies.send(
                    key=campaign, value={"campaign_id": campaign, "domains": domains}
                )

    @app.agent(tallies, name="count")
    async def count(stream: Any) -> None:
        async for tally in stream:
            agents.add_tally(tally, minute, hour)

    @app.agent(campaign_tallies, name="count-campaigns")
    async def count_campaigns(stream: Any) -> None:
        async for tally in stream:
            agents.add_campaign_tally(tally, campaigns, time.time())

    return app, Tables(minute=minute.table, hour=hour.table, campaigns=campaigns, app=app)


async def drain(app: faust.App, seconds: float = DRAIN_SECONDS) -> None:
    """Until faust's producer buffer is empty and the broker has acknowledged what it
    held (the tables' changelog writes, the tallies): faust's own flush returns after 0.1 s
    without an acknowledgement, leaving the rest in the buffer."""
    producer = app.producer
    deadline = time.monotonic() + seconds
    while producer.buffer.size:
        if time.monotonic() > deadline:
            log.warning("changelog_drain_timed_out", left=producer.buffer.size, seconds=seconds)
            break
        await producer.buffer.flush()
    await producer.flush()
    log.info("changelog_drained")


@dataclass
class Runtime:
    """One running deliverability service: the faust app, the producer of its dead
    letters and the HTTP server."""

    settings: DeliverabilitySettings
    #: its consumer group (see :class:`StreamConsumer`).
    consumers: list[StreamConsumer] = field(default_factory=list)
    #: its own metric families (``metrics.OWNED["deliverability"]``).
    metrics: tuple[Collector, ...] = metrics.DELIVERABILITY
    port: int = field(default=0, init=False)
    app: faust.App | None = field(default=None, init=False)
    tables: Tables | None = field(default=None, init=False)
    publisher: Publisher = field(init=False)
    _worker: asyncio.Task[Any] | None = field(default=None, init=False)
    _watch: asyncio.Task[None] | None = field(default=None, init=False)
    #: decides and publishes the domains' policies (announce.py).
    announcer: Announcer | None = field(default=None, init=False)
    _announce: asyncio.Task[None] | None = field(default=None, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)
    _lag_series: set[tuple[str, str, str]] = field(default_factory=set, init=False)
    _committed: dict[Any, int | None] = field(default_factory=dict, init=False)
    _last_commit: float = field(default_factory=time.monotonic, init=False)

    @functools.cached_property
    def registry(self) -> CollectorRegistry:
        """What its ``/metrics`` serves (:func:`libs.common.metrics.registry`)."""
        return metrics.registry(self.metrics)

    async def start(self) -> None:
        s = self.settings
        # The connection is checked first, as for every service: faust alone would retry
        # a TLS or SASL refusal for ever.
        self.publisher = Publisher(s, await started_producer(s))
        self.app, self.tables = make_faust_app(s, self.publisher)
        self.app.on_before_shutdown.connect(self._drain, sender=self.app)
        for spec in self.consumers:
            for topic in spec.topics:
                for stage in ("decode", "process"):  # alerts find the series at zero
                    metrics.MESSAGES_DEAD_LETTERED.labels(s.service, topic.value, stage)
            metrics.CONSUMER_SECONDS_SINCE_COMMIT.labels(spec.group).set_function(
                lambda: time.monotonic() - self._last_commit
            )
        self._worker = asyncio.ensure_future(self.app.start())
        self._watch = asyncio.ensure_future(self._watch_loop())
        self.announcer = Announcer(s, self.publisher, self.tables)
        self._announce = asyncio.ensure_future(self.announcer.run_forever())
        web_app = http.create_app(
            s.service,
            s.bearer_tokens(),
            health=self.health,
            ready=self.ready,
            title="Tayori deliverability",
            registry=self.registry,
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

    async def _drain(self, sender: Any, /, *_: Any, signal: Any, **__: Any) -> None:
        """faust's ``on_before_shutdown``: its consumer has stopped and its streams are
        done; what they wrote must reach the broker before its producer stops."""
        await drain(sender)

    async def _watch_loop(self) -> None:
        """Every second: the lag of each input partition it holds (the high watermark of
        faust's last fetch minus the group's committed offset), the time of its last
        commit, and the domains in its hour table."""
        while True:
            try:
                self._observe()
            except Exception as exc:  # a metrics bug must not stop the service: logged
                log.error("deliverability_watch_failed", error=repr(exc), exc_info=exc)
            await asyncio.sleep(LAG_REFRESH_SECONDS)

    def _observe(self) -> None:
        app, tables = self.app, self.tables
        if app is None or tables is None:
            return
        metrics.DELIVERABILITY_DOMAINS.set(len({domain for domain, _ in list(tables.hour.data)}))
        # None until faust made it (its property would make one); Any: faust's interface
        # lacks the committed offsets it keeps
        consumer: Any = app._consumer
        if consumer is None:
            return
        try:
            held = consumer.assignment()
        except ConsumerNotStarted:
            return
        inputs = {topic_name(t, self.settings.topic_prefix): t for t in INPUTS}
        # faust's record of the offsets it committed (it reads them on assignment too)
        committed = dict(consumer._committed_offset)
        if committed != self._committed:
            self._committed = committed
            self._last_commit = time.monotonic()
        seen: set[tuple[str, str, str]] = set()
        for tp in sorted(held):
            topic = inputs.get(tp.topic)
            end = consumer.highwater(tp) if topic is not None else None
            if topic is None or end is None:
                continue
            series = (agents.GROUP, topic.value, str(tp.partition))
            metrics.CONSUMER_LAG.labels(*series).set(max(0, end - (committed.get(tp) or 0)))
            seen.add(series)
        for gone in self._lag_series - seen:
            metrics.CONSUMER_LAG.remove(*gone)
        self._lag_series = seen

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

    async def wait_for_consumers(self, timeout: float = 120.0) -> None:
        """:meth:`wait_recovered`, under the name the other services' runtimes give it
        (the tests' ``running``): its partitions are assigned once its tables are."""
        await self.wait_recovered(timeout)

    async def stop(self) -> None:
        """HTTP closes; faust stops consuming, finishes its streams, commits, and (in its
        ``on_before_shutdown``, :meth:`_drain`) the tables' changelog writes reach the broker
        before its producer stops; then the dead letters' producer."""
        log.info("service_stopping")
        if self._runner is not None:
            await self._runner.cleanup()
        for task in (self._watch, self._announce):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.app is not None:
            await self.app.stop()
            self.app.on_before_shutdown.disconnect(self._drain, sender=self.app)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for series in self._lag_series:
            metrics.CONSUMER_LAG.remove(*series)
        self._lag_series = set()
        for spec in self.consumers:
            metrics.CONSUMER_SECONDS_SINCE_COMMIT.remove(spec.group)
        if hasattr(self, "publisher"):
            await self.publisher.producer.stop()
        log.info("service_stopped")

    async def serve_forever(self) -> None:
        await runner.serve_until_signalled(self.start, self.stop)


def build(settings: DeliverabilitySettings) -> Runtime:
    return Runtime(settings, consumers=[StreamConsumer(agents.GROUP, list(INPUTS))])
