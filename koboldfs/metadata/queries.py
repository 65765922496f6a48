"""
Every metadata operation, written once as a generator transaction.

A transaction is a generator that yields SQLAlchemy Core statements, is sent
back an L{Outcome} for each, and returns its result (C{StopIteration.value}).
It does no I/O and knows no engine or dialect, so the SQLite driver
(L{koboldfs.metadata.sqlstore}) and the PostgreSQL one run the same code.

The driver contract:

  - Run one transaction per database transaction: begin, drive the
    generator with L{drive} (or an asynchronous loop doing the same: first
    C{next(gen)}, then C{gen.send(outcome)} until C{StopIteration}), commit.
  - Begin writers (C{work.writes}) so that they hold the write lock from the
    start: C{BEGIN IMMEDIATE} on SQLite.
  - On an integrity error (a unique index lost a race with another writer),
    roll back and run the whole transaction again from a fresh generator,
    C{work()}, up to L{ATTEMPTS} runs in all: the next run sees the
    winner's rows.  An integrity error that persists is a bug, and is let
    through.  Errors raised by the generator itself (L{ValueError},
    L{NewerSchema}) are final.

Drivers are given a L{Work}: a zero-argument factory of fresh generators
that also tells whether the transaction writes.  The transactions are
L{create_schema}; L{get_namespace} and L{ensure_namespace}; L{add_file},
L{lookup}, L{delete} and L{list_keys}; L{register_server}, L{heartbeat},
L{set_server_state} and L{list_servers}; L{add_replica} and
L{remove_replica}.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Generator, Generic, Iterable, TypeVar

from sqlalchemy import Column, insert, literal_column, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.schema import CreateIndex, CreateTable, ExecutableDDLElement
from sqlalchemy.sql.base import Executable

from koboldfs.interfaces import SERVER_STATES, FileInfo, NamespaceInfo, ServerInfo
from koboldfs.metadata.schema import (
    SCHEMA_VERSION,
    files,
    metadata,
    namespaces,
    replicas,
    schema_version,
    servers,
)
from koboldfs.names import key_upper_bound

T = TypeVar("T")
R = TypeVar("R")

#: Runs of a transaction that keeps losing races on a unique index before
#: its integrity error is let through.
ATTEMPTS = 5


@dataclass(frozen=True)
class Outcome:
    """
    What executing one statement gave: its rows (empty for statements that
    return none) and the driver's row count (-1 where it has none).
    """

    rows: list[tuple]
    rowcount: int


#: A generator transaction returning a T.
Txn = Generator[Executable, Outcome, T]


class NewerSchema(RuntimeError):
    """
    The database was created or upgraded by a newer KoboldFS: this code
    does not know its tables, so it must not touch them.
    """


def reader(txn: Callable[..., Txn[T]]) -> Callable[..., Txn[T]]:
    """
    Mark C{txn} as a transaction that only reads.
    """
    txn.writes = False  # type: ignore[attr-defined]
    return txn


def writer(txn: Callable[..., Txn[T]]) -> Callable[..., Txn[T]]:
    """
    Mark C{txn} as a transaction that writes, which drivers begin by taking
    the write lock so that it never fails upgrading a read lock.
    """
    txn.writes = True  # type: ignore[attr-defined]
    return txn


@dataclass(frozen=True)
class Work(Generic[T]):
    """
    One transaction to run with its arguments: call it for a fresh
    generator, as many times as the driver retries.
    """

    txn: Callable[..., Txn[T]]
    args: tuple[Any, ...] = ()

    @property
    def writes(self) -> bool:
        """
        Whether the transaction writes (every transaction is marked with
        L{reader} or L{writer}; an unmarked one fails here, not silently).
        """
        return self.txn.writes  # type: ignore[attr-defined,no-any-return]

    def __call__(self) -> Txn[T]:
        return self.txn(*self.args)


def drive(txn: Txn[T], execute: Callable[[Executable], Outcome]) -> T:
    """
    Run generator transaction C{txn} synchronously, executing each statement
    it yields with C{execute}; return its result.  If C{execute} raises, the
    generator is closed and the error propagates, for the driver to roll
    back (and maybe retry).
    """
    try:
        statement = next(txn)
        while True:
            statement = txn.send(execute(statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        txn.close()


def _record(cls: type[R], columns: Iterable[Column[Any]], row: tuple) -> R:
    """
    Build record C{cls} from a row of C{columns}, matched by name.
    """
    return cls(**{column.key: value for column, value in zip(columns, row, strict=True)})


# A literal, not a bound parameter: the partial index files_live_key serves
# a query only when the planner sees that the query's condition implies the
# index's, which a parameter can hide (PostgreSQL's generic plans).
_LIVE = files.c.state == literal_column("'live'")

_NAMESPACE_COLUMNS = tuple(namespaces.c[f.name] for f in fields(NamespaceInfo))
_SERVER_COLUMNS = tuple(servers.c[f.name] for f in fields(ServerInfo))


def _check_state(state: str) -> None:
    if state not in SERVER_STATES:
        raise ValueError(f"invalid server state {state!r}: use one of {', '.join(SERVER_STATES)}")


def schema_ddl() -> list[ExecutableDDLElement]:
    """
    The statements that create every table and index that does not exist
    yet, tables in dependency order, each followed by its indexes.
    """
    ddl: list[ExecutableDDLElement] = []
    for table in metadata.sorted_tables:
        ddl.append(CreateTable(table, if_not_exists=True))
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            ddl.append(CreateIndex(index, if_not_exists=True))
    return ddl


@writer
def create_schema() -> Txn[int]:
    """
    Create the schema where missing and record its version; return the
    stored version.  Idempotent, and safe when several servers start at
    once: SQLite serializes writers, and a PostgreSQL catalog race fails
    with an integrity error, which drivers retry.

    @raise NewerSchema: the database's schema is newer than this code.
    """
    # The version table first, so that a newer schema is refused before
    # this code creates anything in it.
    yield CreateTable(schema_version, if_not_exists=True)
    out = yield select(schema_version.c.version)
    stored = max((row[0] for row in out.rows), default=None)
    if stored is not None and stored > SCHEMA_VERSION:
        raise NewerSchema(
            f"the metadata database has schema version {stored}, but this "
            f"KoboldFS knows only up to {SCHEMA_VERSION}: upgrade KoboldFS"
        )
    # Upgrades from older versions go here when SCHEMA_VERSION is bumped.
    for statement in schema_ddl():
        yield statement
    if stored is None:
        yield insert(schema_version).values(version=SCHEMA_VERSION)
        stored = SCHEMA_VERSION
    return stored


def _retire(namespace_id: int, key: str, now: float) -> Txn[int | None]:
    """
    Mark the live version of C{key} deleted at C{now}; return its id, or
    None if there is none.  Not a transaction: a step of one that writes.

    On PostgreSQL (read committed), an UPDATE that waited for another
    writer's lock on the live version cannot see the version that writer
    then committed: looking again, in a statement of its own, finds it and
    retires it too, so that concurrent writers of a key queue on its row
    lock instead of all but one failing on files_live_key.  SQLite runs
    writers one at a time, and never loops.
    """
    live = (files.c.namespace_id == namespace_id, files.c.key == key, _LIVE)
    while True:
        out = (
            yield update(files)
            .where(*live)
            .values(state="deleted", deleted=now)
            .returning(files.c.id)
        )
        if out.rows:
            return out.rows[0][0]  # type: ignore[no-any-return]
        out = yield select(files.c.id).where(*live)
        if not out.rows:
            return None


@reader
def get_namespace(name: str) -> Txn[NamespaceInfo | None]:
    """
    The namespace called C{name}, or None.
    """
    out = yield select(*_NAMESPACE_COLUMNS).where(namespaces.c.name == name)
    if not out.rows:
        return None
    return _record(NamespaceInfo, _NAMESPACE_COLUMNS, out.rows[0])


@writer
def ensure_namespace(name: str, now: float) -> Txn[NamespaceInfo]:
    """
    The namespace called C{name}, created at C{now} if missing.  Two servers
    creating it at once collide on its unique name; the retry finds it.
    """
    found = yield from get_namespace(name)
    if found is not None:
        return found
    out = yield insert(namespaces).values(name=name, created=now).returning(*_NAMESPACE_COLUMNS)
    return _record(NamespaceInfo, _NAMESPACE_COLUMNS, out.rows[0])


@writer
def add_file(
    namespace: str,
    key: str,
    fid: str,
    path: str,
    size: int,
    sha256: str,
    created: float,
    server: str,
) -> Txn[FileInfo]:
    """
    Publish a new live version of C{key} held by C{server}, retiring the
    previous one.  Concurrent writers of one key queue on the live version's
    row lock (see L{_retire}); the rare two that still collide on
    files_live_key are retried by the driver, so the last writer wins and
    all succeed.
    """
    ns = yield from ensure_namespace(namespace, created)
    yield from _retire(ns.id, key, created)
    out = (
        yield insert(files)
        .values(
            fid=fid,
            namespace_id=ns.id,
            key=key,
            size=size,
            sha256=sha256,
            created=created,
            path=path,
            state="live",
        )
        .returning(files.c.id)
    )
    file_id = out.rows[0][0]
    yield insert(replicas).values(file_id=file_id, server=server, state="ok", created=created)
    return FileInfo(
        id=file_id,
        fid=fid,
        namespace=namespace,
        key=key,
        size=size,
        sha256=sha256,
        created=created,
        path=path,
        replicas=(server,),
    )


@reader
def lookup(namespace: str, key: str) -> Txn[FileInfo | None]:
    """
    The live version of C{key} with the servers holding a good copy, or
    None.
    """
    ns = yield from get_namespace(namespace)
    if ns is None:
        return None
    columns = (
        files.c.id,
        files.c.fid,
        files.c.key,
        files.c.size,
        files.c.sha256,
        files.c.created,
        files.c.path,
    )
    out = yield select(*columns).where(files.c.namespace_id == ns.id, files.c.key == key, _LIVE)
    if not out.rows:
        return None
    row = dict(zip((column.key for column in columns), out.rows[0], strict=True))
    held = yield select(replicas.c.server).where(
        replicas.c.file_id == row["id"], replicas.c.state == "ok"
    )
    # Sorted here, not by the database, whose collation of server names
    # may differ between backends.
    return FileInfo(
        namespace=namespace,
        replicas=tuple(sorted(server for (server,) in held.rows)),
        **row,
    )


@writer
def delete(namespace: str, key: str, now: float) -> Txn[int | None]:
    """
    Mark the live version of C{key} deleted at C{now}; return its id, or
    None if there was none.
    """
    ns = yield from get_namespace(namespace)
    if ns is None:
        return None
    return (yield from _retire(ns.id, key, now))


@reader
def list_keys(namespace: str, prefix: str, after: str | None, limit: int) -> Txn[list[str]]:
    """
    Up to C{limit} live keys starting with C{prefix}, after C{after}, in
    code-point order: a range scan of files_live_key.
    """
    ns = yield from get_namespace(namespace)
    if ns is None or limit <= 0:
        return []
    conditions = [files.c.namespace_id == ns.id, _LIVE]
    if prefix:
        conditions.append(files.c.key >= prefix)
        bound = key_upper_bound(prefix)
        if bound is not None:
            conditions.append(files.c.key < bound)
    if after is not None:
        conditions.append(files.c.key > after)
    out = yield select(files.c.key).where(*conditions).order_by(files.c.key).limit(limit)
    return [key for (key,) in out.rows]


@writer
def register_server(server: ServerInfo) -> Txn[ServerInfo]:
    """
    Insert or update C{server}'s row and return it as stored.  A stored
    state other than ``dead`` is kept: an operator's ``readonly`` or
    ``drain`` survives restarts, while a server that comes back from
    ``dead`` takes the state it registers with.  Two servers racing to
    insert the same name collide on the key; the retry updates.
    """
    _check_state(server.state)
    out = yield select(servers.c.state).where(servers.c.name == server.name)
    values = {
        "host": server.host,
        "address": server.address,
        "public_url": server.public_url,
        "heartbeat": server.heartbeat,
        "disk_free": server.disk_free,
        "disk_total": server.disk_total,
    }
    if out.rows and out.rows[0][0] != "dead":
        state = out.rows[0][0]
    else:
        state = server.state
    if out.rows:
        yield update(servers).where(servers.c.name == server.name).values(state=state, **values)
    else:
        yield insert(servers).values(name=server.name, state=state, **values)
    return replace(server, state=state)


@writer
def heartbeat(name: str, now: float, disk_free: int, disk_total: int) -> Txn[bool]:
    """
    Record server C{name}'s heartbeat; return whether it is registered.
    """
    out = (
        yield update(servers)
        .where(servers.c.name == name)
        .values(heartbeat=now, disk_free=disk_free, disk_total=disk_total)
    )
    return out.rowcount > 0


@writer
def set_server_state(name: str, state: str) -> Txn[bool]:
    """
    Set server C{name}'s state; return whether it is registered.

    @raise ValueError: C{state} is not one of L{SERVER_STATES}.
    """
    _check_state(state)
    out = yield update(servers).where(servers.c.name == name).values(state=state)
    return out.rowcount > 0


@reader
def list_servers() -> Txn[list[ServerInfo]]:
    """
    Every registered server, by name.
    """
    out = yield select(*_SERVER_COLUMNS)
    found = [_record(ServerInfo, _SERVER_COLUMNS, row) for row in out.rows]
    return sorted(found, key=lambda server: server.name)


@writer
def add_replica(file_id: int, server: str, now: float) -> Txn[bool]:
    """
    Record that C{server} holds a verified copy of file C{file_id}, first at
    C{now}; recording it again marks it good.  Return False if there is no
    such file (the replicator may have reclaimed it meanwhile).
    """
    out = yield select(files.c.id).where(files.c.id == file_id)
    if not out.rows:
        return False
    out = (
        yield update(replicas)
        .where(replicas.c.file_id == file_id, replicas.c.server == server)
        .values(state="ok")
    )
    if out.rowcount == 0:
        yield insert(replicas).values(file_id=file_id, server=server, state="ok", created=now)
    return True


@writer
def remove_replica(file_id: int, server: str) -> Txn[bool]:
    """
    Forget C{server}'s copy of file C{file_id}; return whether it had one.
    """
    out = yield sql_delete(replicas).where(
        replicas.c.file_id == file_id, replicas.c.server == server
    )
    return out.rowcount > 0
