"""The console's 顧客検索 page (issue 20) over the search benchmark's loaded database.

The console runs in this process, as the integration tests start it, on the same database
(its own schema) and pointed at the contacts service already running for the API's figure
(every other service at a closed port: the search page calls only contacts). A console user
with the admin role logs in through the real login form (CSRF token from the form, the
session cookie kept); then, one request at a time, ``GET /contacts?<form>`` is sent and,
interleaved with it, ``POST /v1/contacts/search`` with the very body the page builds from that
query (:func:`services.console.screens.search_form.build`): the API's figure for the same
filter, so the difference is the page's own work (session, its three lookups — fields, groups,
saved searches — and the template).

Each page must be the results page: status 200 at ``/contacts`` (no redirect to the login)
with the API's exact total for the same filter in ``<strong id="total">``.

- (a) the form's tag include, a custom-field row and the aggregate delivery state:
  ``tags_in=T & f0=custom.plan & op0=eq & v0=premium & delivery_state=all_deliverable``
- (b) the form's history inputs: ``history_event=opened & history_days=28``. The form has no
  campaign input, so this is "opened any campaign within 28 days" (see HISTORY_DAYS), broader
  than the API's own (b), which names one campaign within 30 days.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp

from bench.data import TAGS
from bench.report import percentile
from bench.stack import ADMIN_TOKEN, Stack, field_definitions
from libs.common import db
from services.console import auth
from services.console.app import SCHEMA, Console
from services.console.screens import search_form
from services.console.screens.contacts import PAGE_SIZE
from services.console.settings import ConsoleSettings
from tayori.embedded import free_port

#: (b)'s window. The loaded history's opens of campaign k are 5k+1 days old, less up to
#: 1.4 days (bench/data.py): 30 days would cut through campaign 6's opens, whose count then
#: drops while the run goes (the page's total and the API's differ); 28 days cuts none.
HISTORY_DAYS = 28
USERNAME = "bench"
PASSWORD = "bench-console-password"
_CSRF_MARKER = 'name="csrf" value="'


def form_a(rng: random.Random) -> dict[str, str]:
    return {
        "tags_in": rng.choice(TAGS),
        "f0": "custom.plan",
        "op0": "eq",
        "v0": "premium",
        "delivery_state": "all_deliverable",
    }


def form_b(_: random.Random) -> dict[str, str]:
    return {"history_event": "opened", "history_days": str(HISTORY_DAYS)}


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    start = html.index(_CSRF_MARKER) + len(_CSRF_MARKER)
    return html[start : html.index('"', start)]


def shows_total(html: str, total: int) -> bool:
    """Whether a 顧客検索 page is the results page with exactly this total."""
    return f'<strong id="total">{total}</strong>' in html


@contextlib.asynccontextmanager
async def running(st: Stack, contacts_url: str) -> AsyncIterator[str]:
    """A console on ``st``'s database reaching contacts at ``contacts_url``, with an admin
    user USERNAME / PASSWORD; yields its base URL."""
    closed = f"http://127.0.0.1:{free_port()}"
    settings = ConsoleSettings(
        database_url=st.dsn,
        kafka_bootstrap=st.broker.bootstrap,
        topic_prefix=st.prefix,
        http_host="127.0.0.1",
        http_port=0,
        admin_token=ADMIN_TOKEN,
        contacts_url=contacts_url,
        suppression_url=closed,
        scheduler_url=closed,
        sender_url=closed,
        bounce_processor_url=closed,
        exporter_url=closed,
    )
    console = Console(settings)
    await console.start()
    try:
        conn = await db.connect(st.dsn, SCHEMA)
        try:
            await auth.save_user(conn, USERNAME, PASSWORD, "admin", "bench@example.jp")
        finally:
            await conn.close()
        yield f"http://127.0.0.1:{console.port}"
    finally:
        await console.stop()


async def login(browser: aiohttp.ClientSession, base: str) -> None:
    """Log in through the login form; the session cookie stays in ``browser``'s jar."""
    async with browser.get(f"{base}/login") as response:
        html = await response.text()
    form = {"csrf": csrf_of(html), "login": USERNAME, "password": PASSWORD}
    async with browser.post(f"{base}/login", data=form, allow_redirects=False) as response:
        if response.status != 303:
            raise RuntimeError(f"console login answered {response.status}")


