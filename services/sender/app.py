"""The sender service: its topics, consumers and background parts in one place.

Inputs: send.requests (big batches), campaign.content (each campaign's content, once),
campaign.control, mail.system, suppression.changes (its own last-mile
copy). Outputs: SMTP to the relays, delivery.results (published once
the ledger committed them; ledger.py), delivery.deferrals (each 4xx retried here, when it
happens; deferrals.py) and send.progress (answers to the release checkpoints
among send.requests; progress.py). HTTP: /v1/relays, /v1/ledger/{campaign_id}, the
per-domain overrides /v1/domains/{domain}/override and /v1/domain-overrides (api.py), and
/healthz, /readyz, /metrics from the runtime. Every replica also reads the whole of
domain.policy, in no group, into its per-domain pacing (policyfeed.py).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common import metrics
from libs.common.http import daily
from libs.common.kafka import Concurrency, Latency
from libs.common.service import ConsumerSpec, LazyContext, Runtime
from libs.common.topics import Topic
from services.sender import agents, api, maintenance, overrides
from services.sender.context import CONTEXT, SCHEMA, Context
from services.sender.policyfeed import PolicyFeed
from services.sender.settings import SenderSettings

MIGRATIONS = Path(__file__).with_name("migrations")
#: the topics it publishes to (its consumers' topics are in build): for docs/asyncapi.json
PRODUCES = (
    Topic.DELIVERY_RESULTS,
    Topic.DELIVERY_DEFERRALS,
    Topic.SEND_PROGRESS,
)
#: the topics every replica reads whole, in no consumer group (docs/asyncapi.json):
#: each domain's published policy (policyfeed.py).
FOLLOWS = (Topic.DOMAIN_POLICY,)
__all__ = ["FOLLOWS", "MIGRATIONS", "PRODUCES", "SCHEMA", "build"]


def build(settings: SenderSettings) -> Runtime:
    # A malformed SMTP_RELAYS stops the start, not the first send. Each relay's sent count
    # exists from the start, at zero: an alert on a flat count (TayoriSendingStalled) then
    # sees a sender that never sent since it started.
    for host, port in settings.relays():
        metrics.SENDER_SENDS.labels("campaign", "sent", f"{host}:{port}")
    runtime = Runtime(
        settings=settings,
        schema=SCHEMA,
        migrations=MIGRATIONS,
        title="Tayori sender",
        metrics=metrics.SENDER,
    )
    ctx = LazyContext(lambda: Context(settings, runtime.pool, runtime.publisher))
    bind = ctx.bind

    runtime.consumers = [
        ConsumerSpec(
            "sender.requests",
            [Topic.SEND_REQUESTS],
            bind(agents.handle_send_requests),
            max_records=settings.send_batch,
            # A batch ends waiting for its last replies, its flush and its results'
            # publication, with the SMTP connections idle; the next partition's batch fills
            # that tail. Safe: every producer keys send.requests by contact, so a ledger key
            # is in one partition and never in two batches at once.
            concurrency=Concurrency.AT_ONCE,
        ),
        # Quiet topics nobody waits on to the millisecond: a long fetch wait (on the
        # embedded broker every fetch waits its full time, and each poll costs CPU here
        # and in the broker whether or not anything arrived).
        ConsumerSpec(
            "sender.control",
            [Topic.CAMPAIGN_CONTROL],
            bind(agents.handle_control),
            latency=Latency.QUIET,
        ),
        ConsumerSpec(
            "sender.contents",
            [Topic.CAMPAIGN_CONTENT],
            bind(agents.handle_contents),
            latency=Latency.QUIET,
        ),
        ConsumerSpec(
            "sender.system",
            [Topic.MAIL_SYSTEM],
            bind(agents.handle_system_mail),
            latency=Latency.QUIET,
        ),
        # The last-mile copy is read at the last moment before SMTP: a change applied a
        # quarter of a second later changes nothing that matters. (It was latency-critical,
        # 10 ms: 100 polls a second, 3.7% of a core here and ~9% in the broker, idle.)
        ConsumerSpec(
            "sender.suppression",
            [Topic.SUPPRESSION_CHANGES],
            bind(agents.handle_suppression_changes),
            max_records=5000,
            latency=Latency.QUIET,
        ),
    ]

    async def start_delivery() -> None:
        await agents.load_stopped(ctx())

    async def hold_owner_lock() -> None:
        await ctx().owner.hold()

    async def held_sweep() -> None:
        await agents.sweep_held_forever(ctx())

    async def stop_delivery() -> None:
        if (context := ctx.made) is not None:
            await context.stop()

    def setup_routes(app: web.Application) -> None:
        app[CONTEXT] = ctx()
        app[api.PAST_DAYS] = daily.PastDays()
        app.router.add_routes(api.routes)

    async def upkeep() -> None:
        await maintenance.run_forever(ctx())

    async def domain_overrides() -> None:
        await overrides.refresh_forever(ctx())

    async def domain_policies() -> None:
        context = ctx()
        await PolicyFeed(settings, context.publisher, context.relays.pacing).run_forever()

    runtime.background = [
        start_delivery,
        hold_owner_lock,
        held_sweep,
        upkeep,
        domain_overrides,
        domain_policies,
    ]
    runtime.setup_routes = setup_routes
    runtime.on_stop = [stop_delivery]
    return runtime
