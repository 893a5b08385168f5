"""The one classification of failures (libs/common/errors.classify) and the loops that go by
it: retry and supervise."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka import errors as kafka_errors

from libs.common.errors import (
    Conflict,
    Fault,
    InvalidMessage,
    NotFound,
    TransientError,
    classify,
)
from libs.common.retry import Backoff, retry, supervise

QUICK = Backoff(initial=0.001, maximum=0.001, attempts=None)


@pytest.mark.parametrize(
    "exc",
    [
        TransientError("relay away"),
        ConnectionRefusedError(111, "refused"),
        ConnectionResetError(),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.CrashShutdownError("crash"),
        asyncpg.TooManyConnectionsError("too many"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
        asyncpg.InterfaceError(
            "cannot call Connection.fetch(): connection has been released back to the pool"
        ),
        asyncpg.InterfaceError(
            "cannot call Transaction.__aexit__(): the underlying connection is closed"
        ),
        kafka_errors.KafkaConnectionError(),
        kafka_errors.CommitFailedError(),
        kafka_errors.RebalanceInProgressError(),
        kafka_errors.NotLeaderForPartitionError(),
        kafka_errors.LeaderNotAvailableError(),
        kafka_errors.RequestTimedOutError(),
        kafka_errors.UnknownError(),
        kafka_errors.NotCoordinatorError(),
        kafka_errors.CoordinatorNotAvailableError(),
        kafka_errors.KafkaTimeoutError(),
        kafka_errors.NodeNotReadyError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_dependency_errors_are_transient(exc: BaseException) -> None:
    assert classify(exc) is Fault.TRANSIENT


def _postgres(cls: type[asyncpg.PostgresError], **fields: str) -> asyncpg.PostgresError:
    """An error as asyncpg builds it from the server's fields (S, C, M, R: severity,
    SQLSTATE, message, the server routine that raised it)."""
    error = cls.new(fields)
    assert type(error) is cls
    return error


def test_a_database_closed_to_connections_for_now_is_transient_not_a_bug() -> None:
    """``ALLOW_CONNECTIONS false`` (maintenance; the integration tests' outage) refuses new
    connections with 55000 from CheckMyDatabase: weather. 55000 from a statement is not."""
    closed = _postgres(
        asyncpg.ObjectNotInPrerequisiteStateError,
        S="FATAL",
        C="55000",
        M='database "tayori" is not currently accepting connections',
        R="CheckMyDatabase",
    )
    assert classify(closed) is Fault.TRANSIENT
    statement = _postgres(
        asyncpg.ObjectNotInPrerequisiteStateError,
        S="ERROR",
        C="55000",
        M='currval of sequence "s" is not yet defined in this session',
        R="currval_oid",
    )
    assert classify(statement) is Fault.BUG


@pytest.mark.parametrize(
    "exc",
    [
        InvalidMessage("bad"),
        NotFound("no such group"),
        Conflict("already sent"),
        asyncpg.UntranslatableCharacterError('unsupported Unicode escape sequence "\\u0000"'),
        asyncpg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'),
        asyncpg.NumericValueOutOfRangeError("integer out of range"),
        asyncpg.StringDataRightTruncationError("value too long"),
        asyncpg.ProgramLimitExceededError("index row size exceeds maximum"),
        kafka_errors.MessageSizeTooLargeError(),
        kafka_errors.RecordTooLargeError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_refused_values_are_data(exc: BaseException) -> None:
    assert classify(exc) is Fault.DATA


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("x"),
        TypeError("bug"),
        asyncpg.UndefinedColumnError("column does not exist"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        kafka_errors.IllegalStateError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_everything_else_is_a_bug(exc: BaseException) -> None:
    assert classify(exc) is Fault.BUG


def test_failures_of_work_done_at_once_are_as_bad_as_the_worst_of_them() -> None:
    """A TaskGroup (the sender's partitions of one poll) raises its failures together: a
    dead letter the broker could not take in one partition is weather, not a bug."""
    away = kafka_errors.KafkaTimeoutError()
    assert classify(ExceptionGroup("partitions", [away])) is Fault.TRANSIENT
    assert classify(ExceptionGroup("partitions", [away, InvalidMessage("bad")])) is (
        Fault.TRANSIENT
    )
    assert classify(ExceptionGroup("partitions", [InvalidMessage("bad")])) is Fault.DATA
    assert classify(ExceptionGroup("partitions", [away, KeyError("x")])) is Fault.BUG
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [away])])
    assert classify(nested) is Fault.TRANSIENT


async def test_retry_redoes_transient_failures_and_lets_data_and_bugs_through() -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise asyncpg.CannotConnectNowError("starting up")
        return "done"

    waited = []
    assert (
        await retry(flaky, name="t", service="t", strategy=QUICK, waiting=lambda: waited.append(1))
        == "done"
    )
    assert len(calls) == 3 and len(waited) == 2

    async def refused() -> None:
        raise asyncpg.UntranslatableCharacterError("NUL")

    with pytest.raises(asyncpg.UntranslatableCharacterError):
        await retry(refused, name="t", service="t", strategy=QUICK)


async def test_supervise_starts_a_loop_again_after_weather_and_stops_on_a_bug() -> None:
    runs = []

    async def loop() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise asyncpg.InterfaceError("connection is closed")
        if len(runs) == 3:
            raise KeyError("a bug")

    with pytest.raises(KeyError):
        await supervise(loop, name="t", service="t", strategy=QUICK)
    assert len(runs) == 3


async def test_supervise_returns_when_the_loop_is_done_and_keeps_a_cancel() -> None:
    async def one_shot() -> None:
        return None

    await supervise(one_shot, name="t", service="t", strategy=QUICK)

    async def forever() -> None:
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(supervise(forever, name="t", service="t", strategy=QUICK))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_private_fetch_wait_the_consumer_paces_is_there_in_this_aiokafka() -> None:
    """libs/common/kafka.Consumer._pace writes ``Fetcher._fetch_max_wait_ms`` (aiokafka has no
    public setter) on the embedded broker. This fails when aiokafka moves, so that the write
    is checked again against the new version instead of silently doing nothing."""
    import inspect

    import aiokafka
    from aiokafka.consumer import fetcher

    assert aiokafka.__version__ == "0.14.0"
    source = inspect.getsource(fetcher.Fetcher)
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in source
    assert "self._fetch_max_wait_ms," in source  # read for every fetch request built


def test_a_relay_reply_with_control_characters_gives_a_storable_diagnostic() -> None:
    from libs.common.mail.smtp_reply import classify as classify_reply

    reply = classify_reply(550, "5.1.1 user\x00 unknown\r\n\x1b[31m")
    assert reply.diagnostic == "550 5.1.1 user unknown [31m"
