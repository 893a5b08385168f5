"""The bounce processor: its topics, listener, loops and routes in one place (SPEC §5).

Inputs: ``delivery.results`` (synchronous SMTP outcomes), ``suppression.changes`` (an
operator clearing a bounced address), DSN and ARF mail on its own SMTP
listener (``BOUNCE_SMTP_PORT``, the MX of ``BOUNCE_DOMAIN``), the public tracking
endpoints ``/t/o`` and ``/t/c``, the public ESP event webhooks ``/esp/<esp>``
(:mod:`.webhooks`). Outputs through the outbox: ``bounce.events`` (suppression
stops bounced and complained addresses; contacts shows the delivery status) and
``feedback.events`` (contacts' history and score, the scheduler's campaign statistics).
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

from aiohttp import web

from libs.common import metrics
from libs.common.service import ConsumerSpec, LazyContext, Runtime
from libs.common.topics import Topic
from services.bounce_processor import agents, api, maintenance, webhooks
from services.bounce_processor.batcher import GroupWriter
from services.bounce_processor.context import CONTEXT, Context
from services.bounce_processor.inbound import Listener, ReturnPathHandler
from services.bounce_processor.settings import BounceSettings

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA = "bounce_processor"
#: the topics it publishes to (its consumers' topics are in build): for docs/asyncapi.json
PRODUCES = (
    Topic.BOUNCE_EVENTS,
    Topic.FEEDBACK_EVENTS,
)


def build(settings: BounceSettings) -> Runtime:
    runtime = Runtime(
        settings=settings,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        title="Tayori bounce processor",
        metrics=metrics.BOUNCE_PROCESSOR,
    )

    def make() -> Context:
        arrived = asyncio.Event()
        mail_writer = GroupWriter(
            functools.partial(agents.store_inbound, runtime.pool, arrived),
            name="store_inbound",
            service=settings.service,
        )
        hit_writer = GroupWriter(
            functools.partial(agents.store_hits, runtime.pool, settings.soft_threshold),
            name="store_hits",
            service=settings.service,
        )
        listener = Listener(settings, ReturnPathHandler(settings.bounce_domain, mail_writer))
        return Context(
            settings,
            runtime.pool,
            runtime.publisher,
            mail_writer,
            hit_writer,
            listener,
            mail_arrived=arrived,
        )

    ctx = LazyContext(make)
    runtime.consumers = [
        ConsumerSpec(
            "bounce_processor.results",
            [Topic.DELIVERY_RESULTS],
            ctx.bind(agents.handle_delivery_results),
        ),
        ConsumerSpec(
            "bounce_processor.suppression",
            [Topic.SUPPRESSION_CHANGES],
            ctx.bind(agents.handle_suppression_changes),
        ),
    ]

    async def write_mail() -> None:
        await ctx().mail_writer.run()

    async def write_hits() -> None:
        await ctx().hit_writer.run()

    async def read_mail() -> None:
        await agents.inbound_loop(ctx(), functools.partial(runtime.beat, "inbound_mail"))

    async def listen() -> None:
        # Started here, after the writers exist: a 250 needs the mail writer running.
        await ctx().listener.start()

    async def stop_listening() -> None:
        made = ctx.made
        if made is not None:
            await made.listener.stop()

    async def upkeep() -> None:
        await maintenance.run_forever(ctx())

    runtime.background = [write_mail, write_hits, read_mail, listen, upkeep]
    runtime.on_stop = [stop_listening]

    def setup_routes(app: web.Application) -> None:
        app[CONTEXT] = ctx()
        app[webhooks.WEBHOOKS] = webhooks.Webhooks(settings)
        app.router.add_routes(api.routes)
        app.router.add_routes(webhooks.routes)

    runtime.setup_routes = setup_routes
    return runtime
