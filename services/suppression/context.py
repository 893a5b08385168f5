"""What the suppression service's views and handlers share at run time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from libs.common.kafka import Publisher
from libs.common.mail.unsubscribe import UnsubscribeLinks
from libs.common.outbox import OutboxRelay
from services.suppression.settings import SuppressionSettings


@dataclass
class Context:
    settings: SuppressionSettings
    pool: asyncpg.Pool
    publisher: Publisher
    #: this process's relay, woken by a change queued without a NOTIFY (the unsubscribe link).
    outbox: OutboxRelay
    links: UnsubscribeLinks = field(init=False)
    #: running sync jobs, so they are not garbage-collected and can be cancelled on stop.
    jobs: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.links = UnsubscribeLinks(self.settings.signing_keys, self.settings.public_base_url)


CONTEXT = web.AppKey("suppression", Context)
