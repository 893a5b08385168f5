"""What the sender's handlers share at run time: pool, composer, ledger, relays, control."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from libs.common.kafka import Publisher
from services.sender import processor
from services.sender.compose import Composer
from services.sender.deferrals import DeferralsOut
from services.sender.holding import Holder
from services.sender.ledger import Delivery, Ledger, OwnerLock
from services.sender.replan import ReplannedConnection
from services.sender.settings import SenderSettings
from services.sender.smtp import RelayPool

#: the sender's PostgreSQL schema.
SCHEMA = "sender"


@dataclass
class Context:
    settings: SenderSettings
    pool: asyncpg.Pool
    publisher: Publisher
    composer: Composer = field(init=False)
    ledger: Ledger = field(init=False)
    relays: RelayPool = field(init=False)
    owner: OwnerLock = field(init=False)
    #: held deliveries' rows (holding.py).
    holder: Holder = field(init=False)
    #: the 4xx answers retried inside the sender, out on delivery.deferrals (deferrals.py).
    deferrals: DeferralsOut = field(init=False)
    #: campaigns that must not send now (paused, halted, cancelled), as committed by the
    #: campaign.control consumer: a delivery still queued for one is abandoned.
    stopped: dict[str, str] = field(default_factory=dict)
    #: each campaign's receiving domains whose mail is held (a campaign.control pause with
    #: domains), likewise: a delivery still queued to one of them is abandoned.
    held: dict[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.composer = Composer(self.settings)
        self.owner = OwnerLock(
            self.settings.database_url,
            SCHEMA,
            connect_timeout=self.settings.db_connect_timeout_seconds,
        )
        cycles = ReplannedConnection(self.settings.database_url, SCHEMA)
        self.ledger = Ledger(self.pool, self.settings.service, cycles, self.publisher)
        self.holder = Holder(self.pool, self.settings.service, self.owner.key)
        self.ledger.held_recorded = self.holder.recorded
        self.deferrals = DeferralsOut(self.publisher)
        self.relays = RelayPool(
            self.settings,
            self.ledger,
            still_wanted=self.still_wanted,
            hold=self.holder.hold,
            abandoned=self.holder.abandoned,
            deferrals=self.deferrals.deferred,
        )
        self.ledger.start()
        self.holder.start()
        self.relays.start()

    def still_wanted(self, delivery: Delivery) -> bool:
        return (
            delivery.kind != "campaign"
            or processor.stop_of(delivery.campaign_id, delivery.email, self.stopped, self.held)
            is None
        )

    async def stop(self) -> None:
        await self.relays.stop()
        await self.ledger.stop()
        await self.holder.stop()
        await self.deferrals.stop()


CONTEXT = web.AppKey("sender", Context)
