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
    """Load the settings, configure logging, serve until stopped. Whatever ends the service
    with an error is one JSON line (``service_failed``, its traceback inside) and exit 1; a
    dependency away at start is waited for (one line per attempt), not an error."""
    settings = load(settings_cls)
    tlog.configure(settings.service, settings.log_level)
    log = tlog.get_logger(__name__)
    log.info("service_configuring", settings=repr(settings))
    uvloop.install()
    quiet_collector()
    try:
        asyncio.run(build(settings).serve_forever())
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        log.error("service_failed", error=str(exc.code))
        raise SystemExit(1) from None
    except Exception as exc:
        log.error("service_failed", error=repr(exc), exc_info=exc)
        raise SystemExit(1) from None


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
