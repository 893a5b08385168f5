"""The scheduler service: its topics, consumers, routes and release loop in one place.

Inputs: HTTP API, campaign.recipients (snapshot answers), delivery.results, send.progress
(senders' answers to release checkpoints), feedback.events (campaign and step statistics),
suppression.changes (step-mail enrolments), campaign.guard (the complaint guard's held
receiving domains), the clock.
Outputs: snapshot.requests and campaign.control through the outbox; send.requests (and
their checkpoints) published directly by the release loop (acknowledged before rows are
marked released) and, for test sends, through the outbox.
"""

from __future__ import annotations

import functools
from pathlib import Path

from aiohttp import web

from libs.common import metrics
from libs.common.kafka import Latency
from libs.common.service import ConsumerSpec, LazyContext, Runtime
from libs.common.topics import Topic
from services.scheduler import agents, api, fence, guard_api, plans_api, release
from services.scheduler.context import CONTEXT, Context
from services.scheduler.settings import SchedulerSettings

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA = "scheduler"
#: the topics it publishes to (its consumers' topics are in build): for docs/asyncapi.json
PRODUCES = (
    Topic.SNAPSHOT_REQUESTS,
    Topic.SEND_REQUESTS,
    Topic.CAMPAIGN_CONTROL,
    Topic.CAMPAIGN_CONTENT,
)


def build(settings: SchedulerSettings) -> Runtime:
    runtime = Runtime(
        settings=settings,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        title="Tayori scheduler",
        metrics=metrics.SCHEDULER,
    )
    ctx = LazyContext(lambda: Context(settings, runtime.pool, runtime.publisher))
    bind = ctx.bind

    runtime.consumers = [
        ConsumerSpec(
            "scheduler.recipients", [Topic.CAMPAIGN_RECIPIENTS], bind(agents.handle_recipients)
        ),
        ConsumerSpec(
            fence.RESULTS_GROUP,
            [Topic.DELIVERY_RESULTS],
            bind(agents.handle_results),
            max_records=5000,
            # Counters, the sent status and F-26's halt: nobody waits on them to the
            # millisecond (a halt a quarter of a second later stops the same campaign), and
            # 4 polls a second instead of 20 give each transaction 5 times the results.
            latency=Latency.QUIET,
        ),
        # A few answers a minute per sending campaign: nobody waits on them.
        ConsumerSpec(
            "scheduler.progress",
            [Topic.SEND_PROGRESS],
            bind(agents.handle_progress),
            latency=Latency.QUIET,
        ),
        # Statistics and step-mail enrolments: nobody waits on them to the millisecond, and
        # on the embedded broker every fetch waits its full time (each poll costs CPU here
        # and in the broker): 4 polls a second instead of 20, bigger batches.
        ConsumerSpec(
            "scheduler.feedback",
            [Topic.FEEDBACK_EVENTS],
            bind(agents.handle_feedback),
            max_records=5000,
            latency=Latency.QUIET,
        ),
        # The complaint guard's holds: a few records per tripped campaign.
        ConsumerSpec(
            "scheduler.guard",
            [Topic.CAMPAIGN_GUARD],
            bind(agents.handle_guard),
            latency=Latency.QUIET,
        ),
        ConsumerSpec(
            "scheduler.memberships",
            [Topic.SUPPRESSION_CHANGES],
            bind(agents.handle_memberships),
            max_records=5000,
            latency=Latency.QUIET,
        ),
    ]

    async def release_loop() -> None:
        await release.run(ctx(), functools.partial(runtime.beat, "release"))

    async def close_clients() -> None:
        await ctx().contacts.close()
        await ctx().results.close()

    runtime.background = [release_loop]
    runtime.on_stop = [close_clients]

    def setup_routes(app: web.Application) -> None:
        app[CONTEXT] = ctx()
        app.router.add_routes(api.routes)
        app.router.add_routes(plans_api.routes)
        app.router.add_routes(guard_api.routes)

    runtime.setup_routes = setup_routes
    return runtime
