"""What the contacts service's views and handlers share at run time."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from libs.common.kafka import Publisher
from services.contacts.settings import ContactsSettings
from services.contacts.store import FieldCache


@dataclass
class Context:
    settings: ContactsSettings
    pool: asyncpg.Pool
    publisher: Publisher
    fields: FieldCache = field(default_factory=FieldCache)


CONTEXT = web.AppKey("contacts", Context)
