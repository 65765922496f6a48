"""
The cluster's health as the metadata sees it, for operators: C{koboldfs
admin status} and C{fsck}, and the servers' status pages.  Written as
units (L{koboldfs.metadata.units}), and run by every store the same
way.

These count over every live file: for an operator's look (or a status page
that caches them), never for a request's path.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, case, func, literal_column, or_, select

from koboldfs.interfaces import FileInfo, ServerState
from koboldfs.metadata.files import LIVE
from koboldfs.metadata.schema import files, namespaces, replicas, servers
from koboldfs.metadata.sweeps import files_page, grouped
from koboldfs.metadata.units import Query, Unit, reader
from koboldfs.placement import COUNTED_STATES

#: Server states whose copies count towards a namespace's replica count.
_COUNTED = COUNTED_STATES


@dataclass(frozen=True)
class Health:
    """
    Counts over the whole metadata.

    @ivar files: live files; C{bytes} their total size.
    @ivar under_replicated: live files with fewer good copies on counted
        servers (alive or readonly) than their namespace wants (all alive
        servers when it sets no count); C{missing_copies} the copies they
        lack in all; C{lost} those with no good copy anywhere;
        C{oldest_short} when the oldest short one was created (None if
        none is): how far replication lags.
    @ivar deleted: deleted files whose copies are still to be reclaimed.
    @ivar quarantined: copies found bad or missing and set aside, not yet
        made again.
    """

    files: int = 0
    bytes: int = 0
    under_replicated: int = 0
    missing_copies: int = 0
    lost: int = 0
    deleted: int = 0
    quarantined: int = 0
    oldest_short: float | None = None


_GOOD = (
    select(func.count())
    .select_from(replicas.join(servers, servers.c.name == replicas.c.server))
    .where(
        replicas.c.file_id == files.c.id,
        replicas.c.state == literal_column("'ok'"),
        # Literals: the PostgreSQL driver takes no expanding IN parameter.
        or_(*(servers.c.state == literal_column(f"'{state}'") for state in _COUNTED)),
    )
    .scalar_subquery()
)
_ANY_GOOD = (
    select(func.count())
    .select_from(replicas)
    .where(replicas.c.file_id == files.c.id, replicas.c.state == literal_column("'ok'"))
    .scalar_subquery()
)
# Each live file's wanted and good copies, computed once per file; the
# totals are taken over this (a correlated subquery named three times in
# the aggregate would run three times per file).
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
    # Keeps SQLite from flattening the subquery back into the aggregate
    # (it renders as LIMIT -1 OFFSET 0 there; an optimisation fence on
    # PostgreSQL too).
    .offset(0)
    .subquery("per_file")
)
_SHORT = _PER_FILE.c.good < _PER_FILE.c.wanted
_ALIVE_SERVERS = (
    select(func.count()).select_from(servers).where(servers.c.state == ServerState.ALIVE.value)
)
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
_NAMESPACE_IS = files.c.namespace_id == (
    select(namespaces.c.id).where(namespaces.c.name == bindparam("b_namespace")).scalar_subquery()
)
_LIVE_FILES = files_page(LIVE, good_only=True)
_LIVE_FILES_IN = files_page(LIVE, _NAMESPACE_IS, good_only=True)
_FILES_HELD = (
    select(replicas.c.server, func.count())
    .select_from(replicas.join(files, files.c.id == replicas.c.file_id))
    .where(replicas.c.state == "ok", LIVE)
    .group_by(replicas.c.server)
)


@reader
def health() -> Unit[Health]:
    """
    The counts of L{Health}, in one database transaction.
    """
    out = yield Query(_ALIVE_SERVERS)
    alive = out.rows[0][0]
    out = yield Query(_LIVE_TOTALS, {"b_alive": alive})
    *counts, oldest = out.rows[0]
    count, size, short, missing, lost = (int(v or 0) for v in counts)
    out = yield Query(_DELETED_COUNT)
    deleted = out.rows[0][0]
    out = yield Query(_QUARANTINED_COUNT)
    quarantined = out.rows[0][0]
    oldest = None if oldest is None else float(oldest)
    return Health(count, size, short, missing, lost, deleted, quarantined, oldest)


@reader
def live_files(namespace: str | None, after: int, limit: int) -> Unit[list[FileInfo]]:
    """
    Up to C{limit} live files with ids above C{after} (of C{namespace}
    only, unless None), by id, each with the servers holding a good copy:
    what C{fsck} walks.
    """
    params = {"b_after": after, "b_limit": limit}
    if namespace is None:
        out = yield Query(_LIVE_FILES, params)
    else:
        out = yield Query(_LIVE_FILES_IN, {**params, "b_namespace": namespace})
    return grouped(out.rows)


@reader
def files_held() -> Unit[dict[str, int]]:
    """
    How many live files each server holds a good copy of, by server name;
    servers holding none are left out.  One pass over the replicas: for an
    operator's listing, not for a hot path.
    """
    out = yield Query(_FILES_HELD)
    return {server: count for server, count in out.rows}
