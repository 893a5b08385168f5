"""Where export rows come from: the owning service's streaming interface (SPEC §9).

- contacts: ``POST /v1/contacts/stream`` (filter, saved filter, selected ids, a group's
  delivery list), CSV rows straight from the contacts database's COPY;
- scheduler: ``GET /v1/campaigns/{id}/recipients.csv``, a campaign's frozen recipient list.

Both answer CSV; :func:`csv_batches` turns the byte stream into batches of complete rows
with the C ``csv`` reader, a chunk at a time, so memory does not grow with the row count.
A stream that ends without its closing chunk (the service went away), a timeout or an
error answer raises :class:`SourceError`: the export fails with that reason.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from libs.common.errors import InvalidMessage, TransientError
from services.exporter import processor
from services.exporter.processor import Row, Shape
from services.exporter.settings import ExporterSettings

CHUNK_BYTES = 256 * 1024


class SourceError(Exception):
    """A row source failed; ``str(error)`` is the reason shown to the requester."""


@dataclass
class Rows:
    """An open source: its estimated row count and its rows in batches."""

    estimated_total: int | None
    shape: Shape | None
    batches: AsyncIterator[list[Row]]


def complete_records(text: str) -> int:
    """Length of the longest prefix of ``text`` that ends a CSV record: after a line end
    outside quotes (an even number of ``"`` before it; quotes inside fields are doubled)."""
    cut = text.rfind("\n")
    while cut >= 0 and text.count('"', 0, cut) % 2:
        cut = text.rfind("\n", 0, cut)
    return cut + 1


async def csv_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[Row]]:
    """Rows of a UTF-8 CSV byte stream, a batch per chunk of complete records."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    async for chunk in chunks:
        text = pending + decoder.decode(chunk)
        cut = complete_records(text)
        pending = text[cut:]
        if cut:
            yield list(csv.reader(io.StringIO(text[:cut])))
    pending += decoder.decode(b"", True)
    if pending:
        yield list(csv.reader(io.StringIO(pending)))


class Sources:
    """HTTP clients of contacts and the scheduler, as the exporter uses them."""

    def __init__(self, settings: ExporterSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.settings.admin_token}"},
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10, sock_read=self.settings.read_timeout_seconds
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _contacts_body(self, request: dict[str, Any], columns: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"columns": columns, "time_zone": self.settings.time_zone}
        source = request["source"]
        if source == "filter":
            body["filter"] = json.loads(request["filter_json"])
        elif source == "saved_filter":
            body["saved_filter_id"] = request["saved_filter_id"]
        elif source == "contact_ids":
            body["ids"] = request["contact_ids"]
        elif source == "group":
            body["group_id"] = request["group_id"]
            body["membership_states"] = request["membership_states"]
        return body

    async def check(self, request: dict[str, Any]) -> None:
        """Refuse at once what the owning service would refuse (unknown field, group,
        saved filter, campaign); 503 when it cannot be asked."""
        try:
            if request["source"] == "campaign":
                await self._campaign(request["campaign_id"], field="campaign_id")
                return
            plan = processor.contacts_plan(request["columns"])
            body = {**self._contacts_body(request, plan.stream_columns), "dry_run": True}
            url = f"{self.settings.contacts_url.rstrip('/')}/v1/contacts/stream"
            async with self._client().post(url, json=body) as response:
                if response.status in (400, 404):
                    raise InvalidMessage(await _error_text(response), field=request["source"])
                if response.status != 200:
                    raise TransientError(f"contacts answered {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"cannot reach a row source: {exc!r}") from exc

    async def _campaign(self, campaign_id: str, field: str) -> dict[str, Any]:
        url = f"{self.settings.scheduler_url.rstrip('/')}/v1/campaigns/{campaign_id}"
        async with self._client().get(url) as response:
            if response.status == 404:
                raise InvalidMessage(f"campaign {campaign_id} does not exist", field=field)
            if response.status != 200:
                raise TransientError(f"scheduler answered {response.status}")
            return dict(await response.json())

    @contextlib.asynccontextmanager
    async def open(self, request: dict[str, Any]) -> AsyncIterator[Rows]:
        """The rows of ``request``'s selection; SourceError when the source fails."""
        what = "scheduler" if request["source"] == "campaign" else "contacts"
        try:
            if request["source"] == "campaign":
                async with self._open_campaign(request) as rows:
                    yield rows
            else:
                async with self._open_contacts(request) as rows:
                    yield rows
        except (aiohttp.ClientError, TimeoutError, csv.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"the {what} stream broke: {_describe(exc)}") from exc
        except InvalidMessage as exc:
            raise SourceError(exc.reason) from exc

    @contextlib.asynccontextmanager
    async def _open_contacts(self, request: dict[str, Any]) -> AsyncIterator[Rows]:
        plan = processor.contacts_plan(request["columns"])
        url = f"{self.settings.contacts_url.rstrip('/')}/v1/contacts/stream"
        body = self._contacts_body(request, plan.stream_columns)
        async with self._client().post(url, json=body) as response:
            if response.status != 200:
                raise SourceError(f"contacts refused the export: {await _error_text(response)}")
            total = response.headers.get("X-Estimated-Total")
            batches = csv_batches(response.content.iter_chunked(CHUNK_BYTES))
            yield Rows(int(total) if total else None, plan.shape, batches)

    @contextlib.asynccontextmanager
    async def _open_campaign(self, request: dict[str, Any]) -> AsyncIterator[Rows]:
        campaign_id = request["campaign_id"]
        campaign = await self._campaign(campaign_id, field="campaign_id")
        url = f"{self.settings.scheduler_url.rstrip('/')}/v1/campaigns/{campaign_id}/recipients.csv"
        async with self._client().get(url) as response:
            if response.status != 200:
                raise SourceError(
                    f"the scheduler refused the export: {await _error_text(response)}"
                )
            batches = csv_batches(response.content.iter_chunked(CHUNK_BYTES))
            first: list[Row] = await anext(batches, [])
            if not first:
                raise SourceError("the scheduler's recipient list has no header line")
            shape = processor.campaign_plan(first[0], request["columns"])
            yield Rows(campaign.get("planned"), shape, _chain(first[1:], batches))


async def _chain(head: list[Row], rest: AsyncIterator[list[Row]]) -> AsyncIterator[list[Row]]:
    if head:
        yield head
    async for batch in rest:
        yield batch


async def _error_text(response: aiohttp.ClientResponse) -> str:
    if response.content_type == "application/json":
        body = await response.json()
        return str(body.get("error", body)) if isinstance(body, dict) else str(body)
    return f"HTTP {response.status}: {(await response.text())[:200]}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no data within the read timeout"
    return f"{type(exc).__name__}: {exc}"
