"""Process entry point shared by every service: settings, logging, uvloop, serve."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any, TypeVar

import uvloop

from libs.common import logging as tlog
from libs.common.settings import CommonSettings, load

S = TypeVar("S", bound=CommonSettings)


def run_service(settings_cls: type[S], build: Callable[[S], Any]) -> None:
    settings = load(settings_cls)
    tlog.configure(settings.service, settings.log_level)
    tlog.get_logger(__name__).info("service_configuring", settings=repr(settings))
    uvloop.install()
    quiet_collector()
    asyncio.run(build(settings).serve_forever())


#: objects allocated (net) between two young-generation collections; CPython's default is
#: 700. A campaign's messages each allocate dozens of containers that live for a batch
#: (requests, deliveries, futures, results), so with 700 the collector ran every few
#: messages, traversed them again and again and promoted them, making full collections
#: frequent too.
GC_YOUNG_THRESHOLD = 50_000


def quiet_collector() -> None:
    """Less work for the cyclic garbage collector in a long-running service: what exists
    after start-up (modules, codecs, settings) is frozen out of every collection
    (``gc.freeze``), and young collections run every GC_YOUNG_THRESHOLD allocations.
    Reference counting still frees almost everything at once; only cycles wait longer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def migrate_service(settings_cls: type[S], schema: str, migrations: Any) -> list[str]:
    from libs.common.db import migrate

    settings = load(settings_cls)
    tlog.configure(settings.service, settings.log_level)
    return asyncio.run(migrate(settings.database_url, schema, migrations))
