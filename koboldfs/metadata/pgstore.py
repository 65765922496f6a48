"""
The metadata store on PostgreSQL, asynchronous through txpostgres: no
threads, and changes made by other processes are heard with LISTEN/NOTIFY.

It runs the units (L{koboldfs.metadata.units}), each in
one PostgreSQL transaction (one C{runInteraction}), compiling their
SQLAlchemy Core statements for psycopg2 and handing back rows as
L{SQLAlchemyStore<koboldfs.metadata.sqlstore.SQLAlchemyStore>} does: plain
tuples of values converted by each column's type.

A committed change is told to this process's listeners and, by a
C{pg_notify} in the same transaction, to every store listening on the
database.  Each connection reconnects on its own after PostgreSQL restarts
or fails over (libpq multi-host URLs); calls made while it is down fail at
once with the retryable L{Unavailable}.  The txpostgres classes that do so
override txpostgres's internals, and are kept apart, in
L{koboldfs.metadata.txpostgres_overrides}.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, TypeVar

import psycopg2
from psycopg2.extensions import Notify, make_dsn, parse_dsn
from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.sql.base import Executable
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.reconnection import ConnectionDead
from txpostgres.txpostgres import Cursor, RollbackFailed
from zope.interface import implementer

from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.interfaces import IMetadataStore, ITransactionStore
from koboldfs.metadata import schema, units
from koboldfs.metadata.compiled import Shape, shape_for
from koboldfs.metadata.store import Event, MetadataStore, Notice
from koboldfs.metadata.txpostgres_overrides import (
    Final,
    PgConnection,
    PgPool,
    cause,
    new_connection,
)
from koboldfs.metadata.units import Outcome, Query, Unit, Work, writer

T = TypeVar("T")

_log = Logger()

_DIALECT = PGDialect_psycopg2()

#: The NOTIFY channel every store of a database talks on.
CHANNEL = "kobold"

#: The advisory lock that servers starting at once take in turn to create
#: or upgrade the schema ("KOBOLD" in ASCII).
SCHEMA_LOCK = 0x4B4F424F4C44

#: Connections in a store's pool, as the SQLite store's threads.
POOL_SIZE = 4

#: Errors after which the same unit may succeed later: the database
#: is down, restarting, unreachable, or the connection is reconnecting.
_TRANSIENT = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    RollbackFailed,
    ConnectionDead,
    ConnectionClosed,
)


#: libpq settings a URL gets unless it sets them: a host that died without
#: closing its connections (power cut, network partition) is given up
#: within seconds, not the kernel's two minutes.  Asynchronous connections,
#: which txpostgres makes, ignore connect_timeout; tcp_user_timeout does
#: bound them.
DEAD_PEER_DEFAULTS = {
    "tcp_user_timeout": "10000",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


#: The URL parameter (KoboldFS's, taken out before libpq sees the URL) that
#: turns LISTEN off: C{?kobold_listen=off}, for databases that have no
#: LISTEN/NOTIFY (CockroachDB) or poolers that break it (PgBouncer in
#: transaction mode).  Other servers' changes are then found by polling:
#: each replicator pass reads the replication queue and the walk's next
#: window (docs/scale.md).
LISTEN_PARAM = "kobold_listen"
_OFF = ("off", "0", "false", "no")


def listen_option(url: str) -> tuple[str, bool]:
    """
    C{url} without L{LISTEN_PARAM}, and whether it asks for LISTEN (the
    default).

    @raise ValueError: the parameter has a value other than on or off.
    """
    base, mark, query = url.partition("?")
    listen, kept = True, []
    for param in query.split("&") if mark else []:
        name, _, value = param.partition("=")
        if name != LISTEN_PARAM:
            kept.append(param)
        elif value.lower() in _OFF:
            listen = False
        elif value.lower() not in ("on", "1", "true", "yes"):
            raise ValueError(f"{LISTEN_PARAM}={value!r}: use on or off")
    return base + ("?" + "&".join(kept) if kept else ""), listen


def libpq_dsn(url: str) -> str:
    """
    The libpq connection string for database URL C{url}, parsed by libpq
    itself so that everything it accepts works: several hosts
    (C{postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write}),
    which SQLAlchemy's C{make_url} refuses, and any query parameter.  A
    SQLAlchemy driver suffix (C{postgresql+psycopg2://}) is dropped, and
    the settings of L{DEAD_PEER_DEFAULTS} are added where missing.

    @raise ValueError: not a PostgreSQL URL that libpq accepts.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.partition("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"{hide_password(url)!r} is not a PostgreSQL URL")
    try:
        params = parse_dsn(f"postgresql://{rest}")
    except psycopg2.ProgrammingError as e:
        raise ValueError(f"{hide_password(url)!r}: {str(e).strip()}") from None
    for name, value in DEAD_PEER_DEFAULTS.items():
        params.setdefault(name, value)
    return make_dsn(**params)  # type: ignore[no-any-return]


def hide_password(url: str) -> str:
    """
    C{url} with any password, in its user part or its query, shown as
    C{***}, for logs and status pages.  Taken apart by hand: C{urlsplit}
    and C{urlunsplit} would lose the C{//} of C{postgresql:///db?host=...}.
    """
    scheme, sep, rest = url.partition("://")
    authority, query = re.fullmatch(r"([^/?]*)(.*)", rest, re.DOTALL).groups()  # type: ignore[union-attr]
    userinfo, at, hosts = authority.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    path, mark, params = query.partition("?")
    hidden = [
        "password=***" if param.partition("=")[0] == "password" else param
        for param in params.split("&")
    ]
    return f"{scheme}{sep}{userinfo}{at}{hosts}{path}{mark}{'&'.join(hidden)}"


def _shape(statement: Executable) -> Shape:
    return shape_for(statement, _DIALECT)


def _drive(cursor: Cursor, unit: Unit[T]) -> Deferred[T]:
    """
    L{units.drive}, asynchronously: run unit C{unit} on
    C{cursor}, closing the generator if a statement fails.  Driven by plain
    callbacks: a coroutine per statement costs more than its round trip.
    """
    done: Deferred[T] = Deferred()

    def step(_: object, shape: Shape | None) -> None:
        try:
            if shape is None:
                query = next(unit)
            else:
                query = unit.send(Outcome(shape.rows(cursor), cursor.rowcount))
            shape = _shape(query.statement)
            executed = cursor.execute(shape.sql, shape.params(query.params))
        except StopIteration as stop:
            done.callback(stop.value)
        except BaseException:
            unit.close()
            done.errback()
        else:
            executed.addCallbacks(step, failed, callbackArgs=(shape,))

    def failed(reason: Failure) -> None:
        unit.close()
        done.errback(reason)

    step(None, None)
    return done


#: Tells every store listening of a change, once committed.
_NOTIFY = select(func.pg_notify(CHANNEL, bindparam("b_message")))
_SCHEMA_LOCKED = Query(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))


@writer
def _create_schema_locked() -> Unit[int]:
    """
    L{schema.create_schema}, holding L{SCHEMA_LOCK} until commit: servers
    starting at once on an empty database create the schema one after the
    other instead of racing in PostgreSQL's catalogs.
    """
    yield _SCHEMA_LOCKED
    return (yield from schema.create_schema())


def _unavailable(error: BaseException) -> Unavailable:
    return Unavailable(ErrorCode.UNAVAILABLE, f"metadata database unavailable: {cause(error)}")


@implementer(IMetadataStore, ITransactionStore)
class PostgresStore(MetadataStore):
    """
    The metadata in PostgreSQL, through a txpostgres pool.  Listeners hear
    of changes made by any store on the database, each change once.

    @ivar url: the database URL, with any password hidden.
    """

    def __init__(self, url: str, reactor: Any, poolSize: int = POOL_SIZE) -> None:
        """
        @param url: a libpq URL, with or without a SQLAlchemy driver
            (C{postgresql+psycopg2://}); several hosts are tried in turn.
        @param reactor: provides C{IReactorTime} and C{IReactorFDSet}.
        @raise ValueError: C{url} is not a PostgreSQL URL libpq accepts.
        """
        super().__init__(reactor)
        self.url = hide_password(url)
        url, self.listening = listen_option(url)
        self._dsn = libpq_dsn(url)
        self._poolSize = poolSize
        # Tells this store's notifications from other stores' in LISTEN.
        self._origin = uuid.uuid4().hex
        self._pool: PgPool | None = None
        self._connections: list[PgConnection] = []
        self._cooperator: Cooperator | None = None
        self._inflight: set[Deferred[None]] = set()

    def _transact(self, work: Work[T], notice: Notice) -> Deferred[tuple[T, Event | None]]:
        """
        Run C{work} in one PostgreSQL transaction, whose COMMIT carries the
        C{pg_notify} of its event (L{MetadataStore._transact}).  Counted
        in flight until it ends, for L{stop} to wait for.
        """
        # Set while _running, which _run checked.
        assert self._pool is not None
        done: Deferred[None] = Deferred()
        self._inflight.add(done)

        def finished(result: T) -> T:
            self._inflight.discard(done)
            done.callback(None)
            return result

        return ensureDeferred(self._attempts(self._pool, work, notice)).addBoth(finished)

    async def _attempts(
        self, pool: PgPool, work: Work[T], notice: Notice
    ) -> tuple[T, Event | None]:
        """
        Run C{work} on C{pool}, again from the start when it loses a race.

        @raise Unavailable: the database is down or unreachable.
        """
        attempt = 1
        while True:
            try:
                return await pool.runInteraction(self._interaction, work, notice)  # type: ignore[no-any-return]
            except (psycopg2.IntegrityError, psycopg2.extensions.TransactionRollbackError):
                # A race lost on a unique index (see units), or a deadlock
                # or serialization failure PostgreSQL rolled back: counters'
                # rows (schema.file_counts) are locked in the order files
                # change, which two multi-file units may differ on.
                if attempt == units.ATTEMPTS:
                    raise
                attempt += 1
            except _TRANSIENT as e:
                raise _unavailable(e) from e

    def _interaction(
        self, cursor: Cursor, work: Work[T], notice: Notice
    ) -> Deferred[tuple[tuple[T, Event | None], Final | None]]:
        """
        Run C{work} on C{cursor}; end with the C{pg_notify} of its event,
        if any, sent with the COMMIT.
        """

        def ended(result: T) -> tuple[tuple[T, Event | None], Final | None]:
            event = notice(result)
            if event is None:
                return (result, None), None
            message = {"origin": self._origin, "event": event[0], "payload": event[1]}
            shape = _shape(_NOTIFY)
            return (result, event), (shape.sql, shape.params({"b_message": json.dumps(message)}))

        return _drive(cursor, work()).addCallback(ended)

    def _heard(self, notify: Notify) -> None:
        """
        Tell listeners of another store's change.  This store's own come
        back too, and are skipped: listeners heard of them at commit.
        """
        try:
            message = json.loads(notify.payload)
            origin, event, payload = message["origin"], message["event"], message["payload"]
            if not (isinstance(event, str) and isinstance(payload, dict)):
                raise TypeError(event, payload)
        except (ValueError, KeyError, TypeError):
            _log.warn(
                "ignoring a malformed notification on {channel}: {payload!r}",
                channel=notify.channel,
                payload=notify.payload,
            )
            return
        if origin != self._origin:
            self._listeners.notify(event, payload)

    async def _connect(self) -> None:
        """
        Open the pool and the LISTEN connection, all or none.

        @raise Unavailable: the database cannot be reached.
        """
        cooperator = Cooperator(scheduler=lambda work: self._reactor.callLater(0, work))
        pool = PgPool(self._reactor, cooperator, self._dsn, self._poolSize)
        listener = new_connection(self._reactor, cooperator) if self.listening else None
        connections = [*pool.connections, *([listener] if listener is not None else [])]
        results = await DeferredList(
            [connection.connect(self._dsn) for connection in connections],
            consumeErrors=True,
        )
        errors = [result for ok, result in results if not ok]
        if not errors and listener is not None:
            listener.addNotifyObserver(self._heard)

            def listen() -> Deferred[None]:
                return listener.runOperation(f"LISTEN {CHANNEL}")  # type: ignore[no-any-return]

            # A reconnected connection has lost the old one's LISTEN.
            listener.detector.addRecoveryHandler(listen)
            try:
                await listen()
            except Exception:
                errors.append(Failure())
        if errors:
            for connection in connections:
                connection.detector.stop()
            cooperator.stop()
            if errors[0].check(*_TRANSIENT):
                raise _unavailable(errors[0].value)
            errors[0].raiseException()
        self._pool, self._connections, self._cooperator = pool, connections, cooperator

    async def _start(self) -> int:
        if self._pool is None:
            await self._connect()
        self._running = True
        return await self._run(_create_schema_locked)

    def start(self) -> Deferred[int]:
        """
        Connect, and create or check the schema; fire with the schema
        version.  Starting a started store only checks the schema again.
        """
        return ensureDeferred(self._start())

    async def _close(self, connections: list[PgConnection], cooperator: Cooperator | None) -> None:
        # Closing a connection would fail its transaction in progress.
        await gatherResults(list(self._inflight))
        for connection in connections:
            connection.detector.stop()
        if cooperator is not None:
            cooperator.stop()

    def stop(self) -> Deferred[None]:
        """
        Refuse new calls, let those in progress finish, then close every
        connection.  Stopping a stopped store does nothing.
        """
        if self._pool is None:
            return succeed(None)
        self._running = False
        self._pool = None
        connections, self._connections = self._connections, []
        cooperator, self._cooperator = self._cooperator, None
        return ensureDeferred(self._close(connections, cooperator))
