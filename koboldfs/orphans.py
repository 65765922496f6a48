"""
The orphan sweep: removes bytes that no metadata knows.

Two kinds are left behind by crashes and failures:

  - a stored file (C{files/...}, C{private/...}) that no file row names:
    the server crashed between renaming it into place and committing its
    row, or it is a peer's copy of a put that was never committed
    (L{koboldfs.forwarding}), or the row was purged while a copy was made;
  - a file in C{tmp/} that no upload of this process has open: an upload
    whose clean-up never ran.

A L{OrphanSweeper} looks at start and then every C{interval} seconds, and
only at files last modified more than C{grace} seconds ago: a put renames
its file moments before it commits it, so a file that old is not one
whose put is still in progress; an upload still open is skipped however
old.  A file whose row exists (live or deleted) is never touched here: a
deleted one is the replicator's to reclaim.  The metadata is asked a page
of fids at a time, so a sweep costs one indexed lookup per stored file;
that is why it runs rarely.

See docs/replication.md ("Orphans").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from koboldfs.periodic import Periodic
from koboldfs.storage import relpath_names

if TYPE_CHECKING:
    from koboldfs.interfaces import INode

log = Logger()

#: Seconds between sweeps after the first, at start.
INTERVAL = 6 * 3600.0
#: Files modified less than this many seconds ago are never orphans.
GRACE = 3600.0
#: Fids asked of the metadata at once.
BATCH = 100


class OrphanSweeper(Periodic):
    """
    One server's orphan sweep, as a service; see the module's docstring.

    @ivar removed: files removed since start, for a status page.
    """

    def __init__(
        self,
        node: INode,
        clock: Any,
        interval: float = INTERVAL,
        grace: float = GRACE,
        batch: int = BATCH,
    ) -> None:
        """
        @param clock: provides C{IReactorTime}; its C{seconds()} must be
            wall-clock time, since it is compared with files' mtimes.
        """
        super().__init__(f"orphan sweep on {node.name}", self._sweep, interval, clock, default=0)
        self._node = node
        self._clock = clock
        self._grace = grace
        self._batch = batch
        self._stopping = False
        self.removed = 0

    def startService(self) -> None:
        self._stopping = False
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """
        Start no more sweeps; fire once the one under way stops.
        """
        self._stopping = True
        return super().stopService()

    def sweep(self) -> Deferred[int]:
        """
        Sweep now (or join the sweep under way); fire with how many files
        it removed.  Never fails: errors are logged, and the next sweep
        tries again.
        """
        return self.run()

    async def _sweep(self) -> int:
        node = self._node
        storage = node.storage
        before = self._clock.seconds() - self._grace
        removed = await storage.remove_stale_tmp(before)
        for bucket in await storage.buckets():
            if self._stopping:
                break
            paths = await storage.old_files(bucket, before)
            for start in range(0, len(paths), self._batch):
                if self._stopping:
                    break
                page = [(relpath_names(p), p) for p in paths[start : start + self._batch]]
                known = await node.store.known_fids([fid for fid, _ in page])
                for fid, path in page:
                    if fid in known:
                        continue
                    if await storage.remove_if_older(path, before):
                        log.info(
                            "{name} removed orphan {path}: no file row names it",
                            name=node.name,
                            path=path,
                        )
                        removed += 1
        self.removed += removed
        return removed
