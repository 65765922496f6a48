"""
Files and their replicas: the request path's lookups and listings, and
every change to the rows of tables C{files} and C{replicas}.

The units and steps here are the only code that writes those two tables
(client transactions too write them through the steps L{new_file},
L{retire}, L{discard_pending} and L{forget_file}), so that anything to be
kept with the rows in the same database transaction (a work queue, a
counter) is written in one place.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Callable, Iterable, Mapping

from sqlalchemy import Select, and_, bindparam, insert, literal_column, or_, select, update
from sqlalchemy import delete as sql_delete

from koboldfs.errors import PreconditionFailed
from koboldfs.interfaces import NO_EXTRAS, Extras, FileInfo, NamespaceInfo, etag
from koboldfs.metadata.namespaces import NAMESPACE_COLUMNS, ensure_namespace, get_namespace
from koboldfs.metadata.schema import (
    QUEUE_ALL_SERVER_FILES,
    QUEUED,
    SHORT,
    copy_queue,
    files,
    namespaces,
    replicas,
)
from koboldfs.metadata.servers import DEAD_SERVERS
from koboldfs.metadata.units import Query, Unit, reader, record, writer
from koboldfs.names import key_upper_bound

# A literal, not a bound parameter: the partial index files_live_key serves
# a query only when the planner sees that the query's condition implies the
# index's, which a parameter can hide (PostgreSQL's generic plans).
LIVE = files.c.state == literal_column("'live'")
DELETED = files.c.state == "deleted"

FILE_COLUMNS = (
    files.c.id,
    files.c.fid,
    files.c.key,
    files.c.size,
    files.c.sha256,
    files.c.created,
    files.c.path,
    files.c.md5,
    files.c.parts,
    files.c.part_size,
    files.c.attributes,
)

_LIVE_KEY = (
    files.c.namespace_id == bindparam("b_namespace_id"),
    files.c.key == bindparam("b_key"),
    LIVE,
)
_RETIRE = (
    update(files)
    .where(*_LIVE_KEY)
    .values(state="deleted", deleted=bindparam("b_now"))
    .returning(files.c.id)
)
FIND_LIVE = select(files.c.id).where(*_LIVE_KEY)
# Locked until commit on PostgreSQL (SQLite runs one writer at a time): a
# conditional write checks the version it then retires.
_LOCK_LIVE = (
    select(files.c.sha256, files.c.md5, files.c.parts).where(*_LIVE_KEY).with_for_update()
)


def _insert_file(state: str) -> Any:
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
            md5=bindparam("b_md5"),
            parts=bindparam("b_parts"),
            part_size=bindparam("b_part_size"),
            attributes=bindparam("b_attributes", type_=files.c.attributes.type),
        )
        .returning(files.c.id)
    )


_INSERT_FILE = {state: _insert_file(state) for state in ("live", "pending", "part")}
_INSERT_REPLICA = insert(replicas).values(
    file_id=bindparam("b_file_id"),
    server=bindparam("b_server"),
    state="ok",
    created=bindparam("b_now"),
)
GOOD_REPLICAS = select(replicas.c.server).where(
    replicas.c.file_id == bindparam("b_file_id"), replicas.c.state == "ok"
)
_LOOKUP_KEY = (
    select(*FILE_COLUMNS, replicas.c.server)
    .join_from(files, namespaces, files.c.namespace_id == namespaces.c.id)
    .outerjoin(replicas, (replicas.c.file_id == files.c.id) & (replicas.c.state == "ok"))
    .where(namespaces.c.name == bindparam("b_namespace"), files.c.key == bindparam("b_key"), LIVE)
)
_FID_KNOWN = select(files.c.id).where(files.c.fid == bindparam("b_fid"))
_FILE_BY_FID = (
    select(*FILE_COLUMNS, *(c.label(f"ns_{c.key}") for c in NAMESPACE_COLUMNS))
    .join_from(files, namespaces, files.c.namespace_id == namespaces.c.id)
    .where(files.c.fid == bindparam("b_fid"), LIVE)
)
_STORED_FILE = (
    select(*FILE_COLUMNS, namespaces.c.name)
    .join_from(files, namespaces, files.c.namespace_id == namespaces.c.id)
    .where(
        files.c.fid == bindparam("b_fid"),
        or_(LIVE, files.c.state == literal_column("'part'")),
    )
)
_FILE_EXISTS = select(files.c.id).where(files.c.id == bindparam("b_file_id"))
_REPLICA = (
    replicas.c.file_id == bindparam("b_file_id"),
    replicas.c.server == bindparam("b_server"),
)
_MARK_REPLICA_OK = update(replicas).where(*_REPLICA).values(state="ok")
_DELETE_REPLICA = sql_delete(replicas).where(*_REPLICA)

_DISCARD_PENDING = (
    update(files)
    .where(files.c.id == bindparam("b_file_id"), files.c.state == "pending")
    .values(state="deleted", deleted=bindparam("b_now"))
)
_DISCARD_PART = (
    update(files)
    .where(files.c.id == bindparam("b_file_id"), files.c.state == "part")
    .values(state="deleted", deleted=bindparam("b_now"))
)
_FORGET_REPLICAS = sql_delete(replicas).where(replicas.c.file_id == bindparam("b_file_id"))
_FORGET_FILE = sql_delete(files).where(files.c.id == bindparam("b_file_id"))

_QUARANTINE = (
    update(replicas)
    .where(
        and_(
            replicas.c.file_id == bindparam("b_file_id"),
            replicas.c.server == bindparam("b_server"),
        )
    )
    .values(state="quarantined")
)
_QUARANTINE_SERVER = (
    update(replicas)
    .where(replicas.c.server == bindparam("b_server"), replicas.c.state == literal_column("'ok'"))
    .values(state="quarantined")
)

# The replication queue (schema.copy_queue), kept with the rows.
_THIS_FILE = files.c.id == bindparam("b_file_id")
_IN_NAMESPACE = files.join(namespaces, namespaces.c.id == files.c.namespace_id)
_QUEUE_IF_SHORT = insert(copy_queue).from_select(
    ["file_id"],
    select(files.c.id).select_from(_IN_NAMESPACE).where(_THIS_FILE, LIVE, SHORT, ~QUEUED),
)
_SETTLE = sql_delete(copy_queue).where(
    copy_queue.c.file_id == bindparam("b_file_id"),
    ~select(files.c.id).select_from(_IN_NAMESPACE).where(_THIS_FILE, LIVE, SHORT).exists(),
)
_UNQUEUE = sql_delete(copy_queue).where(copy_queue.c.file_id == bindparam("b_file_id"))

_HELD_AT_ALL = select(replicas.c.file_id).where(replicas.c.file_id == files.c.id).exists()
_FORGET_DEAD_COPIES = sql_delete(replicas).where(
    replicas.c.file_id == bindparam("b_file_id"),
    replicas.c.server.in_(DEAD_SERVERS),
    replicas.c.file_id.in_(select(files.c.id).where(files.c.id == bindparam("b_file_id"), DELETED)),
)
_UNQUEUE_DELETED = sql_delete(copy_queue).where(
    copy_queue.c.file_id.in_(select(files.c.id).where(_THIS_FILE, DELETED))
)
_PURGE_FILE = sql_delete(files).where(files.c.id == bindparam("b_file_id"), DELETED, ~_HELD_AT_ALL)


@cache
def _list_keys_query(prefix: bool, bound: bool, after: bool) -> Select[str]:
    """
    The query listing live keys of namespace C{b_namespace_id}, up to
    C{b_limit}, in order: from C{b_prefix} if C{prefix}, below C{b_bound}
    if C{bound}, after C{b_after} if C{after}.  Eight shapes at most.
    """
    conditions = [files.c.namespace_id == bindparam("b_namespace_id"), LIVE]
    if prefix:
        conditions.append(files.c.key >= bindparam("b_prefix"))
    if bound:
        conditions.append(files.c.key < bindparam("b_bound"))
    if after:
        conditions.append(files.c.key > bindparam("b_after"))
    return select(files.c.key).where(*conditions).order_by(files.c.key).limit(bindparam("b_limit"))


@cache
def _list_files_query(prefix: bool, bound: bool, after: bool) -> Select[Any]:
    """
    As L{_list_keys_query}, the files' columns instead of their keys.
    """
    keys = _list_keys_query(prefix, bound, after)
    return keys.with_only_columns(*FILE_COLUMNS)


def retire(namespace_id: int, key: str, now: float) -> Unit[int | None]:
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
        out = yield Query(FIND_LIVE, live)
        if not out.rows:
            return None


def new_file(
    state: str,
    namespace_id: int,
    key: str,
    fid: str,
    path: str,
    size: int,
    sha256: str,
    created: float,
    holders: Iterable[tuple[str, float]],
    md5: str | None = None,
    parts: int | None = None,
    part_size: int | None = None,
    attributes: Mapping[str, str] | None = None,
) -> Unit[int]:
    """
    A step: a new row for a file in C{state} (live, pending in a client
    transaction, or a part of a multipart upload), with a good copy on
    each of C{holders}, C{(server, since)} pairs; return its id.
    """
    out = yield Query(
        _INSERT_FILE[state],
        {
            "b_fid": fid,
            "b_namespace_id": namespace_id,
            "b_key": key,
            "b_size": size,
            "b_sha256": sha256,
            "b_now": created,
            "b_path": path,
            "b_md5": md5,
            "b_parts": parts,
            "b_part_size": part_size,
            "b_attributes": attributes,
        },
    )
    file_id: int = out.rows[0][0]
    for server, since in holders:
        yield Query(_INSERT_REPLICA, {"b_file_id": file_id, "b_server": server, "b_now": since})
    if state == "live":
        yield from queue_if_short(file_id)
    return file_id


def queue_if_short(file_id: int) -> Unit[None]:
    """
    A step: live file C{file_id} into the replication queue if it is short
    of copies (and not queued yet).  A concurrent writer queueing it too
    makes one of them fail on the key, and its driver retry.
    """
    yield Query(_QUEUE_IF_SHORT, {"b_file_id": file_id})


def discard_pending(file_id: int, now: float) -> Unit[None]:
    """
    A step: pending file C{file_id}, if it still is, deleted at C{now},
    for its bytes to be reclaimed like any deleted file's.
    """
    yield Query(_DISCARD_PENDING, {"b_file_id": file_id, "b_now": now})


def discard_part(file_id: int, now: float) -> Unit[None]:
    """
    A step: file C{file_id}, a part of a multipart upload that completed,
    was aborted or replaced, deleted at C{now}, for its bytes to be
    reclaimed by every holder's replicator like any deleted file's.
    """
    yield Query(_DISCARD_PART, {"b_file_id": file_id, "b_now": now})


def forget_file(file_id: int) -> Unit[None]:
    """
    A step: the rows of file C{file_id} and of its copies gone, as when a
    pending file is published again under a new id.
    """
    yield Query(_UNQUEUE, {"b_file_id": file_id})
    yield Query(_FORGET_REPLICAS, {"b_file_id": file_id})
    yield Query(_FORGET_FILE, {"b_file_id": file_id})



def check_condition(namespace_id: int, key: str, extras: Extras) -> Unit[None]:
    """
    A step: raise L{PreconditionFailed} unless C{extras}' condition holds
    for the live version of C{key}, which stays locked (PostgreSQL) until
    the unit ends, so that it is the one retired.  Two puts "if absent"
    at once collide on files_live_key, and the driver's retry of the
    loser fails here.
    """
    if not extras.if_absent and extras.if_match is None:
        return
    out = yield Query(_LOCK_LIVE, {"b_namespace_id": namespace_id, "b_key": key})
    live = etag(*out.rows[0]) if out.rows else None
    if extras.if_absent and live is not None:
        raise PreconditionFailed(f"{key!r} exists")
    if extras.if_match is not None and live != extras.if_match:
        raise PreconditionFailed(f"{key!r} is not version {extras.if_match}")


def publish(
    ns_id: int,
    namespace: str,
    key: str,
    fid: str,
    path: str,
    size: int,
    sha256: str,
    created: float,
    holders: tuple[str, ...],
    extras: Extras,
) -> Unit[FileInfo]:
    """
    A step: the new live version of C{key}, held by C{holders}, its
    condition checked and the previous version retired.
    """
    yield from check_condition(ns_id, key, extras)
    yield from retire(ns_id, key, created)
    file_id = yield from new_file(
        "live",
        ns_id,
        key,
        fid,
        path,
        size,
        sha256,
        created,
        ((name, created) for name in holders),
        md5=extras.md5,
        parts=extras.parts,
        part_size=extras.part_size,
        attributes=extras.attributes,
    )
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
        md5=extras.md5,
        parts=extras.parts,
        part_size=extras.part_size,
        attributes=extras.attributes,
    )


def holders_of(server: str, also: Iterable[str]) -> tuple[str, ...]:
    """
    C{server} and the other servers in C{also}, once each.
    """
    return (server, *(name for name in dict.fromkeys(also) if name != server))


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
    extras: Extras = NO_EXTRAS,
) -> Unit[FileInfo]:
    """
    Publish a new live version of C{key} held by C{server}, and by the
    servers C{also} (copies made while it was put: koboldfs.forwarding),
    with C{extras}, retiring the previous one.  Concurrent writers of one
    key queue on the live version's row lock (see L{retire}); the rare two
    that still collide on files_live_key are retried by the driver, so the
    last writer wins and all succeed (unless conditional:
    L{check_condition}).

    @raise PreconditionFailed: C{extras}' condition does not hold.
    """
    ns = yield from ensure_namespace(namespace, created)
    holders = holders_of(server, also)
    return (
        yield from publish(ns.id, namespace, key, fid, path, size, sha256, created, holders, extras)
    )


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
    width = len(FILE_COLUMNS)
    row = dict(zip((column.key for column in FILE_COLUMNS), out.rows[0][:width], strict=True))
    # Sorted here, not by the database, whose collation of server names
    # may differ between backends.
    held = sorted(r[width] for r in out.rows if r[width] is not None)
    return FileInfo(namespace=namespace, replicas=tuple(held), **row)


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
    ns = record(NamespaceInfo, NAMESPACE_COLUMNS, row[len(FILE_COLUMNS) :])
    columns = (column.key for column in FILE_COLUMNS)
    found = dict(zip(columns, row[: len(FILE_COLUMNS)], strict=True))
    held = yield Query(GOOD_REPLICAS, {"b_file_id": found["id"]})
    info = FileInfo(
        namespace=ns.name,
        replicas=tuple(sorted(server for (server,) in held.rows)),
        **found,
    )
    return info, ns


@reader
def stored_file(fid: str) -> Unit[FileInfo | None]:
    """
    The file stored as C{fid} if it is live or a part of a multipart
    upload, with the servers holding a good copy; else None.
    """
    out = yield Query(_STORED_FILE, {"b_fid": fid})
    if not out.rows:
        return None
    *row, namespace = out.rows[0]
    found = dict(zip((column.key for column in FILE_COLUMNS), row, strict=True))
    held = yield Query(GOOD_REPLICAS, {"b_file_id": found["id"]})
    servers = tuple(sorted(server for (server,) in held.rows))
    return FileInfo(namespace=namespace, replicas=servers, **found)


@writer
def delete(namespace: str, key: str, now: float) -> Unit[int | None]:
    """
    Mark the live version of C{key} deleted at C{now}; return its id, or
    None if there was none.
    """
    ns = yield from get_namespace(namespace)
    if ns is None:
        return None
    return (yield from retire(ns.id, key, now))


def _listed(
    shape: Callable[[bool, bool, bool], Select[Any]],
    namespace: str,
    prefix: str,
    after: str | None,
    limit: int,
) -> Unit[list[tuple]]:
    """
    A step: the rows of the listing query C{shape} makes (L{_list_keys_query},
    L{_list_files_query}) for these bounds.
    """
    ns = yield from get_namespace(namespace)
    if ns is None or limit <= 0:
        return []
    bound = key_upper_bound(prefix) if prefix else None
    params = {
        "b_namespace_id": ns.id,
        "b_prefix": prefix,
        "b_bound": bound,
        "b_after": after,
        "b_limit": limit,
    }
    out = yield Query(shape(bool(prefix), bound is not None, after is not None), params)
    return out.rows


@reader
def list_keys(namespace: str, prefix: str, after: str | None, limit: int) -> Unit[list[str]]:
    """
    Up to C{limit} live keys starting with C{prefix}, after C{after}, in
    code-point order: a range scan of files_live_key.
    """
    rows = yield from _listed(_list_keys_query, namespace, prefix, after, limit)
    return [key for (key,) in rows]


@reader
def list_files(namespace: str, prefix: str, after: str | None, limit: int) -> Unit[list[FileInfo]]:
    """
    As L{list_keys}, the live files (their replicas not asked for: empty).
    """
    rows = yield from _listed(_list_files_query, namespace, prefix, after, limit)
    names = [column.key for column in FILE_COLUMNS]
    return [FileInfo(namespace=namespace, **dict(zip(names, row, strict=True))) for row in rows]


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
    yield Query(_SETTLE, {"b_file_id": file_id})
    return True


@writer
def settle(file_id: int) -> Unit[None]:
    """
    Take file C{file_id} off the replication queue unless it is still a
    live file short of copies: a replicator found it had enough.
    """
    yield Query(_SETTLE, {"b_file_id": file_id})


@writer
def remove_replica(file_id: int, server: str) -> Unit[bool]:
    """
    Forget C{server}'s copy of file C{file_id}; return whether it had one.
    """
    out = yield Query(_DELETE_REPLICA, {"b_file_id": file_id, "b_server": server})
    if out.rowcount > 0:
        yield from queue_if_short(file_id)
    return out.rowcount > 0


@writer
def quarantine_replica(file_id: int, server: str) -> Unit[bool]:
    """
    Mark C{server}'s copy of file C{file_id} bad: it is no longer served
    nor counted, and its server's replicator makes it again (which marks
    it good).  Return whether there was such a copy.
    """
    out = yield Query(_QUARANTINE, {"b_file_id": file_id, "b_server": server})
    if out.rowcount > 0:
        yield from queue_if_short(file_id)
    return out.rowcount > 0


@writer
def quarantine_server(server: str) -> Unit[int]:
    """
    Mark every good copy on C{server} bad, as after its disk was lost:
    its replicator makes them all again.  Return how many there were.
    """
    # Queued while they are still its good copies (the index's).
    yield Query(QUEUE_ALL_SERVER_FILES, {"b_server": server})
    out = yield Query(_QUARANTINE_SERVER, {"b_server": server})
    return out.rowcount


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
    yield Query(_UNQUEUE_DELETED, {"b_file_id": file_id})
    out = yield Query(_PURGE_FILE, {"b_file_id": file_id})
    return out.rowcount > 0
