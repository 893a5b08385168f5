"""What the scheduler's views, handlers and release loop share at run time."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web

from libs.common.kafka import Publisher
from services.scheduler.clock import Clock, SystemClock
from services.scheduler.contacts_client import ContactsClient
from services.scheduler.fence import ResultsProgress
from services.scheduler.settings import SchedulerSettings


@dataclass
class Context:
    settings: SchedulerSettings
    pool: asyncpg.Pool
    publisher: Publisher
    #: now(), replaceable by tests (see services/scheduler/clock.py).
    clock: Clock = field(default_factory=SystemClock)
    contacts: ContactsClient = field(init=False)
    #: release loop ticks completed (tests wait for a few to see that nothing happened).
    ticks: int = 0
    #: per-campaign token buckets of the paced release (process-local).
    buckets: dict[str, Any] = field(default_factory=dict)
    #: per campaign, when (context clock) its overdue rows were last looked for.
    overdue_checked: dict[str, dt.datetime] = field(default_factory=dict)
    #: per campaign, when (time.monotonic) this process last published a checkpoint.
    checkpoint_issued: dict[str, float] = field(default_factory=dict)
    #: how far delivery.results goes and how far it was counted (checkpoint fences).
    results: ResultsProgress = field(init=False)
    #: content ids this process has published on campaign.content (acknowledged).
    published_contents: set[str] = field(default_factory=set)
    #: releases per second and campaign; starts as SCHEDULER_RELEASE_RATE (tests lower it).
    release_rate: float = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.release_rate = s.release_rate
        self.contacts = ContactsClient(s.contacts_url, s.admin_token, s.contacts_timeout_seconds)
        self.results = ResultsProgress(s)


CONTEXT = web.AppKey("scheduler", Context)


def context_of(runtime: Any) -> Context:
    """The context of a started scheduler runtime (tests: ``context_of(runtime).clock = ...``)."""
    return runtime.app[CONTEXT]
