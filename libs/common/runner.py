"""Process entry point shared by every service: settings, logging, uvloop, serve."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvloop

from libs.common import logging as tlog
from libs.common.settings import CommonSettings, ConfigError, load, refusals

S = TypeVar("S", bound=CommonSettings)


#: the exit status of a service that refuses to start on its settings.
EXIT_REFUSED = 2


def run_service(settings_cls: type[S], build: Callable[[S], Any]) -> None:
    """Run one service. Settings it cannot work with — unreadable, a placeholder secret,
    a TLS or SASL refusal by Kafka (:class:`ConfigError`) — are one JSON log line
    (``service_start_refused``) and exit status 2, not a traceback; whatever else ends the
    service with an error is one JSON line (``service_failed``, its traceback inside) and
    exit 1; a dependency away at start is waited for (one line per attempt), not an error."""
    settings = _settings(settings_cls)
    log = tlog.get_logger(__name__)
    log.info("service_configuring", settings=repr(settings))
    _refuse(settings)
    uvloop.install()
    quiet_collector()
    try:
        asyncio.run(build(settings).serve_forever())
    except ConfigError as exc:
        log.error("service_start_refused", problems=[str(exc)])
        raise SystemExit(EXIT_REFUSED) from None
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        log.error("service_failed", error=str(exc.code))
        raise SystemExit(1) from None
    except Exception as exc:
        log.error("service_failed", error=repr(exc), exc_info=exc)
        raise SystemExit(1) from None


def stop_signal() -> asyncio.Event:
    """An event SIGTERM (the pod's stop) or SIGINT (Ctrl-C) sets, in the running loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """``start``, then run until SIGTERM or SIGINT, then ``stop``: the whole life of a
    process that owns no consumer loop of :class:`~libs.common.service.Runtime`'s."""
    signalled = stop_signal()
    await start()
    await signalled.wait()
    await stop()


def _refuse(settings: CommonSettings) -> None:
    """Exit with one log line if the settings hold what no service may start with (the
    migrations too: a Kubernetes initContainer stops there, before the service would)."""
    problems = refusals(settings)
    if problems:
        tlog.get_logger(__name__).error("service_start_refused", problems=problems)
        raise SystemExit(EXIT_REFUSED)


def _settings(settings_cls: type[S]) -> S:
    """The service's settings, logging configured; a variable that cannot be read is one
    log line and exit status 2."""
    try:
        settings = load(settings_cls)
    except (ValueError, OSError) as exc:  # a bad value, a NAME_FILE that cannot be read
        service = next(f.default for f in dataclasses.fields(settings_cls) if f.name == "service")
        tlog.configure(str(service))
        tlog.get_logger(__name__).error("service_start_refused", problems=[str(exc)])
        raise SystemExit(EXIT_REFUSED) from None
    tlog.configure(settings.service, settings.log_level)
    return settings


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

    settings = _settings(settings_cls)
    _refuse(settings)
    return asyncio.run(migrate(settings.database_url, schema, migrations))
