"""
The background queries as they were before issue 17 (commit 82a38e1 of
main), kept verbatim so that benchmarks/scale.py measures them beside the
current ones in the same run, on the same database: the "before" column.
Nothing in koboldfs uses this module.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, bindparam, case, func, literal_column, or_, select

from koboldfs.metadata.files import DELETED, FILE_COLUMNS, LIVE
from koboldfs.metadata.schema import files, namespaces, replicas, servers
from koboldfs.metadata.servers import DEAD_SERVERS
from koboldfs.metadata.units import Query, Unit, reader
from koboldfs.placement import COUNTED_STATES

_GOOD = (
    select(func.count())
    .select_from(replicas.join(servers, servers.c.name == replicas.c.server))
    .where(
        replicas.c.file_id == files.c.id,
        replicas.c.state == literal_column("'ok'"),
        or_(*(servers.c.state == literal_column(f"'{state}'") for state in COUNTED_STATES)),
    )
    .scalar_subquery()
)
_ANY_GOOD = (
    select(func.count())
    .select_from(replicas)
    .where(replicas.c.file_id == files.c.id, replicas.c.state == literal_column("'ok'"))
    .scalar_subquery()
)
_PER_FILE = (
    select(
        files.c.size.label("size"),
        files.c.created.label("created"),
        func.coalesce(namespaces.c.replicas, bindparam("b_alive")).label("wanted"),
        _GOOD.label("good"),
        _ANY_GOOD.label("any_good"),
    )
    .select_from(files.join(namespaces, namespaces.c.id == files.c.namespace_id))
    .where(LIVE)
    .offset(0)
    .subquery("per_file")
)
_SHORT = _PER_FILE.c.good < _PER_FILE.c.wanted
_ALIVE_SERVERS = select(func.count()).select_from(servers).where(servers.c.state == "alive")
_LIVE_TOTALS = select(
    func.count(),
    func.coalesce(func.sum(_PER_FILE.c.size), 0),
    func.coalesce(func.sum(case((_SHORT, 1), else_=0)), 0),
    func.coalesce(func.sum(case((_SHORT, _PER_FILE.c.wanted - _PER_FILE.c.good), else_=0)), 0),
    func.coalesce(func.sum(case((_PER_FILE.c.any_good == 0, 1), else_=0)), 0),
    func.min(case((_SHORT, _PER_FILE.c.created), else_=None)),
)
_DELETED_COUNT = (
    select(func.count()).select_from(files).where(files.c.state == literal_column("'deleted'"))
)
_QUARANTINED_COUNT = (
    select(func.count())
    .select_from(replicas)
    .where(replicas.c.state == literal_column("'quarantined'"))
)
_FILES_HELD = (
    select(replicas.c.server, func.count())
    .select_from(replicas.join(files, files.c.id == replicas.c.file_id))
    .where(replicas.c.state == "ok", LIVE)
    .group_by(replicas.c.server)
)

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


def _files_page(*conditions: Any, good_only: bool) -> Select[Any]:
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


_MISSING_REPLICAS = _files_page(LIVE, ~_GOOD_COPY_ON_SERVER, good_only=True)
_HELD_FILES = _files_page(LIVE, _GOOD_COPY_ON_SERVER, good_only=True)
_DELETED_FILES = _files_page(DELETED, _HELD_BY_SERVER | ~_HELD_BY_COUNTED, good_only=False)


@reader
def health() -> Unit[tuple]:
    out = yield Query(_ALIVE_SERVERS)
    alive = out.rows[0][0]
    out = yield Query(_LIVE_TOTALS, {"b_alive": alive})
    totals = out.rows[0]
    out = yield Query(_DELETED_COUNT)
    deleted = out.rows[0][0]
    out = yield Query(_QUARANTINED_COUNT)
    return (*totals, deleted, out.rows[0][0])


@reader
def files_held() -> Unit[dict[str, int]]:
    out = yield Query(_FILES_HELD)
    return {server: count for server, count in out.rows}


def _page(statement: Any) -> Any:
    @reader
    def page(server: str, after: int, limit: int) -> Unit[list[tuple]]:
        out = yield Query(statement, {"b_server": server, "b_after": after, "b_limit": limit})
        return out.rows

    return page


missing_replicas = _page(_MISSING_REPLICAS)
held_files = _page(_HELD_FILES)
deleted_files = _page(_DELETED_FILES)
