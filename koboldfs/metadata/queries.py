"""
Every metadata operation, written once as a unit.

A unit (of work) is a generator that yields L{Query}s, is sent back an
L{Outcome} for each, and returns its result (C{StopIteration.value}); the
store runs each in one database transaction.  The word "transaction"
alone is kept for client transactions (L{koboldfs.metadata.txnstore}).  A
unit does no I/O and knows no engine or dialect, so the SQLite driver
(L{koboldfs.metadata.sqlstore}) and the PostgreSQL one run the same code.

Each query is a SQLAlchemy Core statement built once, at import, with
C{bindparam()}s, and the values of this run: building and compiling a
statement costs more than running it, so drivers may compile each once and
keep it (the PostgreSQL one does, by identity).  Parameters are named
C{b_...}, never after a column: SQLAlchemy would take a parameter named
after a column for a value to set in an INSERT or UPDATE.

The driver contract:

  - Run each unit in one database transaction: begin, drive the
    generator with L{drive} (or an asynchronous loop doing the same: first
    C{next(gen)}, then C{gen.send(outcome)} until C{StopIteration}), commit.
  - Begin writers (C{work.writes}) so that they hold the write lock from the
    start: C{BEGIN IMMEDIATE} on SQLite.
  - On an integrity error (a unique index lost a race with another writer),
    roll back and run the whole unit again from a fresh generator,
    C{work()}, up to L{ATTEMPTS} runs in all: the next run sees the
    winner's rows.  An integrity error that persists is a bug, and is let
    through.  Errors raised by the generator itself (L{ValueError},
    L{NewerSchema}) are final.

Drivers are given a L{Work}: a zero-argument factory of fresh generators
that also tells whether the unit writes.  The units are
L{create_schema}; L{get_namespace} and L{ensure_namespace}; L{add_file},
L{known_fids}, L{lookup}, L{delete} and L{list_keys}; L{register_server}, L{heartbeat},
L{set_server_state}, L{list_servers} and L{files_held}; L{list_namespaces};
L{add_replica} and L{remove_replica}; and the replicator's L{missing_replicas},
L{held_files}, L{deleted_files} and L{purge_file}.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cache
from types import MappingProxyType
from typing import Any, Callable, Generator, Generic, Iterable, Mapping, NamedTuple, TypeVar

from sqlalchemy import Column, Select, bindparam, func, insert, literal_column, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.schema import CreateIndex, CreateTable, ExecutableDDLElement
from sqlalchemy.sql.base import Executable

from koboldfs.interfaces import FileInfo, NamespaceInfo, ServerInfo, ServerState
from koboldfs.auth import KeyInfo
from koboldfs.metadata.schema import (
    SCHEMA_VERSION,
    client_keys,
    files,
    metadata,
    namespaces,
    replicas,
    schema_version,
    servers,
)
from koboldfs.names import key_upper_bound
from koboldfs.urls import check_template, new_secret

T = TypeVar("T")
R = TypeVar("R")

#: Runs of a unit that keeps losing races on a unique index before
#: its integrity error is let through.
ATTEMPTS = 5


class Query(NamedTuple):
    """
    One statement to execute: a shape built once, and this run's values
    for its parameters.
    """

    statement: Executable
    params: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Outcome:
    """
    What executing one statement gave: its rows (empty for statements that
    return none) and the driver's row count (-1 where it has none).
    """

    rows: list[tuple]
    rowcount: int


#: A unit returning a T.
Unit = Generator[Query, Outcome, T]


class NewerSchema(RuntimeError):
    """
    The database was created or upgraded by a newer KoboldFS: this code
    does not know its tables, so it must not touch them.
    """


def reader(unit: Callable[..., Unit[T]]) -> Callable[..., Unit[T]]:
    """
    Mark C{unit} as a unit that only reads.
    """
    unit.writes = False  # type: ignore[attr-defined]
    return unit


def writer(unit: Callable[..., Unit[T]]) -> Callable[..., Unit[T]]:
    """
    Mark C{unit} as a unit that writes, which drivers begin by taking the
    write lock so that it never fails upgrading a read lock.
    """
    unit.writes = True  # type: ignore[attr-defined]
    return unit


@dataclass(frozen=True)
class Work(Generic[T]):
    """
    One unit to run with its arguments: call it for a fresh generator, as
    many times as the driver retries.
    """

    unit: Callable[..., Unit[T]]
    args: tuple[Any, ...] = ()

    @property
    def writes(self) -> bool:
        """
        Whether the unit writes (every unit is marked with L{reader} or
        L{writer}; an unmarked one fails here, not silently).
        """
        return self.unit.writes  # type: ignore[attr-defined,no-any-return]

    def __call__(self) -> Unit[T]:
        return self.unit(*self.args)


def drive(unit: Unit[T], execute: Callable[[Query], Outcome]) -> T:
    """
    Run unit C{unit} synchronously, executing each query it yields with
    C{execute}; return its result.  If C{execute} raises, the
    generator is closed and the error propagates, for the driver to roll
    back (and maybe retry).
    """
    try:
        query = next(unit)
        while True:
            query = unit.send(execute(query))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        unit.close()


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
_LOOKUP_COLUMNS = (
    files.c.id,
    files.c.fid,
    files.c.key,
    files.c.size,
    files.c.sha256,
    files.c.created,
    files.c.path,
)
# The server columns that a registration sets, from parameters b_<column>.
_SERVER_VALUES = ("host", "address", "public_url", "heartbeat", "disk_free", "disk_total")

# The statements, built once (see the module's docstring).
_STORED_VERSION = select(schema_version.c.version)
_INSERT_VERSION = insert(schema_version).values(version=SCHEMA_VERSION)
_GET_NAMESPACE = select(*_NAMESPACE_COLUMNS).where(namespaces.c.name == bindparam("b_name"))
_INSERT_NAMESPACE = (
    insert(namespaces)
    .values(name=bindparam("b_name"), created=bindparam("b_now"))
    .returning(*_NAMESPACE_COLUMNS)
)
_LIVE_KEY = (
    files.c.namespace_id == bindparam("b_namespace_id"),
    files.c.key == bindparam("b_key"),
    _LIVE,
)
_RETIRE = (
    update(files)
    .where(*_LIVE_KEY)
    .values(state="deleted", deleted=bindparam("b_now"))
    .returning(files.c.id)
)
_FIND_LIVE = select(files.c.id).where(*_LIVE_KEY)


def insert_file(state: str) -> Any:
    """
    The insert of a file row in C{state} (live, or pending in a client
    transaction), returning its id.
    """
    return (
        insert(files)
        .values(
            fid=bindparam("b_fid"),
            namespace_id=bindparam("b_namespace_id"),
            key=bindparam("b_key"),
            size=bindparam("b_size"),
            sha256=bindparam("b_sha256"),
            created=bindparam("b_now"),
            path=bindparam("b_path"),
            state=state,
        )
        .returning(files.c.id)
    )


_INSERT_FILE = insert_file("live")
_INSERT_REPLICA = insert(replicas).values(
    file_id=bindparam("b_file_id"),
    server=bindparam("b_server"),
    state="ok",
    created=bindparam("b_now"),
)
_LOOKUP_FILE = select(*_LOOKUP_COLUMNS).where(*_LIVE_KEY)
_GOOD_REPLICAS = select(replicas.c.server).where(
    replicas.c.file_id == bindparam("b_file_id"), replicas.c.state == "ok"
)
_LOOKUP_KEY = (
    select(*_LOOKUP_COLUMNS, replicas.c.server)
    .join_from(files, namespaces, files.c.namespace_id == namespaces.c.id)
    .outerjoin(replicas, (replicas.c.file_id == files.c.id) & (replicas.c.state == "ok"))
    .where(namespaces.c.name == bindparam("b_namespace"), files.c.key == bindparam("b_key"), _LIVE)
)
_SERVER_NAMED = servers.c.name == bindparam("b_name")
_SERVER_STATE = select(servers.c.state).where(_SERVER_NAMED)
_UPDATE_SERVER = (
    update(servers)
    .where(_SERVER_NAMED)
    .values(state=bindparam("b_state"), **{c: bindparam(f"b_{c}") for c in _SERVER_VALUES})
)
_INSERT_SERVER = insert(servers).values(
    name=bindparam("b_name"),
    state=bindparam("b_state"),
    **{c: bindparam(f"b_{c}") for c in _SERVER_VALUES},
)
_HEARTBEAT = (
    update(servers)
    .where(_SERVER_NAMED)
    .values(
        heartbeat=bindparam("b_now"),
        disk_free=bindparam("b_disk_free"),
        disk_total=bindparam("b_disk_total"),
    )
)
_SET_SERVER_STATE = update(servers).where(_SERVER_NAMED).values(state=bindparam("b_state"))
_LIST_SERVERS = select(*_SERVER_COLUMNS)
_LIST_NAMESPACES = select(*_NAMESPACE_COLUMNS)
_FILES_HELD = (
    select(replicas.c.server, func.count())
    .select_from(replicas.join(files, files.c.id == replicas.c.file_id))
    .where(replicas.c.state == "ok", _LIVE)
    .group_by(replicas.c.server)
)
_FILE_EXISTS = select(files.c.id).where(files.c.id == bindparam("b_file_id"))
_REPLICA = (
    replicas.c.file_id == bindparam("b_file_id"),
    replicas.c.server == bindparam("b_server"),
)
_MARK_REPLICA_OK = update(replicas).where(*_REPLICA).values(state="ok")
_DELETE_REPLICA = sql_delete(replicas).where(*_REPLICA)


@cache
def _list_keys_query(prefix: bool, bound: bool, after: bool) -> Select[str]:
    """
    The query listing live keys of namespace C{b_namespace_id}, up to
    C{b_limit}, in order: from C{b_prefix} if C{prefix}, below C{b_bound}
    if C{bound}, after C{b_after} if C{after}.  Eight shapes at most.
    """
    conditions = [files.c.namespace_id == bindparam("b_namespace_id"), _LIVE]
    if prefix:
        conditions.append(files.c.key >= bindparam("b_prefix"))
    if bound:
        conditions.append(files.c.key < bindparam("b_bound"))
    if after:
        conditions.append(files.c.key > bindparam("b_after"))
    return select(files.c.key).where(*conditions).order_by(files.c.key).limit(bindparam("b_limit"))


def _check_state(state: str) -> None:
    if state not in set(ServerState):
        raise ValueError(f"invalid server state {state!r}: use one of {', '.join(ServerState)}")


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


_VERSION_TABLE = CreateTable(schema_version, if_not_exists=True)
_SCHEMA_DDL = tuple(Query(statement) for statement in schema_ddl())


@writer
def create_schema() -> Unit[int]:
    """
    Create the schema where missing and record its version; return the
    stored version.  Idempotent, and safe when several servers start at
    once: SQLite serializes writers, and a PostgreSQL catalog race fails
    with an integrity error, which drivers retry.

    @raise NewerSchema: the database's schema is newer than this code.
    """
    # The version table first, so that a newer schema is refused before
    # this code creates anything in it.
    yield Query(_VERSION_TABLE)
    out = yield Query(_STORED_VERSION)
    stored = max((row[0] for row in out.rows), default=None)
    if stored is not None and stored > SCHEMA_VERSION:
        raise NewerSchema(
            f"the metadata database has schema version {stored}, but this "
            f"KoboldFS knows only up to {SCHEMA_VERSION}: upgrade KoboldFS"
        )
    # Upgrades from older versions go here when SCHEMA_VERSION is bumped.
    for query in _SCHEMA_DDL:
        yield query
    if stored is None:
        yield Query(_INSERT_VERSION)
        stored = SCHEMA_VERSION
    return stored


def _retire(namespace_id: int, key: str, now: float) -> Unit[int | None]:
    """
    Mark the live version of C{key} deleted at C{now}; return its id, or
    None if there is none.  Not a unit: a step of one that writes.

    On PostgreSQL (read committed), an UPDATE that waited for another
    writer's lock on the live version cannot see the version that writer
    then committed: looking again, in a statement of its own, finds it and
    retires it too, so that concurrent writers of a key queue on its row
    lock instead of all but one failing on files_live_key.  SQLite runs
    writers one at a time, and never loops.
    """
    live = {"b_namespace_id": namespace_id, "b_key": key}
    while True:
        out = yield Query(_RETIRE, {**live, "b_now": now})
        if out.rows:
            return out.rows[0][0]  # type: ignore[no-any-return]
        out = yield Query(_FIND_LIVE, live)
        if not out.rows:
            return None


@reader
def get_namespace(name: str) -> Unit[NamespaceInfo | None]:
    """
    The namespace called C{name}, or None.
    """
    out = yield Query(_GET_NAMESPACE, {"b_name": name})
    if not out.rows:
        return None
    return _record(NamespaceInfo, _NAMESPACE_COLUMNS, out.rows[0])


@writer
def ensure_namespace(name: str, now: float) -> Unit[NamespaceInfo]:
    """
    The namespace called C{name}, created at C{now} if missing.  Two servers
    creating it at once collide on its unique name; the retry finds it.
    """
    found = yield from get_namespace(name)
    if found is not None:
        return found
    out = yield Query(_INSERT_NAMESPACE, {"b_name": name, "b_now": now})
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
    also: tuple[str, ...] = (),
) -> Unit[FileInfo]:
    """
    Publish a new live version of C{key} held by C{server}, and by the
    servers C{also} (copies made while it was put: koboldfs.forwarding),
    retiring the previous one.  Concurrent writers of one key queue on the live version's
    row lock (see L{_retire}); the rare two that still collide on
    files_live_key are retried by the driver, so the last writer wins and
    all succeed.
    """
    ns = yield from ensure_namespace(namespace, created)
    yield from _retire(ns.id, key, created)
    out = yield Query(
        _INSERT_FILE,
        {
            "b_fid": fid,
            "b_namespace_id": ns.id,
            "b_key": key,
            "b_size": size,
            "b_sha256": sha256,
            "b_now": created,
            "b_path": path,
        },
    )
    file_id = out.rows[0][0]
    holders = (server, *(name for name in dict.fromkeys(also) if name != server))
    for name in holders:
        yield Query(_INSERT_REPLICA, {"b_file_id": file_id, "b_server": name, "b_now": created})
    return FileInfo(
        id=file_id,
        fid=fid,
        namespace=namespace,
        key=key,
        size=size,
        sha256=sha256,
        created=created,
        path=path,
        replicas=tuple(sorted(holders)),
    )


_FID_KNOWN = select(files.c.id).where(files.c.fid == bindparam("b_fid"))


@reader
def known_fids(fids: tuple[str, ...]) -> Unit[set[str]]:
    """
    Those of C{fids} that a file row names, in any state: what is left is
    bytes no metadata knows (the orphan sweep, koboldfs.orphans).  One
    query each, on the unique index: expanding parameters are not
    compiled once.
    """
    known = set()
    for fid in fids:
        out = yield Query(_FID_KNOWN, {"b_fid": fid})
        if out.rows:
            known.add(fid)
    return known


@reader
def lookup(namespace: str, key: str) -> Unit[FileInfo | None]:
    """
    The live version of C{key} with the servers holding a good copy, or
    None.  One query (a row per good copy): every get and stat asks this,
    and on PostgreSQL each query is a round trip.
    """
    out = yield Query(_LOOKUP_KEY, {"b_namespace": namespace, "b_key": key})
    if not out.rows:
        return None
    width = len(_LOOKUP_COLUMNS)
    row = dict(zip((column.key for column in _LOOKUP_COLUMNS), out.rows[0][:width], strict=True))
    # Sorted here, not by the database, whose collation of server names
    # may differ between backends.
    held = sorted(r[width] for r in out.rows if r[width] is not None)
    return FileInfo(namespace=namespace, replicas=tuple(held), **row)


@writer
def delete(namespace: str, key: str, now: float) -> Unit[int | None]:
    """
    Mark the live version of C{key} deleted at C{now}; return its id, or
    None if there was none.
    """
    ns = yield from get_namespace(namespace)
    if ns is None:
        return None
    return (yield from _retire(ns.id, key, now))


@reader
def list_keys(namespace: str, prefix: str, after: str | None, limit: int) -> Unit[list[str]]:
    """
    Up to C{limit} live keys starting with C{prefix}, after C{after}, in
    code-point order: a range scan of files_live_key.
    """
    ns = yield from get_namespace(namespace)
    if ns is None or limit <= 0:
        return []
    bound = key_upper_bound(prefix) if prefix else None
    query = _list_keys_query(bool(prefix), bound is not None, after is not None)
    params = {
        "b_namespace_id": ns.id,
        "b_prefix": prefix,
        "b_bound": bound,
        "b_after": after,
        "b_limit": limit,
    }
    out = yield Query(query, params)
    return [key for (key,) in out.rows]


@writer
def register_server(server: ServerInfo) -> Unit[ServerInfo]:
    """
    Insert or update C{server}'s row and return it as stored.  A stored
    state other than ``dead`` is kept: an operator's ``readonly`` or
    ``drain`` survives restarts, while a server that comes back from
    ``dead`` takes the state it registers with.  Two servers racing to
    insert the same name collide on the key; the retry updates.
    """
    _check_state(server.state)
    out = yield Query(_SERVER_STATE, {"b_name": server.name})
    if out.rows and out.rows[0][0] != ServerState.DEAD:
        state = out.rows[0][0]
    else:
        state = server.state
    params = {
        "b_name": server.name,
        "b_state": state,
        **{f"b_{column}": getattr(server, column) for column in _SERVER_VALUES},
    }
    yield Query(_UPDATE_SERVER if out.rows else _INSERT_SERVER, params)
    return replace(server, state=state)


@writer
def heartbeat(name: str, now: float, disk_free: int, disk_total: int) -> Unit[bool]:
    """
    Record server C{name}'s heartbeat; return whether it is registered.
    """
    out = yield Query(
        _HEARTBEAT,
        {"b_name": name, "b_now": now, "b_disk_free": disk_free, "b_disk_total": disk_total},
    )
    return out.rowcount > 0


@writer
def set_server_state(name: str, state: str) -> Unit[bool]:
    """
    Set server C{name}'s state; return whether it is registered.

    @raise ValueError: C{state} is not a L{ServerState}.
    """
    _check_state(state)
    out = yield Query(_SET_SERVER_STATE, {"b_name": name, "b_state": state})
    return out.rowcount > 0


@reader
def list_servers() -> Unit[list[ServerInfo]]:
    """
    Every registered server, by name.
    """
    out = yield Query(_LIST_SERVERS)
    found = [_record(ServerInfo, _SERVER_COLUMNS, row) for row in out.rows]
    return sorted(found, key=lambda server: server.name)


@reader
def files_held() -> Unit[dict[str, int]]:
    """
    How many live files each server holds a good copy of, by server name;
    servers holding none are left out.  One pass over the replicas: for an
    operator's listing, not for a hot path.
    """
    out = yield Query(_FILES_HELD)
    return {server: count for server, count in out.rows}


@reader
def list_namespaces() -> Unit[list[NamespaceInfo]]:
    """
    Every namespace with its settings, by name (sorted here: the database's
    collation may not be code-point order).
    """
    out = yield Query(_LIST_NAMESPACES)
    found = [_record(NamespaceInfo, _NAMESPACE_COLUMNS, row) for row in out.rows]
    return sorted(found, key=lambda namespace: namespace.name)


@writer
def add_replica(file_id: int, server: str, now: float) -> Unit[bool]:
    """
    Record that C{server} holds a verified copy of file C{file_id}, first at
    C{now}; recording it again marks it good.  Return False if there is no
    such file (the replicator may have reclaimed it meanwhile).
    """
    out = yield Query(_FILE_EXISTS, {"b_file_id": file_id})
    if not out.rows:
        return False
    replica = {"b_file_id": file_id, "b_server": server}
    out = yield Query(_MARK_REPLICA_OK, replica)
    if out.rowcount == 0:
        yield Query(_INSERT_REPLICA, {**replica, "b_now": now})
    return True


@writer
def remove_replica(file_id: int, server: str) -> Unit[bool]:
    """
    Forget C{server}'s copy of file C{file_id}; return whether it had one.
    """
    out = yield Query(_DELETE_REPLICA, {"b_file_id": file_id, "b_server": server})
    return out.rowcount > 0


# -- namespace settings, and files by id (HTTP)

#: The settings L{set_namespace} changes: the columns after C{created}.
_NAMESPACE_SETTINGS = ("replicas", "min_copies", "url_template", "private", "secret")
_NAMESPACE_ID = bindparam("b_namespace_id")
_UPDATE_NAMESPACE = (
    update(namespaces)
    .where(namespaces.c.id == _NAMESPACE_ID)
    .values(**{c: bindparam(f"b_{c}") for c in _NAMESPACE_SETTINGS})
)
_HAS_FILES = select(files.c.id).where(files.c.namespace_id == _NAMESPACE_ID).limit(1)
_FILE_BY_FID = (
    select(*_LOOKUP_COLUMNS, *(c.label(f"ns_{c.key}") for c in _NAMESPACE_COLUMNS))
    .join_from(files, namespaces, files.c.namespace_id == namespaces.c.id)
    .where(files.c.fid == bindparam("b_fid"), _LIVE)
)


def _check_settings(settings: Mapping[str, Any]) -> None:
    """
    @raise ValueError: a setting L{set_namespace} does not know, or a value
        that is not of its kind.
    """
    unknown = set(settings) - set(_NAMESPACE_SETTINGS)
    if unknown:
        raise ValueError(
            f"unknown namespace setting(s) {', '.join(sorted(unknown))}: "
            f"use {', '.join(_NAMESPACE_SETTINGS)}"
        )
    for name in ("replicas", "min_copies"):
        value = settings.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
    if "private" in settings and not isinstance(settings["private"], bool):
        raise ValueError(f"private must be True or False, not {settings['private']!r}")
    secret = settings.get("secret")
    if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
        raise ValueError("a namespace secret is a string of at least 16 characters")
    if settings.get("url_template") is not None:
        check_template(settings["url_template"])


@writer
def set_namespace(name: str, now: float, settings: Mapping[str, Any]) -> Unit[NamespaceInfo]:
    """
    Change C{settings} of namespace C{name}, created at C{now} if missing;
    return it as stored.  Making it private gives it a secret if it has
    none.

    @raise ValueError: a bad setting, or a change of C{private} once the
        namespace has files: their paths on disk say whether they are
        private (see L{koboldfs.storage.relpath_for}).
    """
    _check_settings(settings)
    if settings.get("private") and name in (".", ".."):
        raise ValueError(f"namespace {name!r} cannot be private: it names no directory")
    current = yield from ensure_namespace(name, now)
    new = replace(current, **settings)
    if new.private and new.secret is None:
        new = replace(new, secret=new_secret())
    if new.private != current.private:
        out = yield Query(_HAS_FILES, {"b_namespace_id": current.id})
        if out.rows:
            raise ValueError(
                f"namespace {name!r} has files: it can no longer be made "
                f"{'private' if new.private else 'public'}"
            )
    params = {f"b_{c}": getattr(new, c) for c in _NAMESPACE_SETTINGS}
    yield Query(_UPDATE_NAMESPACE, {"b_namespace_id": current.id, **params})
    return new


@reader
def lookup_fid(fid: str) -> Unit[tuple[FileInfo, NamespaceInfo] | None]:
    """
    The live file stored as C{fid}, with the servers holding a good copy,
    and its namespace; None if there is no such live file.
    """
    out = yield Query(_FILE_BY_FID, {"b_fid": fid})
    if not out.rows:
        return None
    row = out.rows[0]
    ns = _record(NamespaceInfo, _NAMESPACE_COLUMNS, row[len(_LOOKUP_COLUMNS) :])
    columns = (column.key for column in _LOOKUP_COLUMNS)
    found = dict(zip(columns, row[: len(_LOOKUP_COLUMNS)], strict=True))
    held = yield Query(_GOOD_REPLICAS, {"b_file_id": found["id"]})
    info = FileInfo(
        namespace=ns.name,
        replicas=tuple(sorted(server for (server,) in held.rows)),
        **found,
    )
    return info, ns


# -- the replicator's work lists (koboldfs.replicator)

_DELETED = files.c.state == "deleted"
_HELD_BY_SERVER = (
    select(replicas.c.file_id)
    .where(replicas.c.file_id == files.c.id, replicas.c.server == bindparam("b_server"))
    .exists()
)
_GOOD_COPY_ON_SERVER = (
    select(replicas.c.file_id)
    .where(
        replicas.c.file_id == files.c.id,
        replicas.c.server == bindparam("b_server"),
        replicas.c.state == "ok",
    )
    .exists()
)
_HELD_AT_ALL = select(replicas.c.file_id).where(replicas.c.file_id == files.c.id).exists()
# A dead server is forgotten: its copies do not count, and its replica rows
# of deleted files do not keep them from being purged.
_DEAD_SERVERS = select(servers.c.name).where(servers.c.state == literal_column("'dead'"))
_HELD_BY_COUNTED = (
    select(replicas.c.file_id)
    .where(replicas.c.file_id == files.c.id, replicas.c.server.not_in(_DEAD_SERVERS))
    .exists()
)


def _files_page(*conditions: Any, good_only: bool) -> Select[Any]:
    """
    The files after id C{b_after} that meet C{conditions}, up to C{b_limit}
    of them by id, each joined with its replicas' servers (good copies only
    if C{good_only}; a file with none has one row, with a NULL server).
    The page is chosen first so that its limit counts files, not replicas.
    """
    page = (
        select(files.c.id)
        .where(files.c.id > bindparam("b_after"), *conditions)
        .order_by(files.c.id)
        .limit(bindparam("b_limit"))
        .subquery("page")
    )
    held = replicas.c.file_id == files.c.id
    if good_only:
        held = held & (replicas.c.state == "ok")
    return (
        select(*_LOOKUP_COLUMNS, namespaces.c.name, replicas.c.server)
        .select_from(
            page.join(files, files.c.id == page.c.id)
            .join(namespaces, namespaces.c.id == files.c.namespace_id)
            .outerjoin(replicas, held)
        )
        .order_by(files.c.id)
    )


_MAX_FILE_ID = select(func.coalesce(func.max(files.c.id), 0))
_MISSING_REPLICAS = _files_page(_LIVE, ~_GOOD_COPY_ON_SERVER, good_only=True)
_HELD_FILES = _files_page(_LIVE, _GOOD_COPY_ON_SERVER, good_only=True)
_DELETED_FILES = _files_page(_DELETED, _HELD_BY_SERVER | ~_HELD_BY_COUNTED, good_only=False)
_FORGET_DEAD_COPIES = sql_delete(replicas).where(
    replicas.c.file_id == bindparam("b_file_id"),
    replicas.c.server.in_(_DEAD_SERVERS),
    replicas.c.file_id.in_(
        select(files.c.id).where(files.c.id == bindparam("b_file_id"), _DELETED)
    ),
)
_PURGE_FILE = sql_delete(files).where(files.c.id == bindparam("b_file_id"), _DELETED, ~_HELD_AT_ALL)


def _grouped(rows: list[tuple]) -> list[FileInfo]:
    """
    The files of L{_files_page}'s rows, each with its servers, sorted.
    """
    found: dict[int, tuple[tuple, list[str]]] = {}
    width = len(_LOOKUP_COLUMNS)
    for row in rows:
        _, servers_of = found.setdefault(row[0], (row[: width + 1], []))
        if row[width + 1] is not None:
            servers_of.append(row[width + 1])
    infos = []
    keys = [column.key for column in _LOOKUP_COLUMNS]
    for columns, servers_of in found.values():
        values = dict(zip(keys, columns[:width], strict=True))
        infos.append(
            FileInfo(namespace=columns[width], replicas=tuple(sorted(servers_of)), **values)
        )
    return infos


@reader
def max_file_id() -> Unit[int]:
    """
    The highest id of a stored file, live or deleted; 0 when there is none.
    """
    out = yield Query(_MAX_FILE_ID)
    return int(out.rows[0][0])


@reader
def missing_replicas(server: str, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} live files with ids above C{after} of which C{server}
    holds no good copy, by id, each with the servers that do: what the
    replicator of C{server} is to copy.  Ids are never reused, so a cursor
    over them visits each file once.
    """
    out = yield Query(_MISSING_REPLICAS, {"b_server": server, "b_after": after, "b_limit": limit})
    return _grouped(out.rows)


