"""
The txpostgres classes the PostgreSQL store connects with, which override
txpostgres's internals: fenced here so that an upgrade of txpostgres is
checked in one place.

Checked against txpostgres 1.7.0 (L{CHECKED_WITH}; a test fails when
another version is installed).  What each override relies on:

  - L{Detector} replaces C{DeadConnectionDetector.startReconnecting},
    wraps its C{reconnect} (one attempt, which txpostgres makes return a
    Deferred), and uses its C{reconnectable}, C{reactor},
    C{reconnectionIterator} and C{connectionRecovered}, and
    C{RetryingCall}'s C{reactor} attribute.
  - L{PgConnection} replaces C{Connection.doRead} (txpostgres's
    C{_PollingMixin.doRead} and C{Connection.doRead} together, calling
    C{continuePolling} and C{checkForNotifies}) and the private
    C{Connection._runInteraction}, which C{runInteraction} calls under the
    connection's lock and detector.
  - L{PgPool} sets C{ConnectionPool}'s C{reactor}, C{cooperator} and
    C{min} before C{ConnectionPool.__init__} makes its connections with
    C{connectionFactory}.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, TypeVar

import psycopg2
import psycopg2.extras
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from txpostgres.retrying import RetryingCall, simpleBackoffIterator
from txpostgres.txpostgres import Connection, ConnectionPool, RollbackFailed

T = TypeVar("T")

#: The txpostgres version these overrides were checked against.
CHECKED_WITH = "1.7.0"

#: The SQL and parameters of a statement to end a transaction with.
Final = tuple[str, dict[str, Any]]

_log = Logger()


def reconnect_delays() -> Iterator[float]:
    """
    At once, then backing off to every 10 s: a restart takes seconds.
    """
    return simpleBackoffIterator(  # type: ignore[no-any-return]
        initialDelay=0.5, maxDelay=10.0, factor=1.7, maxRetries=0, now=True
    )


def cause(error: BaseException) -> str:
    """
    What went wrong with the database, in a line for logs and errors.
    """
    if isinstance(error, RollbackFailed):
        error = error.originalFailure.value
    if isinstance(error, ConnectionDead):
        return "the connection was lost; reconnecting"
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


class Detector(DeadConnectionDetector):  # type: ignore[misc]
    """
    Reconnects its connection after PostgreSQL restarts or fails over, until
    stopped.  The stock detector cannot be stopped (a store that stops
    would leave it retrying), and takes any C{OperationalError}, a deadlock
    or a statement timeout included, for a dead connection: this one asks
    libpq whether the connection is closed.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__(
            deathChecker=self._isDead,
            reconnectionIterator=reconnect_delays,
            reactor=reactor,
        )
        self._stopped = False
        self._reconnecting: Deferred[None] | None = None
        self._attempting = False

    @property
    def waiting(self) -> bool:
        """
        Whether the connection is lost and waits for its next attempt at
        reconnecting (not making one).
        """
        return self._reconnecting is not None and not self._attempting

    def reconnect(self) -> Deferred[object]:
        """
        One attempt at reconnecting, as txpostgres makes it.
        """
        self._attempting = True

        def ended(result: object) -> object:
            self._attempting = False
            return result

        return maybeDeferred(super().reconnect).addBoth(ended)

    def _isDead(self, reason: Failure) -> bool:
        if self._stopped:
            return False
        if reason.check(RollbackFailed):
            # A transaction may have been left open: start afresh.
            return True
        raw = self.reconnectable.pollable() if self.reconnectable is not None else None
        return raw is None or bool(raw.closed)

    def startReconnecting(self, reason: Failure) -> None:
        _log.warn(
            "metadata database connection lost ({cause}); reconnecting",
            cause=cause(reason.value),
        )
        attempts = RetryingCall(self.reconnect)
        attempts.reactor = self.reactor
        self._reconnecting = d = attempts.start(
            self.reconnectionIterator(),
            failureTester=lambda reason: reason if self._stopped else None,
        )

        def reconnected(_: object) -> Deferred[object]:
            self._reconnecting = None
            _log.info("metadata database connection back")
            return self.connectionRecovered()  # type: ignore[no-any-return]

        def abandoned(reason: Failure) -> None:
            # Only stop() ends the attempts: they are retried forever.
            self._reconnecting = None

        d.addCallbacks(reconnected, abandoned)

    def stop(self) -> None:
        """
        Close the connection for good, abandoning any reconnection.
        """
        self._stopped = True
        connection = self.reconnectable
        if connection is not None and connection.pollable() is not None:
            # Also fails a reconnection attempt in progress, which ends them.
            connection.close()
        if self._reconnecting is not None:
            # Waiting before the next attempt.
            self._reconnecting.cancel()


