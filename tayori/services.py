"""The services and how to find one's parts: its app module and settings class.

Shared by the CLI (``tayori <service>``, ``tayori migrate``) and ``tayori dev``, which
both need them and otherwise do not depend on each other.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from libs.common.settings import CommonSettings

SERVICES = (
    "contacts",
    "suppression",
    "scheduler",
    "sender",
    "bounce_processor",
    "exporter",
    "deliverability",
)
#: the console (issue 20): pages for people, a client of the services' APIs; it has a
#: schema and migrations like them but no Kafka part and no API of its own.
CONSOLE = "console"


def service_parts(name: str) -> tuple[ModuleType, type[CommonSettings]]:
    """The app module (``build``, and ``SCHEMA`` and ``MIGRATIONS`` when it has a
    database; deliverability has none) and settings class of ``name``."""
    if name not in (*SERVICES, CONSOLE):
        raise SystemExit(f"tayori: no service {name!r} (have: {', '.join(SERVICES)})")
    app = importlib.import_module(f"services.{name}.app")
    settings = importlib.import_module(f"services.{name}.settings")
    settings_cls = next(
        getattr(settings, attr)
        for attr in dir(settings)
        if attr.endswith("Settings") and attr != "CommonSettings"
    )
    return app, settings_cls