@reader
def held_files(server: str, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} live files with ids above C{after} of which C{server}
    holds a good copy, by id, each with the servers that do: what the
    scrubber of C{server} re-reads.
    """
    out = yield Query(_HELD_FILES, {"b_server": server, "b_after": after, "b_limit": limit})
    return _grouped(out.rows)


@reader
def deleted_files(server: str, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} deleted files with ids above C{after}, by id, that
    C{server} holds a copy of or that no server but dead ones does, each
    with the servers holding one: what the replicator of C{server} is to
    reclaim.
    """
    out = yield Query(_DELETED_FILES, {"b_server": server, "b_after": after, "b_limit": limit})
    return _grouped(out.rows)


@writer
def purge_file(file_id: int) -> Unit[bool]:
    """
    Forget deleted file C{file_id} once no server holds a copy; return
    whether it was forgotten.  A copy recorded meanwhile by a replicator
    that had not heard of the delete keeps the row (the foreign key makes
    a race fail, and the driver's retry sees the copy), for that server's
    replicator to reclaim.  Copies on dead servers are forgotten first:
    nobody will reclaim them.
    """
    yield Query(_FORGET_DEAD_COPIES, {"b_file_id": file_id})
    out = yield Query(_PURGE_FILE, {"b_file_id": file_id})
    return out.rowcount > 0


