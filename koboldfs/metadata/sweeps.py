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
from koboldfs.metadata.schema import files, namespaces, replicas
from koboldfs.metadata.servers import DEAD_SERVERS
from koboldfs.metadata.units import Query, Unit, reader

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
_HELD_BY_COUNTED = (
    select(replicas.c.file_id)
    .where(replicas.c.file_id == files.c.id, replicas.c.server.not_in(DEAD_SERVERS))
    .exists()
)


def files_page(*conditions: Any, good_only: bool) -> Select[Any]:
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
        select(*FILE_COLUMNS, namespaces.c.name, replicas.c.server)
        .select_from(
            page.join(files, files.c.id == page.c.id)
            .join(namespaces, namespaces.c.id == files.c.namespace_id)
            .outerjoin(replicas, held)
        )
        .order_by(files.c.id)
    )


_MAX_FILE_ID = select(func.coalesce(func.max(files.c.id), 0))
_MISSING_REPLICAS = files_page(LIVE, ~_GOOD_COPY_ON_SERVER, good_only=True)
_HELD_FILES = files_page(LIVE, _GOOD_COPY_ON_SERVER, good_only=True)
_DELETED_FILES = files_page(DELETED, _HELD_BY_SERVER | ~_HELD_BY_COUNTED, good_only=False)


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
def missing_replicas(server: str, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} live files with ids above C{after} of which C{server}
    holds no good copy, by id, each with the servers that do: what the
    replicator of C{server} is to copy.  Ids are never reused, so a cursor
    over them visits each file once.
    """
    out = yield Query(_MISSING_REPLICAS, {"b_server": server, "b_after": after, "b_limit": limit})
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
