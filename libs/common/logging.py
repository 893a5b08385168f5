"""structlog configured once: JSON lines, UTC ISO time, context variables.

Bind ids with ``structlog.contextvars.bound_contextvars(campaign_id=..., contact_id=...)``;
they appear on every line logged inside. Event names are stable snake_case actions.
Addresses are masked at info level with :func:`mask_email`.
"""

from __future__ import annotations

import logging
import sys

import structlog


def mask_email(address: str | None) -> str:
    """``taro.yamada@example.co.jp`` → ``t***@example.co.jp``: enough to correlate, not to mail."""
    if not address:
        return ""
    local, at, domain = address.partition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


_configured = False


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it could not even parse (a NUL in a header, a request line
    over its limit) as an error with a traceback, after answering it 400 itself: a client's
    mistake, nothing an operator can act on. Such records are dropped; every other error of
    aiohttp's server is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


def configure(service: str, level: str = "info") -> None:
    global _configured
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(
        stream=sys.stderr, level=max(numeric, logging.WARNING), format="%(message)s"
    )
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server.filters):
        server.addFilter(_MalformedRequests())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