# -- client keys (koboldfs.auth)

_KEY_COLUMNS = (
    namespaces.c.name,
    client_keys.c.key_id,
    client_keys.c.stored_key,
    client_keys.c.readonly,
    client_keys.c.created,
)
_KEYS_OF = select(*_KEY_COLUMNS).join_from(
    client_keys, namespaces, client_keys.c.namespace_id == namespaces.c.id
)
_FIND_KEY = _KEYS_OF.where(
    namespaces.c.name == bindparam("b_name"), client_keys.c.key_id == bindparam("b_key_id")
)
_NAMESPACE_KEYS = _KEYS_OF.where(namespaces.c.name == bindparam("b_name")).order_by(
    client_keys.c.created, client_keys.c.key_id
)
_INSERT_KEY = insert(client_keys).values(
    key_id=bindparam("b_key_id"),
    namespace_id=bindparam("b_namespace_id"),
    stored_key=bindparam("b_stored_key"),
    readonly=bindparam("b_readonly"),
    created=bindparam("b_now"),
)
_DELETE_KEY = sql_delete(client_keys).where(
    client_keys.c.key_id == bindparam("b_key_id"),
    client_keys.c.namespace_id.in_(
        select(namespaces.c.id).where(namespaces.c.name == bindparam("b_name"))
    ),
)


