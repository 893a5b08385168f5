"""The exporter service: its topics, consumers, routes and background jobs in one place.

Inputs: HTTP API, export.requests (its own API's requests, run by whichever replica owns
the partition), jobs.events (imports, sync runs and exports of every service: the jobs
list). Outputs through the outbox: export.requests, export.completed, jobs.events,
mail.system (the requester's download link). Rows come from the contacts and scheduler
HTTP streams (SPEC §9); files go to EXPORT_DIR.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common import metrics
from libs.common.service import ConsumerSpec, LazyContext, Runtime
from libs.common.topics import Topic
from services.exporter import agents, api, jobs
from services.exporter.context import CONTEXT, Context
from services.exporter.settings import ExporterSettings

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA = "exporter"
#: the topics it publishes to (its consumers' topics are in build): for docs/asyncapi.json
PRODUCES = (
    Topic.EXPORT_REQUESTS,
    Topic.EXPORT_COMPLETED,
    Topic.JOBS_EVENTS,
    Topic.MAIL_SYSTEM,
)


def build(settings: ExporterSettings) -> Runtime:
    runtime = Runtime(
        settings=settings,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        title="Tayori exporter",
        metrics=metrics.EXPORTER,
    )
    ctx = LazyContext(lambda: Context(settings, runtime.pool, runtime.publisher))
    bind = ctx.bind

    runtime.consumers = [
        ConsumerSpec("exporter.requests", [Topic.EXPORT_REQUESTS], bind(agents.handle_requests)),
        ConsumerSpec("exporter.jobs", [Topic.JOBS_EVENTS], bind(agents.handle_jobs_events)),
    ]

    async def resume_exports() -> None:
        await jobs.resume(ctx())

    async def sweep_expired() -> None:
        await jobs.sweeper(ctx())

    async def stop_exports() -> None:
        if ctx.made is not None:
            await jobs.stop(ctx.made)

    runtime.background = [resume_exports, sweep_expired]
    runtime.on_stop = [stop_exports]

    def setup_routes(app: web.Application) -> None:
        app[CONTEXT] = ctx()
        app.router.add_routes(api.routes)

    runtime.setup_routes = setup_routes
    return runtime
