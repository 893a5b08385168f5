"""A console against real services, shared by the console's test modules: one database, one
topic prefix and one set of services per module (starting them per test would cost seconds
each)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest_asyncio

from libs.common import db
from libs.common.kafka import ensure_topics
from services.console import auth
from services.console.app import SCHEMA, Console
from services.console.settings import ConsoleSettings
from tayori.embedded import free_port
from tests.conftest import (
    HANG_SECONDS,
    Kafka,
    Service,
    Stack,
    publishing,
    running,
    settings_for,
    task_stacks,
    within,
)

PASSWORD = "correct horse battery"
USERS = {"admin": "admin", "operator": "operator", "viewer": "viewer"}


@dataclasses.dataclass
class ConsoleStack:
    console: Console
    services: dict[str, Service]
    base: str
    dsn: str
    #: the services' topic prefix (a test publishing records as a service would)
    prefix: str

    def api(self, name: str) -> Any:
        return self.services[name].api


@contextlib.asynccontextmanager
async def console_stack(
    stack: Stack,
    template_db: str,
    names: tuple[str, ...],
    *,
    service_overrides: dict[str, dict[str, Any]] | None = None,
    **console_overrides: Any,
) -> AsyncIterator[ConsoleStack]:
    """The services ``names`` (each with its ``service_overrides``) and a console reaching
    them (the others at a closed port), with one user per role (username = role, password
    PASSWORD)."""
    dsn = await stack.postgres.create_database(f"c_{uuid.uuid4().hex[:12]}", template=template_db)
    prefix = f"c{uuid.uuid4().hex[:10]}."
    await ensure_topics(stack.broker.bootstrap, prefix, partitions=2)
    async with contextlib.AsyncExitStack() as exits:
        services: dict[str, Service] = {}
        for name in names:
            extra: dict[str, Any] = {}
            if name in ("exporter", "scheduler") and "contacts" in services:
                extra["contacts_url"] = services["contacts"].api.base
            if name == "exporter":
                extra.update(
                    export_dir=stack.home / f"exports-{prefix}",
                    sweep_seconds=0.2,
                    public_url=console_overrides.pop("exporter_public_url", "http://x"),
                )
            extra.update((service_overrides or {}).get(name, {}))
            services[name] = await exits.enter_async_context(
                running(name, stack, dsn, prefix, **extra)
            )
        closed = f"http://127.0.0.1:{free_port()}"
        urls = {
            f"{name}_url": services[name].api.base if name in services else closed
            for name in (
                "contacts",
                "suppression",
                "scheduler",
                "sender",
                "bounce_processor",
                "exporter",
            )
        }
        settings = settings_for(
            ConsoleSettings, stack, dsn, prefix, **{**urls, **console_overrides}
        )
        console = Console(settings)
        # stopped even when its start fails half-way (its pool and client session closed,
        # not left for the garbage collector to warn about in a later test)
        exits.push_async_callback(lambda: within(HANG_SECONDS, "console stop", console.stop()))
        await within(HANG_SECONDS, "the console's start", console.start())
        conn = await db.connect(dsn, SCHEMA)
        try:
            for username, role in USERS.items():
                await auth.save_user(conn, username, PASSWORD, role, f"{username}@example.jp")
        finally:
            await conn.close()
        yield ConsoleStack(console, services, f"http://127.0.0.1:{console.port}", dsn, prefix)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def site_kafka(stack: Stack, site: ConsoleStack) -> AsyncIterator[Kafka]:
    """The topics of the module's ``site`` (its ConsoleStack fixture), published to as a
    service would; a module takes it as its ``kafka`` (``kafka = site_kafka``)."""
    async with publishing(stack, site.prefix) as kafka:
        yield kafka


class Browserless:
    """A cookie-keeping HTTP client for the console's pages (no browser)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path, allow_redirects=True, **kwargs) as r:
            return r.status, await r.text(), r

    async def post(
        self, path: str, data: Any, *, follow: bool = True
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.post(self.base + path, data=data, allow_redirects=follow) as r:
            return r.status, await r.text(), r

    def csrf(self, html: str) -> str:
        marker = 'name="csrf" value="'
        start = html.index(marker) + len(marker)
        return html[start : html.index('"', start)]

    async def login(self, username: str, password: str = PASSWORD) -> tuple[int, str]:
        _, html, _ = await self.get("/login")
        status, text, _ = await self.post(
            "/login", {"csrf": self.csrf(html), "login": username, "password": password}
        )
        return status, text


def _keepalive_handler(task: asyncio.Task[Any]) -> bool:
    """A task of the module's long-lived services: a server's handler of a kept-alive
    connection (the console keeps its connections to the services open between tests, as in
    production) or the Kafka client's own (a producer's send, started on first use)."""
    coro = task.get_coro()
    if getattr(coro, "__qualname__", "") == "RequestHandler.start":
        return True
    code = getattr(coro, "cr_code", None)
    return code is not None and "/aiokafka/" in code.co_filename


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def no_leaked_tasks_but_keepalives() -> AsyncIterator[None]:
    """conftest's leak guard for a module whose services outlive each test: a kept-alive
    connection's handler is the module's, anything else a test leaves running fails it."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    leaked = [
        t
        for t in asyncio.all_tasks() - before
        if not t.done() and t is not asyncio.current_task() and not _keepalive_handler(t)
    ]
    if leaked:
        await asyncio.wait(leaked, timeout=5)
        leaked = [t for t in leaked if not t.done()]
    if leaked:
        stacks = task_stacks(leaked)
        for task in leaked:
            task.cancel()
        raise AssertionError(f"tasks leaked (now cancelled):\n{stacks}")
