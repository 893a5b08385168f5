"""Process entry point shared by every service: settings, logging, uvloop, serve."""

from __future__ import annotations

import asyncio
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
    asyncio.run(build(settings).serve_forever())


def migrate_service(settings_cls: type[S], schema: str, migrations: Any) -> list[str]:
    from libs.common.db import migrate

    settings = load(settings_cls)
    tlog.configure(settings.service, settings.log_level)
    return asyncio.run(migrate(settings.database_url, schema, migrations))