async def _lookups(
    client: aiohttp.ClientSession, contacts_url: str, headers: dict[str, str]
) -> float:
    """Seconds of the page's three lookups, sent together as the page sends them."""

    async def one(path: str) -> None:
        async with client.get(f"{contacts_url}{path}", headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{path} answered {response.status}")

    started = time.perf_counter()
    await asyncio.gather(one("/v1/fields"), one("/v1/groups?members=false"), one("/v1/filters"))
    return time.perf_counter() - started


async def _counted_groups(
    client: aiohttp.ClientSession, contacts_url: str, headers: dict[str, str]
) -> float:
    """Seconds of ``GET /v1/groups`` with every group's members counted."""
    started = time.perf_counter()
    async with client.get(f"{contacts_url}/v1/groups", headers=headers) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"/v1/groups answered {response.status}")
    return time.perf_counter() - started


async def measure(
    st: Stack,
    base: str,
    contacts_url: str,
    make: Callable[[random.Random], dict[str, str]],
    requests: int,
    warmup: int,
    seed: int,
) -> dict[str, Any]:
    """Page and API latencies of ``requests`` forms (after ``warmup``), interleaved."""
    conn = await st.connect()
    try:
        kinds = {key: f.type for key, f in (await field_definitions(conn)).items()}
    finally:
        await conn.close()
    rng = random.Random(seed)
    forms = [make(rng) for _ in range(warmup + requests)]
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    page_s: list[float] = []
    api_s: list[float] = []
    lookups_s: list[float] = []
    totals: list[int] = []
    jar = aiohttp.CookieJar(unsafe=True)  # cookies of 127.0.0.1
    async with (
        aiohttp.ClientSession(cookie_jar=jar) as browser,
        aiohttp.ClientSession() as client,
    ):
        await login(browser, base)
        for i, form in enumerate(forms):
            body = search_form.build(form, kinds).body(PAGE_SIZE, None)
            html = ""
            total = -1
            # alternate which goes first so neither always meets a warmer cache
            for kind in ("page", "api") if i % 2 == 0 else ("api", "page"):
                started = time.perf_counter()
                if kind == "page":
                    url = f"{base}/contacts?{urlencode(form)}"
                    async with browser.get(url, allow_redirects=False) as response:
                        html = await response.text()
                        if response.status != 200:
                            raise RuntimeError(f"{url} answered {response.status}")
                    spent = time.perf_counter() - started
                    if i >= warmup:
                        page_s.append(spent)
                else:
                    async with client.post(
                        f"{contacts_url}/v1/contacts/search", json=body, headers=headers
                    ) as response:
                        answer = await response.json()
                        if response.status != 200:
                            raise RuntimeError(f"search answered {response.status}: {answer}")
                    spent = time.perf_counter() - started
                    total = answer["total"]
                    if i >= warmup:
                        api_s.append(spent)
                        totals.append(total)
            if not shows_total(html, total):
                at = html.find('id="total"')
                shown = html[at - 40 : at + 60] if at >= 0 else html[:400]
                raise RuntimeError(f"the page of {form} is not the total {total}: {shown!r}")
            if i >= warmup:
                lookups_s.append(await _lookups(client, contacts_url, headers))
        # what the page's groups lookup cost before it asked for names only (?members=false)
        counted_s = [await _counted_groups(client, contacts_url, headers) for _ in range(20)]
    return {
        "page_p50": percentile(page_s, 50),
        "page_p95": percentile(page_s, 95),
        "page_max": max(page_s),
        "api_p50": percentile(api_s, 50),
        "api_p95": percentile(api_s, 95),
        "api_max": max(api_s),
        # the page's other calls to contacts, timed alone after each pair (not in the page's
        # figure): page - api - lookups is the console's own work (session, render, HTTP)
        "lookups_p50": percentile(lookups_s, 50),
        "lookups_p95": percentile(lookups_s, 95),
        "groups_counted_p50": percentile(counted_s, 50),
        "matches_median": sorted(totals)[len(totals) // 2],
        "matches_max": max(totals),
    }
