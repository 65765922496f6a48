"""
The metadata store on any database SQLAlchemy reaches, SQLite above all,
with blocking calls run in a thread pool.

Every call into the database crosses one seam, L{SQLAlchemyStore._transact}
(the run seam of L{MetadataStore}, which holds every operation), and
everything that runs in a pool thread is named C{_thd...}.

SQLite is set up for several server processes sharing one file: WAL (readers
never block the writer), a 30 s busy timeout, C{synchronous=FULL} (a file
store must not lose an acknowledged upload to a power cut), and transactions
begun by hand: C{BEGIN IMMEDIATE} for writers, so that no transaction ever
has to upgrade a read lock, which SQLite refuses with SQLITE_BUSY whatever
the timeout.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, create_engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.interfaces import IMetadataStore, ITransactionStore
from koboldfs.metadata import schema, units
from koboldfs.metadata.compiled import shape_for
from koboldfs.metadata.store import Event, MetadataStore, Notice
from koboldfs.metadata.units import Outcome, Query, Work

T = TypeVar("T")

#: Errors after which the same unit may succeed later: the database
#: is locked, down, or unreachable.
_TRANSIENT = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.DisconnectionError,
    exc.TimeoutError,
    # Statements run on sqlite3's own cursor raise its errors unwrapped.
    sqlite3.OperationalError,
    sqlite3.InterfaceError,
)

#: Tries at switching a new SQLite file to WAL mode, 50 ms apart.
_WAL_ATTEMPTS = 100

# Execution option telling the "begin" listener how to begin on SQLite.
_BEGIN = "koboldfs_begin"


def _thdConnectSQLite(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    """
    Set up a new SQLite connection, and take transactions out of pysqlite's
    hands (it would begin them lazily, as readers).
    """
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # The timeout first: switching to WAL needs a lock.
        cursor.execute("PRAGMA busy_timeout = 30000")
        _thdSwitchToWAL(cursor)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _thdSwitchToWAL(cursor: Any) -> None:
    """
    Put the database in WAL mode.  On a new file that other servers open at
    the same moment, the switch can fail with "database is locked" at once,
    without waiting for the busy timeout: try again for a while.
    """
    for _ in range(_WAL_ATTEMPTS - 1):
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA journal_mode = WAL")


def _thdBeginSQLite(connection: Connection) -> None:
    """
    Begin a transaction as the connection's execution options ask.
    """
    mode = connection.get_execution_options().get(_BEGIN, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def _thdExecute(connection: Connection, query: Query) -> Outcome:
    result = connection.execute(query.statement, query.params)
    rows = [tuple(row) for row in result] if result.returns_rows else []
    return Outcome(rows=rows, rowcount=result.rowcount)


def _thdExecuteSQLite(connection: Connection, query: Query) -> Outcome:
    """
    L{_thdExecute} on sqlite3's own cursor, the statement compiled once
    (L{shape_for}): SQLAlchemy's execution around each statement costs
    more CPU than SQLite takes to run it, on every put and get.
    """
    shape = shape_for(query.statement, connection.dialect)
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(shape.sql, shape.params(query.params))
        return Outcome(rows=shape.rows(cursor), rowcount=cursor.rowcount)
    finally:
        cursor.close()


def _sqlite_file(url: URL) -> str | None:
    """
    The file of SQLite database C{url} (None for a C{file:} URI).

    @raise ValueError: an in-memory SQLite database, which each pool thread
        would get a different one of.
    """
    if url.database in (None, "", ":memory:") or url.query.get("mode") == "memory":
        raise ValueError(
            f"{url.render_as_string()!r}: an in-memory SQLite database cannot be shared"
        )
    if url.query.get("uri"):
        return None
    return os.path.abspath(url.database)


@implementer(IMetadataStore, ITransactionStore)
class SQLAlchemyStore(MetadataStore):
    """
    The metadata in a database reached through SQLAlchemy, from a thread
    pool.  Listeners hear of this process's own changes only.

    @ivar url: the database URL, with any password hidden.
    """

    def __init__(self, url: str, reactor: Any, threadpool: ThreadPool | None = None) -> None:
        """
        @param reactor: provides C{IReactorTime} and C{IReactorFromThreads}.
        @param threadpool: the threads to block in; by default, a pool of
            this store's own, started and stopped with it.
        @raise ValueError: C{url} names an in-memory SQLite database.
        """
        parsed = make_url(url)
        self.url = parsed.render_as_string(hide_password=True)
        self._sqliteFile: str | None = None
        sqlite = parsed.get_backend_name() == "sqlite" and parsed.get_driver_name() == "pysqlite"
        # Named parameters, which sqlite3's cursor takes as a dict.
        self._engine = create_engine(parsed, **({"paramstyle": "named"} if sqlite else {}))
        self._execute = _thdExecuteSQLite if sqlite else _thdExecute
        if parsed.get_backend_name() == "sqlite":
            self._sqliteFile = _sqlite_file(parsed)
            event.listen(self._engine, "connect", _thdConnectSQLite)
            event.listen(self._engine, "begin", _thdBeginSQLite)
        super().__init__(reactor)
        self._ownPool = threadpool is None
        self._pool = threadpool
        self._writeLock = threading.Lock()

    def _transact(self, work: Work[T], notice: Notice) -> Deferred[tuple[T, Event | None]]:
        """
        Run C{work} in a pool thread (L{MetadataStore._transact}).  Other
        processes do not hear of it: SQLite cannot tell them.
        """
        # Set while _running, which _run checked.
        assert self._pool is not None
        d = deferToThreadPool(self._reactor, self._pool, self._thdRun, work)
        return d.addCallback(lambda result: (result, notice(result)))

    def _thdRun(self, work: Work[T]) -> T:
        """
        Run C{work} in one database transaction, again from the start when
        it loses a race on a unique index.

        @raise Unavailable: the database is locked, down or unreachable.
        """
        begin = "IMMEDIATE" if work.writes else "DEFERRED"
        # SQLite takes one writer at a time, and a writer that finds the
        # lock taken sleeps in its busy handler (1, 2, 5, 10... ms) however
        # soon the lock is free: queue this process's writers here instead.
        serial = self._writeLock if work.writes and self._sqliteFile is not None else None
        attempt = 1
        while True:
            try:
                with serial or contextlib.nullcontext(), self._engine.connect() as connection:
                    connection = connection.execution_options(**{_BEGIN: begin})
                    with connection.begin():
                        return units.drive(work(), partial(self._execute, connection))
            except (exc.IntegrityError, sqlite3.IntegrityError):
                if attempt == units.ATTEMPTS:
                    raise
                attempt += 1
            except _TRANSIENT as e:
                raise Unavailable(
                    ErrorCode.UNAVAILABLE,
                    f"metadata database unavailable: {getattr(e, 'orig', None) or e}",
                ) from e

    def _thdStart(self) -> int:
        if self._sqliteFile is not None:
            try:
                os.makedirs(os.path.dirname(self._sqliteFile), exist_ok=True)
            except OSError as e:
                raise Unavailable(
                    ErrorCode.UNAVAILABLE, f"metadata database unavailable: {e}"
                ) from e
        return self._thdRun(Work(schema.create_schema))

    def start(self) -> Deferred[int]:
        """
        Start the thread pool (if this store's own), connect, and create or
        check the schema; fire with the schema version.  Starting a started
        store only checks the schema again.
        """
        if self._pool is None:
            # A stopped pool cannot start again: each start gets a new one.
            self._pool = ThreadPool(minthreads=1, maxthreads=4, name="koboldfs-db")
            self._pool.start()
        self._running = True
        return deferToThreadPool(self._reactor, self._pool, self._thdStart)

    def _thdStop(self) -> None:
        self._engine.dispose()

    def stop(self) -> Deferred[None]:
        """
        Close the connections, then stop the thread pool if this store's
        own.  Stopping a stopped store does nothing.
        """
        if self._pool is None or not self._running:
            return succeed(None)
        self._running = False
        pool = self._pool
        d = deferToThreadPool(self._reactor, pool, self._thdStop)
        if self._ownPool:
            self._pool = None

            def stopPool(result: T) -> T:
                pool.stop()
                return result

            d.addBoth(stopPool)
        return d
