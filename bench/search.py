"""Search (F-05) latency through the HTTP API, against the same SQL run directly.

N contacts are loaded by COPY (see :mod:`bench.load`) and ANALYZEd; the contacts service
runs; then, one request at a time, each kind of filter is sent through
``POST /v1/contacts/search`` (aiohttp, admin token, limit 50: page + total count) and,
interleaved with it, the very SQL that request compiles to is run directly with asyncpg in
the same kind of transaction (the ceiling: what is left when HTTP, JSON and the service's
own work are taken away).

- (a) tag include + custom field + aggregate delivery state:
  ``tags include_any [T]`` ∧ ``custom.plan = premium`` ∧ ``delivery_state all_deliverable``
- (b) history: opened campaign X within the last 30 days

Then, in the same run against the same service, the console's 顧客検索 page (issue 20): the
same two kinds of filter as the page's query string, beside the API's figure for the very
body the page sends (:mod:`bench.console`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import console
from bench.data import RECENT_CAMPAIGNS, TAGS
from bench.report import Result, ms, percentile, progress
from bench.stack import ADMIN_TOKEN, Database, Stack, field_definitions, stack
from services.contacts.app import build
from services.contacts.models import FieldDefinition
from services.contacts.search import CUSTOM_PLANS, compile_search

REQUESTS = 200
WARMUP = 10
GOAL_P95 = 0.200
CONSOLE_GOAL_P95 = 0.300
LIMIT = 50


def filter_a(rng: random.Random) -> dict[str, Any]:
    return {
        "all": [
            {"field": "tags", "op": "include_any", "value": [rng.choice(TAGS)]},
            {"field": "custom.plan", "op": "eq", "value": "premium"},
            {"delivery_state": "all_deliverable"},
        ]
    }


def filter_b(rng: random.Random) -> dict[str, Any]:
    return {
        "history": {
            "event": "opened",
            "campaign_id": rng.choice(RECENT_CAMPAIGNS),
            "within_days": 30,
        }
    }


async def _direct(conn: Any, fields: dict[str, FieldDefinition], body: dict[str, Any]) -> int:
    page, _ = compile_search(body["filter"], fields, sort=None, limit=body["limit"], cursor=None)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(CUSTOM_PLANS)  # as the service does
        await conn.fetch(page.sql_page, *page.page_params)
        return int(await conn.fetchval(page.sql_count, *page.count_params))


async def _measure(
    st: Stack, port: int, make: Callable[[random.Random], dict[str, Any]], requests: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = [{"filter": make(rng), "limit": LIMIT} for _ in range(WARMUP + requests)]
    url = f"http://127.0.0.1:{port}/v1/contacts/search"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    conn = await st.connect()
    fields = await field_definitions(conn)
    http_s: list[float] = []
    sql_s: list[float] = []
    totals: list[int] = []
    try:
        async with aiohttp.ClientSession() as session:
            for i, body in enumerate(bodies):
                # alternate which goes first so neither always meets a warmer cache
                order = ("http", "sql") if i % 2 == 0 else ("sql", "http")
                for kind in order:
                    started = time.perf_counter()
                    if kind == "http":
                        async with session.post(url, json=body, headers=headers) as response:
                            answer = await response.json()
                            if response.status != 200:
                                raise RuntimeError(f"search answered {response.status}: {answer}")
                        spent, total = time.perf_counter() - started, answer["total"]
                        if i >= WARMUP:
                            http_s.append(spent)
                            totals.append(total)
                    else:
                        await _direct(conn, fields, body)
                        if i >= WARMUP:
                            sql_s.append(time.perf_counter() - started)
    finally:
        await conn.close()
    return {
        "http_p50": percentile(http_s, 50),
        "http_p95": percentile(http_s, 95),
        "http_max": max(http_s),
        "sql_p50": percentile(sql_s, 50),
        "sql_p95": percentile(sql_s, 95),
        "sql_max": max(sql_s),
        "matches_median": sorted(totals)[len(totals) // 2],
        "matches_max": max(totals),
    }


def _result(name: str, m: dict[str, Any], loaded: dict[str, Any], requests: int) -> Result:
    return Result(
        name=name,
        figure=f"API p50 {ms(m['http_p50'])} / p95 {ms(m['http_p95'])} ms",
        ceiling=f"SQL p50 {ms(m['sql_p50'])} / p95 {ms(m['sql_p95'])} ms",
        goal=f"p95 < {GOAL_P95 * 1000:.0f} ms",
        passed=m["http_p95"] < GOAL_P95,
        ratio=m["sql_p95"] / m["http_p95"],
        data={
            "requests": requests,
            **{k: (round(v * 1000, 2) if isinstance(v, float) else v) for k, v in m.items()},
            **loaded,
        },
    )


def _console_result(name: str, m: dict[str, Any], loaded: dict[str, Any], requests: int) -> Result:
    return Result(
        name=name,
        figure=f"page p50 {ms(m['page_p50'])} / p95 {ms(m['page_p95'])} ms",
        ceiling=f"API p50 {ms(m['api_p50'])} / p95 {ms(m['api_p95'])} ms (same filter)",
        goal=f"p95 < {CONSOLE_GOAL_P95 * 1000:.0f} ms",
        passed=m["page_p95"] < CONSOLE_GOAL_P95,
        ratio=m["api_p95"] / m["page_p95"],
        data={
            "requests": requests,
            **{k: (round(v * 1000, 2) if isinstance(v, float) else v) for k, v in m.items()},
            **loaded,
        },
    )


async def run(
    root: Path, db: Database, loaded: dict[str, Any], requests: int = REQUESTS
) -> list[Result]:
    """Run on ``db``, loaded by :func:`bench.load.load`, with a broker of its own."""
    async with stack(root, "search", db) as st:
        runtime = build(st.settings())
        await runtime.start()
        await runtime.wait_for_consumers()
        try:
            progress(f"search: {requests} requests of (a)")
            a = await _measure(st, runtime.port, filter_a, requests, seed=1)
            progress(f"search: {requests} requests of (b)")
            b = await _measure(st, runtime.port, filter_b, requests, seed=2)
            contacts_url = f"http://127.0.0.1:{runtime.port}"
            async with console.running(st, contacts_url) as base:
                progress(f"search: {requests} console pages of (a)")
                page_a = await console.measure(
                    st, base, contacts_url, console.form_a, requests, WARMUP, seed=3
                )
                progress(f"search: {requests} console pages of (b)")
                page_b = await console.measure(
                    st, base, contacts_url, console.form_b, requests, WARMUP, seed=4
                )
        finally:
            await runtime.stop()
    return [
        _result("search (a) tag+custom+state", a, loaded, requests),
        _result("search (b) history", b, loaded, requests),
        _console_result("console /contacts (a) tag+custom+state", page_a, loaded, requests),
        _console_result("console /contacts (b) opened, 28 days", page_b, loaded, requests),
    ]
