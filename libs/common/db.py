"""PostgreSQL: the asyncpg pool, named SQL blocks, and ordered per-schema migrations.

Each service owns one schema. Its SQL lives in ``queries.sql`` as named blocks::

    -- name: upsert-contact
    INSERT INTO ...

loaded once (:class:`Queries`). Its migrations are ``migrations/NNNN_title.sql`` applied in
order, each in its own transaction, under an advisory lock so replicas starting together
do not race; ``<schema>.schema_migrations`` records what ran.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from libs.common.logging import get_logger
from libs.common.metrics import DB_POOL_CONNECTIONS, DB_POOL_WAITING

log = get_logger(__name__)
T = TypeVar("T")

_NAME = re.compile(r"^--\s*name:\s*([\w-]+)\s*$", re.MULTILINE)


class Queries(Mapping[str, str]):
    """The named SQL blocks of one ``.sql`` file: ``queries["upsert-contact"]``."""

    def __init__(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        parts = _NAME.split(text)
        self._sql: dict[str, str] = {}
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in self._sql:
                raise ValueError(f"{path}: query {name!r} defined twice")
            self._sql[name] = body.strip().rstrip(";")

    def __getitem__(self, name: str) -> str:
        return self._sql[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sql)

    def __len__(self) -> int:
        return len(self._sql)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind,
            encoder=lambda v: json.dumps(v, ensure_ascii=False),
            decoder=json.loads,
            schema="pg_catalog",
        )


async def _keep_session(_: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query (a round trip per release).

    asyncpg still rolls back an unfinished transaction and drops listener callbacks; the
    reset query would also undo session state, and Tayori leaves none on a released
    connection: no SET, cursors only inside transactions, and the outbox relay — the one
    holder of a session-level advisory lock (its leadership) and of a LISTEN, on the
    connection it keeps for its lifetime — unlocks and UNLISTENs before releasing it.
    """


class CountedPool(asyncpg.Pool):
    """asyncpg's pool, counting the callers waiting for a connection (``waiting``): every
    acquire, asyncpg's own ``fetch``/``execute``/``copy_*`` included, goes through the public
    ``acquire``, overridden here. A caller counts from its acquire until it holds a
    connection (a free one at once; otherwise when one comes back, or a new one connected).

    asyncpg makes its pools only through ``create_pool``, which takes no pool class: this
    one is made with the keywords ``create_pool`` passes (:func:`create_pool` below);
    tests/unit/test_db_pool.py pins them to the installed asyncpg."""

    __slots__ = ("waiting",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting = 0

    def acquire(self, *, timeout: float | None = None) -> Any:
        return _CountedAcquire(super().acquire(timeout=timeout), self)


class _CountedAcquire:
    """``pool.acquire()``, as ``async with`` or ``await``, counted while it waits."""

    __slots__ = ("_acquiring", "_pool")

    def __init__(self, acquiring: Any, pool: CountedPool) -> None:
        self._acquiring = acquiring
        self._pool = pool

    async def __aenter__(self) -> Any:
        self._pool.waiting += 1
        try:
            return await self._acquiring.__aenter__()
        finally:
            self._pool.waiting -= 1

    async def __aexit__(self, *exc: Any) -> None:
        await self._acquiring.__aexit__(*exc)

    def __await__(self) -> Any:
        return self._counted().__await__()

    async def _counted(self) -> Any:
        self._pool.waiting += 1
        try:
            return await self._acquiring
        finally:
            self._pool.waiting -= 1


async def create_pool(
    dsn: str, schema: str, *, size: int = 10, connect_timeout: float = 10.0
) -> CountedPool:
    """A pool whose connections see ``schema`` first and decode json/jsonb to Python.

    ``connect_timeout`` bounds each new connection (asyncpg's default is 60 s): during a
    failover a request should learn quickly that the database is away (503) and a loop
    should back off and try again, not hang."""
    pool = CountedPool(
        dsn,
        # asyncpg.create_pool's defaults for what Tayori does not set.
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        connect=None,
        setup=None,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        # Tayori's.
        min_size=1,
        max_size=size,
        timeout=connect_timeout,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"search_path": f"{schema},public", "application_name": f"tayori-{schema}"},
    )
    await pool  # connects min_size connections, as create_pool's pool does when awaited
    return pool


