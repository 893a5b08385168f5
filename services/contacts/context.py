"""What the contacts service's views and handlers share at run time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from libs.common.kafka import Publisher
from services.contacts.settings import ContactsSettings
from services.contacts.store import FieldCache

#: import jobs running at once per process.
MAX_PARALLEL_IMPORTS = 2


@dataclass
class Context:
    settings: ContactsSettings
    pool: asyncpg.Pool
    publisher: Publisher
    fields: FieldCache = field(default_factory=FieldCache)
    #: running import jobs by id, kept so they are not garbage-collected and stop with us.
    import_jobs: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    #: at most MAX_PARALLEL_IMPORTS jobs run at once here; the others wait (queued).
    import_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_PARALLEL_IMPORTS)
    )


CONTEXT = web.AppKey("contacts", Context)
