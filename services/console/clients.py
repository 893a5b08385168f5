"""The console's only way to the data: the six services' public HTTP APIs.

Each call carries the bearer token of the signed-in user's role. A service that cannot be
reached, times out or answers 5xx raises :class:`ServiceUnavailable` (the page says which
service is away); a 4xx problem raises :class:`ApiProblem` with its ``errors[]``, which a
screen shows next to the fields they name.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from libs.common.logging import get_logger

log = get_logger(__name__)


class ServiceUnavailable(Exception):
    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"{service}: {reason}")
        self.service = service
        self.reason = reason


class NoToken(Exception):
    """No API token is configured for this role."""

    def __init__(self, role: str) -> None:
        super().__init__(role)
        self.role = role


@dataclass
class ApiProblem(Exception):
    """A 4xx answer: its status, detail and the failing values (field → messages)."""

    status: int
    detail: str
    errors: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}"

    @classmethod
    def of(cls, status: int, body: Any) -> ApiProblem:
        if not isinstance(body, dict):
            return cls(status, str(body)[:500] or f"HTTP {status}")
        detail = str(body.get("detail") or body.get("error") or f"HTTP {status}")
        errors = [e for e in body.get("errors") or [] if isinstance(e, dict)]
        if not errors and body.get("field"):
            errors = [{"field": str(body["field"]), "detail": detail}]
        return cls(status, detail, errors)

    def by_field(self) -> dict[str, list[str]]:
        """Messages by the dotted field they concern ("" for the request as a whole)."""
        found: dict[str, list[str]] = {}
        for item in self.errors:
            name = str(item.get("field") or "")
            found.setdefault(name, []).append(str(item.get("detail") or self.detail))
        return found


class Api:
    """One aiohttp session for every service; :meth:`for_role` gives a caller's client."""

    def __init__(self, urls: dict[str, str], tokens: dict[str, str], timeout: float) -> None:
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self.tokens = tokens
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=self.timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def for_role(self, role: str) -> RoleApi:
        return RoleApi(self, role)


class RoleApi:
    """The services as one role sees them."""

    def __init__(self, api: Api, role: str) -> None:
        self.api = api
        self.role = role

    def _headers(self) -> dict[str, str]:
        token = self.api.tokens.get(self.role)
        if not token:
            raise NoToken(self.role)
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def url(self, service: str, path: str) -> str:
        return self.api.urls[service] + path

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        data: Any = None,
    ) -> Any:
        """The JSON answer of a 2xx (None for 204); raises ApiProblem / ServiceUnavailable."""
        assert self.api.session is not None
        query = {k: str(v) for k, v in (params or {}).items() if v not in (None, "")}
        try:
            async with self.api.session.request(
                method,
                self.url(service, path),
                json=json_body,
                params=query,
                data=data,
                headers=self._headers(),
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("console_service_unreachable", service=service, error=type(exc).__name__)
            raise ServiceUnavailable(service, type(exc).__name__) from None
        body: Any = None
        if text:
            try:
                body = json.loads(text)
            except ValueError:
                body = text
        if status >= 500:
            log.warning("console_service_failed", service=service, status=status, path=path)
            raise ServiceUnavailable(service, f"HTTP {status}")
        if status >= 400:
            raise ApiProblem.of(status, body)
        return body

    async def get(self, service: str, path: str, **params: Any) -> Any:
        return await self.call(service, "GET", path, params=params)

    async def post(self, service: str, path: str, body: Any = None) -> Any:
        return await self.call(service, "POST", path, json_body=body)

    @asynccontextmanager
    async def stream(
        self, service: str, path: str, params: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET whose body the caller reads (downloads)."""
        assert self.api.session is not None
        try:
            async with self.api.session.get(
                self.url(service, path),
                params=params,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
            ) as response:
                if response.status >= 500:
                    raise ServiceUnavailable(service, f"HTTP {response.status}")
                if response.status >= 400:
                    text = await response.text()
                    try:
                        body: Any = json.loads(text)
                    except ValueError:
                        body = text
                    raise ApiProblem.of(response.status, body)
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceUnavailable(service, type(exc).__name__) from None