async def reachable(pool: asyncpg.Pool) -> str:
    """The database check of ``/readyz``: "ok" when ``pool`` answers a query within 2 s,
    else what stopped it."""
    try:
        async with asyncio.timeout(2):
            await pool.fetchval("SELECT 1")
        return "ok"
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return f"unreachable: {type(exc).__name__}"


def observe_pool(pool: CountedPool, service: str) -> None:
    """Export ``pool``'s connections by state (``tayori_db_pool_connections``: in_use, idle
    and max, from asyncpg's public counters) and its waiting callers
    (``tayori_db_pool_waiting``), read at each scrape."""
    DB_POOL_CONNECTIONS.labels(service, "max").set_function(pool.get_max_size)
    DB_POOL_CONNECTIONS.labels(service, "idle").set_function(pool.get_idle_size)
    DB_POOL_CONNECTIONS.labels(service, "in_use").set_function(
        lambda: pool.get_size() - pool.get_idle_size()
    )
    DB_POOL_WAITING.labels(service).set_function(lambda: pool.waiting)


async def connect(
    dsn: str,
    schema: str,
    *,
    settings: Mapping[str, str] | None = None,
    connect_timeout: float = 10.0,
) -> asyncpg.Connection:
    """One connection like a pool's (``schema`` first, json decoded), with extra server
    ``settings`` of its own."""
    server_settings = {"search_path": f"{schema},public", **(settings or {})}
    conn = await asyncpg.connect(dsn, server_settings=server_settings, timeout=connect_timeout)
    await _init_connection(conn)
    return conn


def migration_files(directory: Path) -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        number, _, title = path.stem.partition("_")
        if not number.isdigit():
            raise ValueError(f"migration {path.name}: name must start with a number")
        found.append((int(number), title, path))
    numbers = [n for n, _, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"migrations in {directory} must be numbered 1..N without gaps: {numbers}")
    return found


async def migrate(dsn: str, schema: str, directory: Path) -> list[str]:
    """Apply the pending migrations of ``schema``; returns the names applied."""
    from libs.common.outbox import DDL as outbox_ddl

    applied: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        lock_key = int.from_bytes(schema.encode()[:8].ljust(8, b"\0"), "big", signed=True)
        await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                r["version"]
                for r in await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
            }
            await conn.execute(f'SET search_path TO "{schema}", public')
            await conn.execute(outbox_ddl)
            for number, title, path in migration_files(directory):
                if number in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text(encoding="utf-8"))
                    await conn.execute(
                        f'INSERT INTO "{schema}".schema_migrations (version, name) VALUES ($1, $2)',
                        number,
                        title,
                    )
                applied.append(path.name)
                log.info("migration_applied", schema=schema, migration=path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)
    finally:
        await conn.close()
    return applied


_CLAIM = (
    "INSERT INTO processed_event (event_id) SELECT unnest($1::text[])"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)


async def claim_once(
    conn: asyncpg.Connection, items: Sequence[T], event_id: Callable[[T], str]
) -> list[T]:
    """The items whose id was never processed, each id once (a batch may hold a redelivered
    copy). The ids are recorded in the schema's ``processed_event`` table inside the
    caller's transaction, so they are forgotten again if it rolls back."""
    rows = await conn.fetch(_CLAIM, list({event_id(item) for item in items}))
    fresh = {r["event_id"] for r in rows}
    kept = []
    for item in items:
        key = event_id(item)
        if key in fresh:
            fresh.discard(key)
            kept.append(item)
    return kept


def columns(rows: Sequence[Any], *names: str) -> list[list[Any]]:
    """The per-column lists of ``rows`` that a bulk statement takes as ``unnest`` arrays:
    ``columns(rows, "a", "b")`` is ``[[r["a"] for r in rows], [r["b"] for r in rows]]``.
    Rows are mappings or records (read by key) or objects such as dataclasses (read by
    attribute)."""
    if rows and hasattr(rows[0], "keys"):
        return [[row[name] for row in rows] for name in names]
    return [[getattr(row, name) for row in rows] for name in names]


def as_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None
