"""The contacts service: its topics, consumers, routes and background jobs in one place.

Inputs: contacts.events, suppression.changes, delivery.results, feedback.events,
bounce.events, snapshot.requests. Outputs (through the outbox unless noted):
contacts.changelog, suppression.commands, jobs.events, campaign.recipients (streamed
directly: a snapshot is a read, redone whole if interrupted).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common import metrics
from libs.common.kafka import Concurrency, Latency, Message
from libs.common.service import ConsumerSpec, LazyContext, Runtime
from libs.common.topics import Topic
from services.contacts import agents, api, imports
from services.contacts.context import CONTEXT, Context
from services.contacts.maintenance import run_forever as maintenance_loop
from services.contacts.settings import ContactsSettings

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA = "contacts"
#: the topics it publishes to (its consumers' topics are in build): for docs/asyncapi.json
PRODUCES = (
    Topic.CONTACTS_CHANGELOG,
    Topic.SUPPRESSION_COMMANDS,
    Topic.JOBS_EVENTS,
    Topic.CAMPAIGN_RECIPIENTS,
)


def build(settings: ContactsSettings) -> Runtime:
    runtime = Runtime(
        settings=settings,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        title="Tayori contacts",
        metrics=metrics.CONTACTS,
    )
    ctx = LazyContext(lambda: Context(settings, runtime.pool, runtime.publisher))
    bind = ctx.bind

    runtime.consumers = [
        ConsumerSpec(
            "contacts.ingest", [Topic.CONTACTS_EVENTS], bind(agents.handle_contact_events)
        ),
        ConsumerSpec(
            "contacts.suppression",
            [Topic.SUPPRESSION_CHANGES],
            bind(agents.handle_suppression_changes),
            latency=Latency.CRITICAL,  # an unsubscribe should show at once
            # Keyed by contact: a poll's partitions (2-3 changes each at 500/s) in one
            # transaction instead of one each, whose fixed cost was most of the handler's.
            concurrency=Concurrency.TOGETHER,
        ),
        ConsumerSpec(
            "contacts.projections",
            [
                Topic.DELIVERY_RESULTS,
                Topic.FEEDBACK_EVENTS,
                Topic.BOUNCE_EVENTS,
            ],
            bind(_projections),
            # Delivery history, opens, clicks and bounces for search: nobody waits on them to
            # the millisecond; fewer polls, bigger batches (one statement each).
            max_records=5000,
            latency=Latency.QUIET,
        ),
        ConsumerSpec(
            "contacts.snapshots",
            [Topic.SNAPSHOT_REQUESTS],
            bind(agents.handle_snapshot_requests),
            max_records=10,
        ),
    ]

    async def resume_imports() -> None:
        await imports.resume_jobs(ctx())

    async def maintenance() -> None:
        await maintenance_loop(ctx())

    async def stop_imports() -> None:
        await imports.stop_jobs(ctx())

    runtime.background = [resume_imports, maintenance]
    runtime.on_stop = [stop_imports]

    def setup_routes(app: web.Application) -> None:
        app[CONTEXT] = ctx()
        app.router.add_routes(api.routes)
        app.router.add_routes(imports.routes)

    runtime.setup_routes = setup_routes
    return runtime


async def _projections(ctx: Context, batch: list[Message]) -> None:
    topic = batch[0].topic
    handler = {
        Topic.DELIVERY_RESULTS: agents.handle_delivery_results,
        Topic.FEEDBACK_EVENTS: agents.handle_feedback,
        Topic.BOUNCE_EVENTS: agents.handle_bounce_events,
    }[topic]
    await handler(ctx, batch)
