"""The three kinds of failure a Tayori component can meet.

- :class:`InvalidMessage`: the input is bad. Never retried; a consumer sends it to
  ``<topic>.dlq`` with the reason and moves on, an HTTP view answers 4xx.
- :class:`TransientError`: the world is briefly unavailable (database failover, broker
  leader election, SMTP 4xx). Retried with a declared backoff strategy.
- anything else is a bug: the process crashes and is restarted by its supervisor.

:func:`classify` sorts any exception — ours, PostgreSQL's, Kafka's, the network's — into
those three kinds (:class:`Fault`); every loop and the HTTP layer go by it.
"""

from __future__ import annotations

import enum
import re

import asyncpg
from aiokafka import errors as kafka_errors


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


# What a failure means: the one classification every loop and every HTTP view goes by -------


class Fault(enum.Enum):
    """What to do about an exception (:func:`classify`)."""

    #: a dependency is briefly away (restart, failover, rebalance): back off, reconnect,
    #: redo what was not committed.
    TRANSIENT = "transient"
    #: this input can never be processed as it is: dead-letter it (a record) or answer 4xx.
    DATA = "data"
    #: anything else: a bug, which stops the process (or answers 500).
    BUG = "bug"


#: PostgreSQL errors that say the server, not the statement, is the problem: connection
#: lost (08), shutting down or not yet accepting connections (57P01–57P03, 57P05), out of
#: resources (53), a failover's read-only standby (25006), and the conflicts that a retry
#: resolves (40001 serialization failure, 40P01 deadlock, 55P03 lock not available).
_PG_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.IdleSessionTimeoutError,
    asyncpg.InsufficientResourcesError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.TransactionRollbackError,
    asyncpg.LockNotAvailableError,
)
#: PostgreSQL errors that say the values are the problem: class 22 (NUL in text, a number
#: out of range, invalid encoding, a string too long) and class 54 (a value too large for
#: an index row).
_PG_DATA = (asyncpg.DataError, asyncpg.ProgramLimitExceededError)
#: Kafka errors a client rides out by retrying or rejoining, besides those aiokafka marks
#: ``retriable``: a commit refused because the group rebalanced, a produce request the
#: broker failed without saying why (Tansu answers UnknownError while it restarts), a
#: request that timed out client-side.
_KAFKA_TRANSIENT = (
    kafka_errors.CommitFailedError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
    kafka_errors.UnknownError,
    kafka_errors.KafkaTimeoutError,
    kafka_errors.KafkaUnavailableError,
)
#: asyncpg's words for a connection that is gone: "connection is closed", "connection was
#: closed in the middle of operation", "pool is closed" (a connection lost under a query, or
#: a stop under way), and "connection has been released back to the pool": asyncpg hands a
#: pooled connection the server dropped back to its pool at once, so the holder's next
#: statement says that (an outbox relay idling on its connection, a handler between two
#: statements of its transaction, when PostgreSQL restarts).
_CONNECTION_GONE = re.compile(r"closed|released back to the pool")
#: a record too large for the producer or the broker.
_KAFKA_DATA = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordTooLargeError)


def classify(exc: BaseException) -> Fault:
    """Whether ``exc`` is weather (transient), a bad input (data) or a bug.

    The one place that decides it: the consumer loop, the retry policy, the supervised
    background loops and the HTTP error middleware all ask here (docs/ARCHITECTURE.md,
    "Failure")."""
    if isinstance(exc, BaseExceptionGroup):
        # Work done at once failed together (a consumer taking its partitions at once, in a
        # TaskGroup): a bug among them is a bug; else what a retry resolves is retried (the
        # data at fault is met again, alone); else it is the data.
        faults = {classify(inner) for inner in exc.exceptions}
        return next(f for f in (Fault.BUG, Fault.TRANSIENT, Fault.DATA) if f in faults)
    if isinstance(exc, InvalidMessage | NotFound | Conflict | Forbidden):
        return Fault.DATA
    if isinstance(exc, TransientError):
        return Fault.TRANSIENT
    if isinstance(exc, (*_PG_DATA, *_KAFKA_DATA)):
        return Fault.DATA
    if isinstance(exc, (*_PG_TRANSIENT, *_KAFKA_TRANSIENT)):
        return Fault.TRANSIENT
    if isinstance(exc, kafka_errors.KafkaError) and exc.retriable:
        return Fault.TRANSIENT
    if _closed_for_now(exc):
        return Fault.TRANSIENT
    if isinstance(exc, asyncpg.InterfaceError) and _CONNECTION_GONE.search(str(exc)):
        return Fault.TRANSIENT
    if isinstance(exc, asyncpg.InternalClientError) and "cannot switch to state" in str(exc):
        # A pooled connection that the server's FATAL "terminating connection" reached
        # just before its socket closed: the next statement on it finds it mid-error.
        return Fault.TRANSIENT
    if isinstance(exc, OSError | TimeoutError):  # refused, reset, unreachable, timed out
        return Fault.TRANSIENT
    return Fault.BUG


def _closed_for_now(exc: BaseException) -> bool:
    """A new connection refused because the database does not take connections for now
    (``ALTER DATABASE … ALLOW_CONNECTIONS false``, what an operator sets during
    maintenance): 55000 raised by PostgreSQL's connection set-up (CheckMyDatabase, a
    name that is not translated). The same SQLSTATE raised by a statement is a bug."""
    return (
        type(exc) is asyncpg.ObjectNotInPrerequisiteStateError
        and getattr(exc, "server_source_function", None) == "CheckMyDatabase"
    )


def is_transient(exc: BaseException) -> bool:
    return classify(exc) is Fault.TRANSIENT