class PgConnection(Connection):  # type: ignore[misc]
    """
    A txpostgres connection that, when PostgreSQL closes it while idle,
    tells its detector quietly: txpostgres raises from C{doRead}, which the
    reactor logs as an unhandled error.  Its transactions can end with a
    statement sent with the COMMIT, saving a round trip.
    """

    @staticmethod
    def connectionFactory(*args: Any, **kwargs: Any) -> Any:
        """
        Connect as SQLAlchemy's psycopg2 dialect does, so that values come
        back as they would through it: C{uuid} columns as L{uuid.UUID}.
        """
        connection = psycopg2.connect(*args, **kwargs)
        psycopg2.extras.register_uuid(None, connection)
        return connection

    def doRead(self) -> BaseException | None:
        """
        Read (results, notifications) as txpostgres does, but return what
        ends the connection, for the reactor to call C{connectionLost} with:
        the error libpq reports, or the loss of the socket that libpq has
        already closed (once PostgreSQL's last words are read).
        """
        self.reactor.removeReader(self)
        try:
            self.continuePolling()
        except psycopg2.Error as e:
            return e
        self.checkForNotifies()
        if self.fileno() == -1:
            return ConnectionLost("PostgreSQL closed the connection")
        self.reactor.addReader(self)
        return None

    def _runInteraction(
        self, interaction: Callable[..., Deferred[tuple[T, Final | None]]], *args: Any
    ) -> Deferred[T]:
        """
        Run C{interaction(cursor, *args)} in a transaction as txpostgres
        does (this is what its C{runInteraction} calls, under the
        connection's lock and detector), except that C{interaction} fires
        with its result and the L{Final} statement, if any, to send with
        the COMMIT in one round trip.
        """
        cursor = self.cursor()

        def commit(ended: tuple[T, Final | None]) -> Deferred[T]:
            result, final = ended
            sql, params = ("COMMIT", None) if final is None else (f"{final[0]}; COMMIT", final[1])
            return cursor.execute(sql, params).addCallback(lambda _: result)

        def rollback(reason: Failure) -> Deferred[Failure]:
            def failed(error: Failure) -> Failure:
                raw = self.pollable()
                if raw is None or raw.closed or error.check(psycopg2.InterfaceError):
                    # The connection died under the transaction (PostgreSQL
                    # restarted, or the link to it broke): there is nothing
                    # to roll back; PostgreSQL ended the transaction itself.
                    _log.info(
                        "metadata database transaction ended by a lost connection ({cause})",
                        cause=cause(reason.value),
                    )
                else:
                    _log.failure("metadata database rollback failed", error)
                return Failure(RollbackFailed(self, reason))

            return cursor.execute("ROLLBACK").addCallbacks(lambda _: reason, failed)

        d = cursor.execute("BEGIN")
        d.addCallback(lambda _: interaction(cursor, *args))
        return d.addCallback(commit).addErrback(rollback)


def new_connection(reactor: Any, cooperator: Cooperator) -> PgConnection:
    """
    A connection of the store's, not yet connected: it reconnects by
    itself until its detector is stopped.
    """
    return PgConnection(reactor, cooperator, detector=Detector(reactor))


class PgPool(ConnectionPool):  # type: ignore[misc]
    """
    A txpostgres pool, on the store's reactor, of connections that
    reconnect by themselves.
    """

    def __init__(self, reactor: Any, cooperator: Cooperator, dsn: str, size: int) -> None:
        self.reactor = reactor
        self.cooperator = cooperator
        self.min = size
        super().__init__(None, dsn)

    def connectionFactory(self, reactor: Any, cooperator: Cooperator) -> PgConnection:
        return new_connection(reactor, cooperator)