def _key(row: tuple) -> KeyInfo:
    name, key_id, stored_key, readonly, created = row
    return KeyInfo(name, key_id, stored_key, bool(readonly), created)


@writer
def add_key(
    namespace: str, key_id: str, stored_key: str, readonly: bool, now: float
) -> Unit[KeyInfo]:
    """
    Record a key of C{namespace} (created at C{now} if missing), by the
    stored form L{koboldfs.auth.new_key} made.
    """
    ns = yield from ensure_namespace(namespace, now)
    yield Query(
        _INSERT_KEY,
        {
            "b_key_id": key_id,
            "b_namespace_id": ns.id,
            "b_stored_key": stored_key,
            "b_readonly": readonly,
            "b_now": now,
        },
    )
    return KeyInfo(namespace, key_id, stored_key, readonly, now)


@reader
def find_key(namespace: str, key_id: str) -> Unit[KeyInfo | None]:
    """
    Key C{key_id} of C{namespace}, or None.
    """
    out = yield Query(_FIND_KEY, {"b_name": namespace, "b_key_id": key_id})
    return _key(out.rows[0]) if out.rows else None


@reader
def namespace_keys(namespace: str) -> Unit[list[KeyInfo]]:
    """
    The keys of C{namespace}, oldest first.
    """
    out = yield Query(_NAMESPACE_KEYS, {"b_name": namespace})
    return [_key(row) for row in out.rows]


@writer
def revoke_key(namespace: str, key_id: str) -> Unit[bool]:
    """
    Forget key C{key_id} of C{namespace}; return whether it existed.
    """
    out = yield Query(_DELETE_KEY, {"b_name": namespace, "b_key_id": key_id})
    return out.rowcount > 0
