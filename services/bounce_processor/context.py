"""What the bounce processor's views, handlers and loops share at run time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from libs.common.kafka import Publisher
from libs.common.mail.tracking import TrackingLinks
from libs.common.mail.verp import VerpAddresses
from services.bounce_processor.batcher import GroupWriter
from services.bounce_processor.inbound import InboundMail, Listener
from services.bounce_processor.settings import BounceSettings
from services.bounce_processor.store import Hit


@dataclass
class Context:
    settings: BounceSettings
    pool: asyncpg.Pool
    publisher: Publisher
    #: group commits of inbound mail (before the 250) and tracking hits (before the answer).
    mail_writer: GroupWriter[InboundMail]
    hit_writer: GroupWriter[Hit]
    listener: Listener
    verp: VerpAddresses = field(init=False)
    links: TrackingLinks = field(init=False)
    #: set when stored mail waits to be read (the mail loop also polls, for other replicas').
    mail_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.verp = VerpAddresses(self.settings.signing_keys, self.settings.bounce_domain)
        self.links = TrackingLinks(self.settings.signing_keys, self.settings.tracking_base_url)


CONTEXT = web.AppKey("bounce_processor", Context)
