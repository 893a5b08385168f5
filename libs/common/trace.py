"""The trace a piece of work belongs to: one id from an HTTP request to every record it causes.

A request that comes in with a W3C Trace Context ``traceparent`` header keeps its trace id;
one without gets a new one (:func:`from_http`). While it is handled, the trace is the
context's (:func:`bound`): every log line carries ``trace_id``, an outbox row written in it
stores it (``libs/common/outbox``), and a record published in it carries it as the Kafka
header ``traceparent`` (:data:`HEADER`). A consumer binds the header of the record it handles
(``libs/common/kafka.Consumer``), so what its handler logs and publishes carries the same
trace, and ``grep <trace id>`` over every service's log follows one unsubscribe or one
campaign through the six services.

The value carried is a whole ``traceparent`` (``00-<32 hex trace id>-<16 hex parent id>-<2 hex
flags>``); a service forwards the one it received unchanged (Tayori makes no spans), except
that an HTTP request gets a parent id of its own.
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import structlog

#: the Kafka header (and HTTP header) that carries the trace.
HEADER = "traceparent"
#: the log field that carries the trace id.
LOG_FIELD = "trace_id"

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


def parse(value: str | bytes | None) -> str | None:
    """``value`` as a valid traceparent (lower case, version 00 form), or None when it is not
    one (W3C: an invalid traceparent is ignored and a new trace started)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if len(value) > 512:
        return None
    found = _TRACEPARENT.match(value.strip())
    if found is None:
        return None
    version, trace_id, parent, flags, rest = found.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    if version == "00" and rest:
        return None
    return f"00-{trace_id}-{parent}-{flags}"


def trace_id(traceparent: str) -> str:
    """The 32 hex digits of the trace id in a (valid) traceparent."""
    return traceparent[3:35]


def new() -> str:
    """A traceparent of a new trace (sampled flag set: nothing samples here, every id is logged)."""
    raw = os.urandom(24).hex()
    return f"00-{raw[:32]}-{raw[32:]}-01"


def child(traceparent: str) -> str:
    """The same trace with a parent id of its own (an HTTP request handled here)."""
    return f"{traceparent[:36]}{os.urandom(8).hex()}{traceparent[52:]}"


def current() -> str | None:
    """The traceparent of the work in hand, if any."""
    return _current.get()


def headers() -> list[tuple[str, bytes]]:
    """The Kafka header carrying the current trace ([] outside any)."""
    value = _current.get()
    return [] if value is None else [(HEADER, value.encode())]


def of_headers(record_headers: Iterable[tuple[str, bytes]] | None) -> str | None:
    """The traceparent a record's headers carry, if a valid one."""
    for key, value in record_headers or ():
        if key == HEADER:
            return parse(value)
    return None


@contextmanager
def bound(traceparent: str | None) -> Iterator[None]:
    """Within: ``traceparent`` is the current trace and log lines carry its ``trace_id``
    (None: no trace; lines and records carry none, also inside another trace)."""
    token = _current.set(traceparent)
    logged = structlog.contextvars.bind_contextvars(
        **{LOG_FIELD: ... if traceparent is None else trace_id(traceparent)}
    )
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**logged)
        _current.reset(token)
