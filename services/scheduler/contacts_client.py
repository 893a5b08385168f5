"""The contacts service's HTTP API, as the scheduler uses it (services meet on HTTP):
custom field definitions for merge-tag validation (F-21), a contact for test sends and
previews (F-23, F-24), and a one-row search to check a target's filter (F-20)."""

from __future__ import annotations

from typing import Any

import aiohttp

from libs.common.errors import InvalidMessage, NotFound, TransientError


class ContactsClient:
    def __init__(self, base_url: str, token: str, timeout: float) -> None:
        self.base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        try:
            async with self._client().request(method, self.base + path, json=json) as response:
                if response.content_type in ("application/json", "application/problem+json"):
                    return response.status, await response.json()
                return response.status, {"error": await response.text()}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"contacts service unreachable: {exc!r}") from exc

    async def custom_field_keys(self) -> list[str]:
        status, body = await self._call("GET", "/v1/fields")
        if status != 200:
            raise TransientError(f"contacts GET /v1/fields answered {status}")
        return [item["key"] for item in body["items"]]

    async def _one(self, path: str, missing: Exception) -> dict[str, Any]:
        """GET one resource: ``missing`` raised on 404, TransientError on anything else."""
        status, body = await self._call("GET", path)
        if status == 404:
            raise missing
        if status != 200:
            raise TransientError(f"contacts GET {path} answered {status}")
        return dict(body)

    async def contact(self, contact_id: int) -> dict[str, Any]:
        return await self._one(
            f"/v1/contacts/{contact_id}", NotFound(f"contact {contact_id} does not exist")
        )

    async def check_filter(self, search_filter: dict[str, Any], field: str) -> None:
        """Refuse a filter the contacts service cannot evaluate (unknown field, bad op...)."""
        status, body = await self._call(
            "POST", "/v1/contacts/search", {"filter": search_filter, "limit": 1}
        )
        if status in (400, 404, 422):
            raise InvalidMessage(f"{field}: {body.get('error', body)}", field=field)
        if status != 200:
            raise TransientError(f"contacts POST /v1/contacts/search answered {status}")

    async def plan(self, plan_id: int) -> dict[str, Any]:
        """A step-mail plan as contacts has it (its name; that it is a plan, not a group)."""
        return await self._one(f"/v1/plans/{plan_id}", NotFound(f"plan {plan_id} does not exist"))

    async def saved_filter(self, filter_id: int) -> dict[str, Any]:
        """A saved filter's definition (to look into its history conditions, F-28)."""
        missing = InvalidMessage(f"saved filter {filter_id} does not exist", field="target")
        return await self._one(f"/v1/filters/{filter_id}", missing)

    async def contacts_by_id(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """The contacts with these ids as they are now (merge values at send time, F-29);
        deleted ones are missing. At most 1,000 ids (the search page limit)."""
        status, body = await self._call(
            "POST",
            "/v1/contacts/search",
            {"filter": {"field": "id", "op": "in", "value": ids}, "limit": len(ids)},
        )
        if status != 200:
            raise TransientError(f"contacts POST /v1/contacts/search answered {status}")
        return {int(item["id"]): item for item in body["items"]}
