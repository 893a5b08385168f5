"""Where export rows come from: the owning service's streaming interface (SPEC §9).

- contacts: ``POST /v1/contacts/stream`` (filter, saved filter, selected ids, a group's
  delivery list), CSV rows straight from the contacts database's COPY;
- scheduler: ``GET /v1/campaigns/{id}/recipients.csv``, a campaign's frozen recipient list.

Both answer CSV; :func:`record_chunks` turns the byte stream into text chunks of complete
records, a chunk at a time, so memory does not grow with the row count.
A source that cannot be reached, answers 502–504 (its database is away: 503), stops
sending for the read timeout or ends its stream without the closing chunk (it went away)
raises a :class:`SourceError` that is ``transient``: the job runs again from the start
(jobs.py). Any other error answer, or text that is not the CSV expected, is not: the
export fails with that reason.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from libs.common.errors import InvalidMessage, TransientError
from services.exporter import processor
from services.exporter.processor import Shape
from services.exporter.settings import ExporterSettings

CHUNK_BYTES = 256 * 1024


#: answers that say the source is away for now (a gateway, or its database: 503).
UNAVAILABLE = (502, 503, 504)


class SourceError(Exception):
    """A row source failed; ``str(error)`` is the reason shown to the requester.
    ``transient``: the source is away or broke off; asking again later may work."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


@dataclass
class Rows:
    """An open source: its estimated row count, how its rows become export rows (None:
    as they are, then ``chunks`` are COPY's own CSV) and its text in chunks of records."""

    estimated_total: int | None
    shape: Shape | None
    chunks: AsyncIterator[str]


def complete_records(text: str) -> int:
    """Length of the longest prefix of ``text`` that ends a CSV record: after a line end
    outside quotes (an even number of ``"`` before it; quotes inside fields are doubled)."""
    cut = text.rfind("\n")
    while cut >= 0 and text.count('"', 0, cut) % 2:
        cut = text.rfind("\n", 0, cut)
    return cut + 1


async def record_chunks(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The text of a UTF-8 CSV byte stream, cut into chunks of complete records."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    async for chunk in chunks:
        text = pending + decoder.decode(chunk)
        cut = complete_records(text)
        pending = text[cut:]
        if cut:
            yield text[:cut]
    pending += decoder.decode(b"", True)
    if pending:
        yield pending if pending.endswith("\n") else pending + "\n"


def parse(text: str) -> Iterator[list[str]]:
    """The rows of complete CSV records."""
    return csv.reader(io.StringIO(text))


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
        body: dict[str, Any] = {
            "columns": columns,
            "time_zone": self.settings.time_zone,
            # F-42 done by PostgreSQL in the stream: write_records need not scan the text
            "safe_csv": request.get("safe_csv", True),
        }
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
            # the group's members that match: contacts runs the search in the group's
            # scope, so the group's own saved filters apply and another group's are refused
            if request.get("filter_json"):
                body["filter"] = json.loads(request["filter_json"])
            if request.get("saved_filter_id") is not None:
                body["saved_filter_id"] = request["saved_filter_id"]
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
                    reason, field = await _refusal(response)
                    raise InvalidMessage(reason, field=_request_field(request, field))
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
        # Network errors and timeouts are the source's while it opens and while its chunks
        # are read (_broken_off), not when they come from the caller's own work in between
        # (its database's: a connection that timed out is not the source's stream).
        opened = False
        try:
            campaign = request["source"] == "campaign"
            opening = self._open_campaign if campaign else self._open_contacts
            async with opening(request) as rows:
                opened = True
                yield Rows(rows.estimated_total, rows.shape, _broken_off(what, rows.chunks))
        except (aiohttp.ClientError, TimeoutError, TransientError) as exc:
            if opened:
                raise
            reason = str(exc) if isinstance(exc, TransientError) else _describe(exc)
            raise SourceError(f"the {what} stream broke: {reason}", transient=True) from exc
        except (csv.Error, UnicodeDecodeError) as exc:
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
                raise SourceError(
                    f"contacts refused the export: {await _error_text(response)}",
                    transient=response.status in UNAVAILABLE,
                )
            total = response.headers.get("X-Estimated-Total")
            chunks = record_chunks(response.content.iter_chunked(CHUNK_BYTES))
            yield Rows(int(total) if total else None, plan.shape, chunks)

    @contextlib.asynccontextmanager
    async def _open_campaign(self, request: dict[str, Any]) -> AsyncIterator[Rows]:
        campaign_id = request["campaign_id"]
        campaign = await self._campaign(campaign_id, field="campaign_id")
        url = f"{self.settings.scheduler_url.rstrip('/')}/v1/campaigns/{campaign_id}/recipients.csv"
        async with self._client().get(url) as response:
            if response.status != 200:
                raise SourceError(
                    f"the scheduler refused the export: {await _error_text(response)}",
                    transient=response.status in UNAVAILABLE,
                )
            chunks = record_chunks(response.content.iter_chunked(CHUNK_BYTES))
            first = await anext(chunks, "")
            cut = first.find("\n") + 1
            if not cut:
                raise SourceError("the scheduler's recipient list has no header line")
            header = next(parse(first[:cut]))
            shape = processor.campaign_plan(header, request["columns"])
            yield Rows(campaign.get("planned"), shape, _chain(first[cut:], chunks))


async def _broken_off(what: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """``chunks``; a stream that breaks off or stops sending is a transient SourceError."""
    try:
        async for chunk in chunks:
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SourceError(f"the {what} stream broke: {_describe(exc)}", transient=True) from exc


async def _chain(head: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


_JSON = ("application/json", "application/problem+json")


async def _refusal(response: aiohttp.ClientResponse) -> tuple[str, str | None]:
    """The reason of an error answer (a problem's detail) and the field it names."""
    if response.content_type in _JSON:
        body = await response.json(content_type=None)
        if isinstance(body, dict):
            field = body.get("field")
            return str(body.get("detail", body.get("error", body))), (
                field if isinstance(field, str) else None
            )
        return str(body), None
    return f"HTTP {response.status}: {(await response.text())[:200]}", None


async def _error_text(response: aiohttp.ClientResponse) -> str:
    return (await _refusal(response))[0]


def _request_field(request: dict[str, Any], field: str | None) -> str:
    """The key of the export request that a contacts refusal is about. A group export's
    selection reaches contacts as ``{"all": [filter?, {"saved_filter": id}?, membership]}``
    (stream.py), so a refusal at ``filter.all[i]…`` is about the i-th of those; anything
    else is about the source as a whole (its columns, its group)."""
    source = request["source"]
    if source != "group" or not field:
        return str(source)
    given = [
        key
        for key, present in (
            ("filter", bool(request.get("filter_json"))),
            ("saved_filter_id", request.get("saved_filter_id") is not None),
        )
        if present
    ]
    if field in given:  # refused before compiling (contacts' body model)
        return field
    for i, key in enumerate(given):
        if field.startswith(f"filter.all[{i}]"):
            return key
    if field == "saved_filter":  # a saved filter that does not exist
        return "saved_filter_id" if "saved_filter_id" in given else "filter"
    return "group"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no data within the read timeout"
    return f"{type(exc).__name__}: {exc}"
