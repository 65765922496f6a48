"""
The background sweeps' work lists: what a server's replicator is to copy
and to reclaim, and what its scrubber re-reads, in pages of files by id
(L{koboldfs.replicator}).  They only read: what the sweeps then change
(copies made, reclaimed, files purged) is recorded by the units of
L{koboldfs.metadata.files}.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, bindparam, func, select

from koboldfs.interfaces import FileInfo
from koboldfs.metadata.files import DELETED, FILE_COLUMNS, LIVE
from koboldfs.metadata.schema import GOOD, copy_queue, files, namespaces, replicas
from koboldfs.metadata.servers import DEAD_SERVERS
from koboldfs.metadata.units import Query, Unit, reader

# Every page is bounded on both tables, so that it costs the same at any
# number of files whatever plan the planner picks: its ids come from one
# index range (files after the cursor, or the server's own replica rows,
# or the queue), and the replica rows it looks at are bounded to the same
# range (without the bound, a merge join reads the server's replica rows
# from the first one at every page).
_AFTER: Any = bindparam("b_after")
_UPTO: Any = bindparam("b_upto")
_IN_RANGE = replicas.c.file_id > _AFTER


def _copy_of(server_is: Any, *conditions: Any) -> Any:
    return (
        select(replicas.c.file_id)
        .where(replicas.c.file_id == files.c.id, _IN_RANGE, server_is, *conditions)
        .exists()
    )


_ON_SERVER = replicas.c.server == bindparam("b_server")
_GOOD_COPY_ON_SERVER = _copy_of(_ON_SERVER, GOOD)
_HELD_BY_SERVER = _copy_of(_ON_SERVER)
_HELD_BY_COUNTED = _copy_of(replicas.c.server.not_in(DEAD_SERVERS))


def page_rows(page: Any, good_only: bool) -> Select[Any]:
    """
    The files of C{page} (a subquery of ids, C{page.c.id}), by id, each
    joined with its replicas' servers (good copies only if C{good_only};
    a file with none has one row, with a NULL server).
    """
    held = replicas.c.file_id == files.c.id
    if good_only:
        held = held & (replicas.c.state == "ok")
    return (
        select(*FILE_COLUMNS, namespaces.c.name, replicas.c.server)
        .select_from(
            page.join(files, files.c.id == page.c.id)
            .join(namespaces, namespaces.c.id == files.c.namespace_id)
            .outerjoin(replicas, held)
        )
        .order_by(files.c.id)
    )


def files_page(*conditions: Any, good_only: bool) -> Select[Any]:
    """
    The files after id C{b_after} that meet C{conditions}, up to C{b_limit}
    of them by id, with their servers (L{page_rows}).  The page is chosen
    first so that its limit counts files, not replicas.
    """
    page = (
        select(files.c.id)
        .where(files.c.id > _AFTER, *conditions)
        .order_by(files.c.id)
        .limit(bindparam("b_limit"))
        .subquery("page")
    )
    return page_rows(page, good_only)


_MAX_FILE_ID = select(func.coalesce(func.max(files.c.id), 0))
# The end of the server's (server, file_id) index range: one index probe.
_MAX_HELD = select(func.coalesce(func.max(replicas.c.file_id), 0)).where(_ON_SERVER, GOOD)
_MISSING = (LIVE, ~_GOOD_COPY_ON_SERVER)
_MISSING_REPLICAS = files_page(*_MISSING, good_only=True)
_MISSING_REPLICAS_UPTO = files_page(
    LIVE,
    files.c.id <= _UPTO,
    ~_copy_of(_ON_SERVER, GOOD, replicas.c.file_id <= _UPTO),
    good_only=True,
)
# The scrub's page: driven from the server's own replica rows (its index
# on (server, file_id)), files looked up by id.
_HELD_PAGE = (
    select(replicas.c.file_id.label("id"))
    .select_from(replicas.join(files, files.c.id == replicas.c.file_id))
    .where(_ON_SERVER, GOOD, _IN_RANGE, files.c.id > _AFTER, LIVE)
    .order_by(replicas.c.file_id)
    .limit(bindparam("b_limit"))
    .subquery("page")
)
_HELD_FILES = page_rows(_HELD_PAGE, good_only=True)
_DELETED_FILES = files_page(DELETED, _HELD_BY_SERVER | ~_HELD_BY_COUNTED, good_only=False)
# The replication queue's page: queued live files the server has no good
# copy of, by id.
_QUEUE_PAGE = (
    select(copy_queue.c.file_id.label("id"))
    .select_from(copy_queue.join(files, files.c.id == copy_queue.c.file_id))
    .where(copy_queue.c.file_id > _AFTER, LIVE, ~_GOOD_COPY_ON_SERVER)
    .order_by(copy_queue.c.file_id)
    .limit(bindparam("b_limit"))
    .subquery("page")
)
_QUEUED_FILES = page_rows(_QUEUE_PAGE, good_only=True)


def grouped(rows: list[tuple]) -> list[FileInfo]:
    """
    The files of L{files_page}'s rows, each with its servers, sorted.
    """
    found: dict[int, tuple[tuple, list[str]]] = {}
    width = len(FILE_COLUMNS)
    for row in rows:
        _, servers_of = found.setdefault(row[0], (row[: width + 1], []))
        if row[width + 1] is not None:
            servers_of.append(row[width + 1])
    infos = []
    keys = [column.key for column in FILE_COLUMNS]
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
def max_held(server: str) -> Unit[int]:
    """
    The highest id of a file C{server} has a good copy of; 0 when none:
    where its walk of ids resumes after a restart (a backfill copies in id
    order; what it lacks below is queued, or found by the next full walk).
    """
    out = yield Query(_MAX_HELD, {"b_server": server})
    return int(out.rows[0][0])


@reader
def missing_replicas(
    server: str, after: int, limit: int, upto: int | None = None
) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} live files with ids above C{after} (and at most
    C{upto}, if given) of which C{server} holds no good copy, by id, each
    with the servers that do: what the replicator of C{server} walks to
    find what it lacks (a new server's backfill).  Ids are never reused,
    so a cursor over them visits each file once.  Bounded by C{upto}, a
    page costs at most the ids in its window when there is little to find.
    """
    params = {"b_server": server, "b_after": after, "b_limit": limit}
    if upto is None:
        out = yield Query(_MISSING_REPLICAS, params)
    else:
        out = yield Query(_MISSING_REPLICAS_UPTO, {**params, "b_upto": upto})
    return grouped(out.rows)


@reader
def queued_files(server: str, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} files of the replication queue (live files that may be
    short of copies) with ids above C{after}, of which C{server} holds no
    good copy, by id, each with the servers that do.
    """
    out = yield Query(_QUEUED_FILES, {"b_server": server, "b_after": after, "b_limit": limit})
    return grouped(out.rows)


@reader
def held_files(server: str, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} live files with ids above C{after} of which C{server}
    holds a good copy, by id, each with the servers that do: what the
    scrubber of C{server} re-reads.
    """
    out = yield Query(_HELD_FILES, {"b_server": server, "b_after": after, "b_limit": limit})
    return grouped(out.rows)


@reader
def deleted_files(server: str, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} deleted files with ids above C{after}, by id, that
    C{server} holds a copy of or that no server but dead ones does, each
    with the servers holding one: what the replicator of C{server} is to
    reclaim.
    """
    out = yield Query(_DELETED_FILES, {"b_server": server, "b_after": after, "b_limit": limit})
    return grouped(out.rows)
