"""The three kinds of failure a Tayori component can meet.

- :class:`InvalidMessage`: the input is bad. Never retried; a consumer sends it to
  ``<topic>.dlq`` with the reason and moves on, an HTTP view answers 4xx.
- :class:`TransientError`: the world is briefly unavailable (database failover, broker
  leader election, SMTP 4xx). Retried with a declared backoff strategy.
- anything else is a bug: the process crashes and is restarted by its supervisor.
"""

from __future__ import annotations


class TayoriError(Exception):
    """Base of the errors Tayori raises on purpose."""


class InvalidMessage(TayoriError):
    """Input that can never be processed as it is.

    ``field`` names the offending field when there is one, so an operator (or an API
    client) sees exactly what to fix.
    """

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class TransientError(TayoriError):
    """A failure that is expected to go away when retried."""


class NotFound(TayoriError):
    """The named entity does not exist (HTTP 404)."""


class Conflict(TayoriError):
    """The request contradicts current state (HTTP 409)."""


class Forbidden(TayoriError):
    """The caller's role does not allow this (HTTP 403)."""


class DlqLimitExceeded(TayoriError):
    """A consumer dead-lettered more than its limit allows: stop instead of discarding a deploy."""
