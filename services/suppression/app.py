"""The suppression service: its topics, consumers, routes and background jobs in one place.

Inputs: suppression.commands (joins from contacts, upstream changes), bounce.events,
contacts.changelog (addresses). Outputs through the outbox: suppression.changes,
jobs.events, mail.system (sync completion mails).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common import metrics
from libs.common.service import ConsumerSpec, LazyContext, Runtime
from libs.common.topics import Topic
from services.suppression import agents, api, public, sync
from services.suppression.context import CONTEXT, Context
from services.suppression.settings import SuppressionSettings

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA = "suppression"
#: the topics it publishes to (its consumers' topics are in build): for docs/asyncapi.json
PRODUCES = (
    Topic.SUPPRESSION_CHANGES,
    Topic.JOBS_EVENTS,
    Topic.MAIL_SYSTEM,
)


def build(settings: SuppressionSettings) -> Runtime:
    runtime = Runtime(
        settings=settings,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        title="Tayori suppression",
        metrics=metrics.SUPPRESSION,
    )
    ctx = LazyContext(lambda: Context(settings, runtime.pool, runtime.publisher, runtime.outbox))
    bind = ctx.bind

    runtime.consumers = [
        ConsumerSpec(
            "suppression.commands", [Topic.SUPPRESSION_COMMANDS], bind(agents.handle_commands)
        ),
        ConsumerSpec("suppression.bounces", [Topic.BOUNCE_EVENTS], bind(agents.handle_bounces)),
        ConsumerSpec(
            "suppression.contacts", [Topic.CONTACTS_CHANGELOG], bind(agents.handle_changelog)
        ),
    ]

    async def resume_sync_jobs() -> None:
        await sync.resume(ctx())

    async def stop_sync_jobs() -> None:
        await sync.stop(ctx())

    runtime.background = [resume_sync_jobs]
    runtime.on_stop = [stop_sync_jobs]

    def setup_routes(app: web.Application) -> None:
        app[CONTEXT] = ctx()
        app.router.add_routes(api.routes)
        app.router.add_routes(public.routes)

    runtime.setup_routes = setup_routes
    return runtime
