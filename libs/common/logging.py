"""structlog configured once: JSON lines, UTC ISO time, context variables.

Bind ids with ``structlog.contextvars.bound_contextvars(campaign_id=..., contact_id=...)``;
they appear on every line logged inside. Event names are stable snake_case actions.
Addresses are masked at info level with :func:`mask_email`. Records of the standard
library's logging (aiohttp, aiokafka, asyncpg) come out as JSON lines too, with the same
context variables.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

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


#: what every line gets, structlog's own and the standard library's (aiohttp, aiokafka,
#: asyncpg) alike: the context variables (service, trace_id, ...), level, UTC time.
def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _stdlib_handler() -> logging.Handler:
    """Standard-library records (aiohttp, aiokafka, asyncpg) as JSON lines like ours: the
    message as ``event``, the logger's name as ``logger``, a traceback inside the line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(ensure_ascii=False),
            ],
        )
    )
    handler.addFilter(_BootstrapRefused())
    handler._tayori = True  # type: ignore[attr-defined]
    return handler


class _BootstrapRefused(logging.Filter):
    """aiokafka logs an error for each bootstrap server it could not reach before it raises
    KafkaConnectionError; the retry that catches it logs the attempt (``transient_error_retry``),
    so a broker away at start is one line per attempt, not two. Its errors about a known
    broker (``Unable connect to node with id …``) are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name.startswith("aiokafka")
            and isinstance(record.msg, str)
            and record.msg.startswith('Unable connect to "')
        )


def configure(service: str, level: str = "info") -> None:
    global _configured
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "_tayori", False)]
    root.addHandler(_stdlib_handler())
    # The libraries' info lines are chatter (aiokafka's joins and rebalances); warnings and
    # errors come through.
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn (ResourceWarning, deprecations) as lines too
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server.filters):
        server.addFilter(_MalformedRequests())
    structlog.configure(
        processors=[
            *_shared_processors(),
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
