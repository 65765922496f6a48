"""
Replication: each server pulls the copies it lacks and reclaims the deleted
files it holds, by itself, so that a server that was down catches up when
it returns.

A L{Replicator} runs passes from a L{LoopingCall}, and at once when the
metadata store tells of a change (PostgreSQL tells of every server's; SQLite
only of this process's, and the loop covers the rest).  A pass costs in
proportion to the work waiting, not to the files stored:

  - B{reclaim}: deleted files this server holds a copy of lose it (bytes,
    then replica row), and a deleted file no server holds any more is
    purged from the metadata.  Deleted files are found by the index on
    (state, id), so only those waiting are read.
  - B{copy}: a cursor walks file ids (never reused) for live files this
    server has no good copy of; each is streamed from a live peer holding
    one, written durably and verified against its checksum, and only then
    recorded.  A copy that fails waits in a retry queue with exponential
    backoff.  A notification of a file below the cursor (PostgreSQL commits
    ids out of order) moves the cursor back; a full pass from the first id
    runs at start and every L{RESCAN} seconds, for whatever slipped by.

See docs/replication.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    ensureDeferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from koboldfs.errors import KoboldError
from koboldfs.interfaces import FileInfo, ServerInfo
from koboldfs.metadata import FILE_ADDED, SERVER_CHANGED

if TYPE_CHECKING:
    from koboldfs.service import Node
    from koboldfs.storage import Upload

log = Logger()

#: Files one pass takes from the cursor, and deleted files per query; a
#: full page calls for another pass at once, so a backlog drains at speed.
BATCH = 100
#: Copies running at once.
CONCURRENCY = 3
#: Longest wait before a failed copy is tried again, in seconds.
MAX_BACKOFF = 3600.0
#: Seconds between passes that walk every file id from the first.
RESCAN = 3600.0


class CopyFailed(KoboldError):
    """
    No live peer gave a good copy of a file.
    """


@dataclass
class Retry:
    """
    A file whose copy failed: when to try again, and how many times it
    failed in a row.
    """

    due: float
    failures: int


def _writer(upload: Upload) -> Callable[[bytes], Deferred[None] | None]:
    """
    A GET sink writing into C{upload}.  Flow control is the upload's (it
    pauses the connection while the disk lags); a refused write (a full
    disk) fails the download rather than raising inside the protocol.
    """

    def write(chunk: bytes) -> Deferred[None] | None:
        try:
            upload.write(chunk)
        except KoboldError as e:
            return fail(e)
        return None

    return write


class Replicator:
    """
    One server's replication loop.

    Not a child service: it must start after the server has registered
    (peers and the metadata must know it), so L{KoboldService
    <koboldfs.service.KoboldService>} calls L{start} and L{stop} itself.

    @ivar retries: failed copies by file id, waiting for their turn.
    """

    def __init__(
        self,
        node: Node,
        clock: Any,
        interval: float,
        batch: int = BATCH,
        concurrency: int = CONCURRENCY,
    ) -> None:
        """
        @param clock: provides C{IReactorTime}.
        @param interval: seconds between passes when nothing wakes it.
        """
        self._node = node
        self._clock = clock
        self._interval = interval
        self._batch = batch
        self._copies = DeferredSemaphore(concurrency)
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = clock
        self._cursor = 0
        self._rescanAt = clock.seconds() + RESCAN
        self.retries: dict[int, Retry] = {}
        self._busy = False
        self._again = False
        self._waiters: list[Deferred[None]] = []
        self._stopping = False
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        """
        Listen for changes and run a first pass now: a server that was down
        catches up at once.
        """
        self._stopping = False
        self._unsubscribe = self._node.store.subscribe(self._heard)
        self._loop.start(self._interval, now=True)

    def stop(self) -> Deferred[None]:
        """
        Start no more work; fire once the pass under way is over.  Closing
        the peer connections ends copies in progress sooner.
        """
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._loop.running:
            self._loop.stop()
        return self._whenIdle()

    def sweep(self) -> Deferred[None]:
        """
        Run a pass now, or right after the one under way; fire when passes
        are over.  Never fails: a pass logs its own errors, so that the
        loop goes on.
        """
        if self._busy:
            self._again = True
        elif not self._stopping:
            # Set before the pass starts: with a synchronous store (tests),
            # it may end before ensureDeferred returns.
            self._busy = True
            ensureDeferred(self._passes())
        return self._whenIdle()

    def _whenIdle(self) -> Deferred[None]:
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def _heard(self, event: str, payload: dict[str, Any]) -> None:
        """
        A metadata change: look at once.  A new file below the cursor (its
        transaction committed after a later id's) moves the cursor back; a
        server that (re)registered may hold what failed to copy before.
        """
        if event == FILE_ADDED and isinstance(payload.get("id"), int):
            self._cursor = min(self._cursor, payload["id"] - 1)
        elif event == SERVER_CHANGED:
            now = self._clock.seconds()
            for retry in self.retries.values():
                retry.due = min(retry.due, now)
        if self._loop.running:
            self.sweep()

    async def _passes(self) -> None:
        try:
            while True:
                self._again = False
                await self._pass()
                if not self._again or self._stopping:
                    break
        finally:
            self._busy = False
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    async def _pass(self) -> None:
        reclaimed = await self._guarded("reclaiming", self._reclaim)
        copied = 0 if self._node.readonly else await self._guarded("copying", self._replicate)
        if reclaimed or copied:
            log.info(
                "{name} copied {copied} files and reclaimed {reclaimed}",
                name=self._node.name,
                copied=copied,
                reclaimed=reclaimed,
            )

    async def _guarded(self, what: str, step: Callable[[], Awaitable[int]]) -> int:
        """
        Run one step of a pass and return its count; log its error and
        return 0 instead of failing, so that one step's trouble (a file
        that cannot be removed) does not keep the other from running.
        """
        try:
            return await step()
        except KoboldError as e:
            # The metadata database is down: say so once a pass.
            log.warn("{what} on {name} failed: {error}", what=what, name=self._node.name, error=e)
        except Exception:
            log.failure("{what} on {name} failed", what=what, name=self._node.name)
        return 0

    # -- deletes and overwrites

    async def _reclaim(self) -> int:
        """
        Remove our copies of deleted files, bytes first (a web server in
        front of us must stop serving them), then the replica rows, and
        purge the files no server holds any more.  Return how many copies
        went.
        """
        node, me = self._node, self._node.name
        removed, after = 0, 0
        while not self._stopping:
            page = await node.store.deleted_files(me, after, self._batch)
            for info in page:
                if self._stopping:
                    break
                if me in info.replicas:
                    await node.storage.remove(info.path)
                    await node.store.remove_replica(info.id, me)
                    removed += 1
                # Even if others held a copy a moment ago: servers reclaiming
                # at once each find the others' copies, and the last one to
                # try after every removal committed purges.
                await node.store.purge_file(info.id)
            if len(page) < self._batch:
                break
            after = page[-1].id
        return removed

    # -- copies

    async def _replicate(self) -> int:
        """
        Copy the due retries and the next page after the cursor; return
        how many copies succeeded.
        """
        node, me = self._node, self._node.name
        now = self._clock.seconds()
        if now >= self._rescanAt:
            self._cursor, self._rescanAt = 0, now + RESCAN
        work: list[FileInfo] = []
        due = sorted(i for i, retry in self.retries.items() if retry.due <= now)
        for file_id in due[: self._batch]:
            found = await node.store.missing_replicas(me, file_id - 1, 1)
            if found and found[0].id == file_id:
                work.append(found[0])
            else:
                # Copied, deleted or purged since.
                del self.retries[file_id]
        page = await node.store.missing_replicas(me, self._cursor, self._batch)
        work += [info for info in page if info.id not in self.retries]
        results = await gatherResults(
            [self._copies.run(lambda info=info: ensureDeferred(self._copy(info))) for info in work]
        )
        if page:
            self._cursor = max(self._cursor, page[-1].id)
        if len(page) == self._batch or len(due) > self._batch:
            self._again = True
        return sum(results)

    async def _copy(self, info: FileInfo) -> bool:
        """
        Copy one file; on failure, queue it for a retry.  Never fails.
        """
        if self._stopping:
            return False
        try:
            await self._fetch(info)
        except Exception as e:
            retry = self.retries.get(info.id)
            failures = retry.failures + 1 if retry is not None else 1
            delay = min(self._interval * 2 ** (failures - 1), MAX_BACKOFF)
            self.retries[info.id] = Retry(self._clock.seconds() + delay, failures)
            if isinstance(e, KoboldError):
                log.warn(
                    "copy of {fid} ({key!r}) to {name} failed, try {failures} again in "
                    "{delay:.1f}s: {error}",
                    fid=info.fid,
                    key=info.key,
                    name=self._node.name,
                    failures=failures,
                    delay=delay,
                    error=e,
                )
            else:
                log.failure("copy of {fid} to {name} failed", fid=info.fid, name=self._node.name)
            return False
        self.retries.pop(info.id, None)
        return True

    async def _fetch(self, info: FileInfo) -> None:
        """
        Stream the file from a live peer holding it, trying each in turn,
        and record our copy once durable and verified.

        @raise CopyFailed: no peer gave a good copy.
        """
        node = self._node
        errors = []
        for peer in node.peers_holding(info):
            if self._stopping:
                break
            try:
                await self._fetchFrom(peer, info)
            except KoboldError as e:
                errors.append(f"{peer.name}: {e}")
                continue
            if not await node.store.add_replica(info.id, node.name, self._clock.seconds()):
                # Purged while we copied: nobody will ever ask for it.
                await node.storage.remove(info.path)
            return
        raise CopyFailed("; ".join(errors) or "no live server holds a copy")

    async def _fetchFrom(self, peer: ServerInfo, info: FileInfo) -> None:
        """
        GET the file's bytes from C{peer}'s own copy (C{local}: a peer
        without one must not relay) into an upload at the file's path,
        published only if its size and SHA-256 match the metadata's.
        """
        node = self._node
        conn = await node.peers.acquire(peer.address)
        upload = node.storage.open_upload(info.path)
        try:
            upload.registerProducer(conn.transport, True)
            try:
                await conn.get(
                    {"ns": info.namespace, "key": info.key, "local": True}, _writer(upload)
                )
            finally:
                upload.unregisterProducer()
                node.peers.release(peer.address, conn)
            await upload.finish(info.sha256, info.size)
        except BaseException:
            await upload.abort()
            raise
