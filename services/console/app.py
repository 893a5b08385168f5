"""The console: its schema, its pages and the API client it reaches the services with.

Unlike the six services it has no Kafka part: a pool for its own schema (users, sessions,
preferences, audit), one HTTP client for the services' APIs, and the pages. ``/healthz``,
``/readyz`` (the console database and each service's ``/healthz``) and ``/metrics`` as
every service has.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from libs.common import db, runner
from libs.common import metrics as tayori_metrics
from libs.common.http import dumps
from libs.common.logging import get_logger
from libs.common.retry import retry
from services.console import web as pages
from services.console.clients import DOWNSTREAM_ERRORS, Api
from services.console.screens import SCREENS
from services.console.settings import ConsoleSettings
from services.console.users import MIGRATIONS, SCHEMA

__all__ = ["MIGRATIONS", "SCHEMA", "Console", "build"]

log = get_logger(__name__)
STATIC = Path(__file__).with_name("static")
#: the largest request body: an import's CSV file with its form.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024


def _json(data: Any, status: int) -> web.Response:
    return web.Response(text=dumps(data), status=status, content_type="application/json")


class Console:
    """One running console."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.api = Api(
            settings.service_urls(), settings.role_tokens(), settings.api_timeout_seconds
        )
        self.pool: asyncpg.Pool | None = None
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._metrics = tayori_metrics.registry(())

    async def start(self, *, migrate: bool = True) -> None:
        s = self.settings
        if migrate:
            await retry(
                lambda: db.migrate(s.database_url, SCHEMA, MIGRATIONS),
                name="connect:database",
                service=s.service,
            )
        pool = await retry(
            lambda: db.create_pool(
                s.database_url,
                SCHEMA,
                size=s.db_pool_size,
                connect_timeout=s.db_connect_timeout_seconds,
            ),
            name="connect:database",
            service=s.service,
        )
        db.observe_pool(pool, s.service)
        self.pool = pool
        await self.api.start()
        self.app = self.build_app()
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=5.0,
            keepalive_timeout=15.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http_host, s.http_port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.http_port
        log.info("service_started", http_port=self.port, schema=SCHEMA)

    def build_app(self) -> web.Application:
        assert self.pool is not None
        app = pages.create_web_app(self.settings, MAX_UPLOAD_BYTES)
        app[pages.POOL] = self.pool
        app[pages.API] = self.api
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_static("/static", STATIC, append_version=True)
        for screen in SCREENS:
            app.router.add_routes(screen.routes)
        return app

    @pages.page(None)
    async def healthz(self, _: web.Request) -> web.Response:
        """Liveness: the process answers (the console has no loops of its own)."""
        return _json({"status": "ok"}, 200)

    @pages.page(None)
    async def readyz(self, _: web.Request) -> web.Response:
        """Readiness: the console's database answers; the services' health is reported
        beside it (a service away makes its pages say so, not the console unready)."""
        assert self.pool is not None
        checks = {"database": await db.reachable(self.pool)}
        services = await self._services()
        ok = checks["database"] == "ok"
        return _json(
            {"status": "ready" if ok else "not_ready", **checks, "services": services},
            200 if ok else 503,
        )

    async def _services(self) -> dict[str, str]:
        """Each service's ``/healthz``: "ok", its status, or why it cannot be reached."""
        session = self.api.session
        assert session is not None

        async def one(name: str, url: str) -> tuple[str, str]:
            try:
                async with asyncio.timeout(2), session.get(f"{url}/healthz") as response:
                    return name, "ok" if response.status == 200 else f"HTTP {response.status}"
            except DOWNSTREAM_ERRORS as exc:
                return name, f"unreachable: {type(exc).__name__}"

        found = await asyncio.gather(*(one(n, u) for n, u in self.api.urls.items()))
        return dict(found)

    @pages.page(None)
    async def metrics(self, _: web.Request) -> web.Response:
        # The common families (HTTP requests, the database pool) and the process's: the
        # console owns none of its own (libs/common/metrics.OWNED).
        response = web.Response(body=generate_latest(self._metrics))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    async def stop(self) -> None:
        log.info("service_stopping")
        if self._runner is not None:
            await self._runner.cleanup()
        await self.api.close()
        if self.pool is not None:
            await self.pool.close()
        log.info("service_stopped")

    async def serve_forever(self) -> None:
        await runner.serve_until_signalled(self.start, self.stop)


def build(settings: ConsoleSettings) -> Console:
    return Console(settings)
