"""
The cluster's health as the metadata sees it, for operators: C{koboldfs
admin status} and C{fsck}, and the servers' status pages.  Written as
units (L{koboldfs.metadata.units}), and run by every store the same
way.

The counts are kept by triggers with the rows (schema.file_counts) and the
short files are found through the replication queue, so reading them costs
the same at any number of files; C{live_files} walks every file, in pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, case, func, select

from koboldfs.interfaces import FileInfo, ServerState
from koboldfs.metadata.files import LIVE
from koboldfs.metadata.schema import (
    ANY_GOOD,
    GOOD_COUNTED,
    WANTED,
    copy_queue,
    file_counts,
    files,
    namespaces,
    servers,
)
from koboldfs.metadata.sweeps import files_page, grouped
from koboldfs.metadata.units import Query, Unit, reader


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
    @ivar queued: files in the replication queue (that may be short).
    """

    files: int = 0
    bytes: int = 0
    under_replicated: int = 0
    missing_copies: int = 0
    lost: int = 0
    deleted: int = 0
    quarantined: int = 0
    oldest_short: float | None = None
    queued: int = 0


# Each queued live file's wanted and good copies (the queue holds every
# file short for a reason other than a server joining: see health), so
# these cost in proportion to the queue, not to the files.
_PER_FILE = (
    select(
        files.c.namespace_id.label("namespace_id"),
        files.c.created.label("created"),
        WANTED.label("wanted"),
        GOOD_COUNTED.label("good"),
        ANY_GOOD.label("any_good"),
    )
    .select_from(
        copy_queue.join(files, files.c.id == copy_queue.c.file_id).join(
            namespaces, namespaces.c.id == files.c.namespace_id
        )
    )
    .where(LIVE)
    # Keeps SQLite from flattening the subquery back into the aggregate
    # (it renders as LIMIT -1 OFFSET 0 there; an optimisation fence on
    # PostgreSQL too).
    .offset(0)
    .subquery("per_file")
)
_SHORT = _PER_FILE.c.good < _PER_FILE.c.wanted
_QUEUE_TOTALS = select(
    _PER_FILE.c.namespace_id,
    func.count(),
    func.coalesce(func.sum(case((_SHORT, 1), else_=0)), 0),
    func.coalesce(func.sum(case((_SHORT, _PER_FILE.c.wanted - _PER_FILE.c.good), else_=0)), 0),
    func.coalesce(func.sum(case((_PER_FILE.c.any_good == 0, 1), else_=0)), 0),
    func.min(case((_SHORT, _PER_FILE.c.created), else_=None)),
).group_by(_PER_FILE.c.namespace_id)
# A few hundred rows: namespaces x (servers + 1) x stripes.
_COUNTS = select(
    file_counts.c.namespace_id,
    file_counts.c.server,
    func.sum(file_counts.c.files),
    func.sum(file_counts.c.bytes),
    func.sum(file_counts.c.deleted),
    func.sum(file_counts.c.quarantined),
).group_by(file_counts.c.namespace_id, file_counts.c.server)
_NAMESPACE_COUNTS = select(namespaces.c.id, namespaces.c.replicas)
_ALIVE_NAMES = select(servers.c.name).where(servers.c.state == ServerState.ALIVE.value)
_NAMESPACE_IS = files.c.namespace_id == (
    select(namespaces.c.id).where(namespaces.c.name == bindparam("b_namespace")).scalar_subquery()
)
_LIVE_FILES = files_page(LIVE, good_only=True)
_LIVE_FILES_IN = files_page(LIVE, _NAMESPACE_IS, good_only=True)
_FILES_HELD = (
    select(file_counts.c.server, func.sum(file_counts.c.files))
    .where(file_counts.c.server != "")
    .group_by(file_counts.c.server)
)


@reader
def health() -> Unit[Health]:
    """
    The counts of L{Health}, in one database transaction, without reading
    the files: their counts are the triggers' (schema.file_counts), and
    the files short of copies are found in the replication queue.

    The queue holds every file that a change made short, but not those
    that are short because a server joined (or came back) and lacks
    them, in a namespace that wants a copy on every alive server: for
    those, each alive server's shortfall, from the counts (its good
    copies against the namespace's files), is a floor (exact while one
    server at a time catches up).  Its backfill copies them.
    """
    out = yield Query(_ALIVE_NAMES)
    alive = {name for (name,) in out.rows}
    out = yield Query(_NAMESPACE_COUNTS)
    wanted = dict(out.rows)
    out = yield Query(_COUNTS)
    count = size = deleted = quarantined = 0
    held: dict[int, dict[str, int]] = {}
    in_namespace: dict[int, int] = {}
    for namespace_id, server, n, b, d, q in out.rows:
        if server == "":
            count, size, deleted = count + int(n), size + int(b), deleted + int(d)
            in_namespace[namespace_id] = int(n)
        else:
            held.setdefault(namespace_id, {})[server] = int(n)
            quarantined += int(q)
    out = yield Query(_QUEUE_TOTALS)
    queued = short = missing = lost = 0
    oldest: float | None = None
    queue = {row[0]: row[1:] for row in out.rows}
    for namespace_id in set(queue) | set(in_namespace):
        n_queued, n_short, n_missing, n_lost, first = queue.get(namespace_id, (0, 0, 0, 0, None))
        queued, lost = queued + int(n_queued), lost + int(n_lost)
        if first is not None:
            oldest = float(first) if oldest is None else min(oldest, float(first))
        if wanted.get(namespace_id, 0) is None and alive:
            lacking = [
                max(0, in_namespace.get(namespace_id, 0) - held.get(namespace_id, {}).get(s, 0))
                for s in alive
            ]
            n_short, n_missing = max(int(n_short), max(lacking)), max(int(n_missing), sum(lacking))
        short, missing = short + int(n_short), missing + int(n_missing)
    return Health(count, size, short, missing, lost, deleted, quarantined, oldest, queued)


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
    servers holding none are left out.  From the counts (a few hundred
    rows), not the replicas.
    """
    out = yield Query(_FILES_HELD)
    return {server: int(count) for server, count in out.rows if count}
