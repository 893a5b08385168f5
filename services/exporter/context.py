"""What the exporter's views, handlers and background loops share at run time."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from aiohttp import web

from libs.common.kafka import Publisher
from libs.common.mail.tokens import Signer
from services.exporter.settings import ExporterSettings
from services.exporter.sources import Sources


def system_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Context:
    settings: ExporterSettings
    pool: asyncpg.Pool
    publisher: Publisher
    #: now() for link expiry and job times; tests put a FakeClock's ``now`` here
    #: (``context_of(runtime).clock = FakeClock(...).now``, services/scheduler/clock.py).
    clock: Callable[[], dt.datetime] = system_now
    sources: Sources = field(init=False)
    signer: Signer = field(init=False)
    time_zone: ZoneInfo = field(init=False)
    #: running export tasks, kept so they are not garbage-collected and stop with us.
    jobs: set[asyncio.Task[None]] = field(default_factory=set)
    #: at most EXPORT_CONCURRENCY exports write at once; the rest wait (queued).
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.sources = Sources(self.settings)
        self.signer = Signer(self.settings.signing_keys, "download")
        self.time_zone = ZoneInfo(self.settings.time_zone)
        self.slots = asyncio.Semaphore(max(1, self.settings.concurrency))


CONTEXT = web.AppKey("exporter", Context)


def context_of(runtime: Any) -> Context:
    """The context of a started exporter runtime (tests: ``context_of(runtime).clock = ...``)."""
    return runtime.app[CONTEXT]
