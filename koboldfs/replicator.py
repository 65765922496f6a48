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
  - B{copy}: the replication queue (files that a change left short of
    copies, written in the same database transaction as the change) is
    read by id, page after page; and a cursor walks file ids (never
    reused) in windows of L{WINDOW} ids for the live files this server has
    no good copy of: a new server's backfill, where every page is full,
    and otherwise a check, a few windows a pass, for whatever slipped by
    (at start from the last file this server holds, then from the first
    id L{RESCAN} seconds after it last reached the end).  Each copy
    is streamed from a live peer holding one, written durably and verified
    against its checksum, and only then recorded.  A copy that fails waits
    in a retry queue with exponential backoff.  A notification of a file
    below the cursor (PostgreSQL commits ids out of order) moves the
    cursor back.

See docs/replication.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    ensureDeferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.application.service import Service
from twisted.logger import Logger

from koboldfs.errors import CorruptReplica, ErrorCode, KoboldError, NoSpace, NotFound
from koboldfs.interfaces import FileInfo, ServerInfo
from koboldfs.metadata.events import FILE_ADDED, SERVER_CHANGED
from koboldfs.periodic import Periodic, logged
from koboldfs.placement import UNCOUNTED_STATES, Decision, choose
from koboldfs.protocol import CHUNK_SIZE

if TYPE_CHECKING:
    from koboldfs.interfaces import INode
    from koboldfs.storage import Reader, Upload

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
#: File ids one query of the walk looks at, at most: a query with little to
#: find costs the same at any number of files...
WINDOW = 1_000
#: ...and a pass that finds little looks at this many windows: the walk's
#: rate where nothing is missing (a pass every interval).
WINDOWS_PER_PASS = 10
#: Intervals a server not chosen for a copy waits before it looks again
#: (and copies anyway if the chosen ones have not).
DEFER_INTERVALS = 3


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
    deferred: bool = False


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


class Replicator(Service):
    """
    One server's replication loop, as a service.  It must start after the
    server has registered (peers and the metadata must know it): the
    server starts it once it has.

    @ivar retries: failed copies by file id, waiting for their turn.
    """

    def __init__(
        self,
        node: INode,
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
        self._loop = Periodic(f"replication on {node.name}", self.sweep, interval, clock)
        self._cursor = 0
        # Where the next page of the replication queue starts.
        self._queued = 0
        # Whether the walk reached the last file since it last started, and
        # whether it is yet to resume where this server's copies end.
        self._walked = False
        self._resume = True
        # The lowest cursor a notification asked for during the pass under
        # way, which the pass's own move of the cursor must not undo.
        self._heardBelow: int | None = None
        self._rescanAt = clock.seconds() + RESCAN
        self.retries: dict[int, Retry] = {}
        self._busy = False
        self._again = False
        self._waiters: list[Deferred[None]] = []
        self._stopping = False
        self._unsubscribe: Callable[[], None] | None = None
        self._unlisten: Callable[[], None] | None = None
        # Servers whose copies did not count at the last pass.
        self._uncounted: set[str] = set()
        # Whether our disk was full at the last pass (said once a change).
        self._full = False

    def startService(self) -> None:
        """
        Listen for changes and run a first pass now: a server that was down
        catches up at once.
        """
        super().startService()
        self._stopping = False
        self._unsubscribe = self._node.store.subscribe(self._heard)
        self._unlisten = self._node.replica_lost.add(self.repair)
        self._loop.startService()

    def repair(self, info: FileInfo) -> None:
        """
        Our copy of C{info} was found bad or missing and set aside: make it
        again from a good one now, not at the next pass from the first id.
        """
        self.retries[info.id] = Retry(self._clock.seconds(), 0)
        if self._loop.running:
            self.sweep()

    def stopService(self) -> Deferred[None]:
        """
        Start no more work; fire once the pass under way is over.  Closing
        the peer connections ends copies in progress sooner.
        """
        super().stopService()
        self._stopping = True
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._loop.running:
            self._loop.stopService()
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
            below = payload["id"] - 1
            self._cursor = min(self._cursor, below)
            if self._heardBelow is None or below < self._heardBelow:
                self._heardBelow = below
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
        # One step's trouble (a file that cannot be removed) does not keep
        # the other from running.
        name = self._node.name
        reclaimed = await logged(f"reclaiming on {name}", self._reclaim, 0)
        copied = 0
        full = self._node.storage.full
        if full != self._full:
            self._full = full
            if full:
                log.warn("{name}'s disk is full: copies to it wait for space", name=name)
            else:
                log.info("{name} has space again: copies to it resume", name=name)
        if not self._node.readonly and not full:
            copied = await logged(f"copying on {name}", self._replicate, 0)
        if reclaimed or copied:
            log.info(
                "{name} copied {copied} files and reclaimed {reclaimed}",
                name=self._node.name,
                copied=copied,
                reclaimed=reclaimed,
            )

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
        await node.refresh_servers()
        servers = node.servers
        now = self._clock.seconds()
        uncounted = {s.name for s in servers.values() if s.state in UNCOUNTED_STATES}
        if (now >= self._rescanAt and self._walked) or uncounted - self._uncounted:
            # Time for the periodic look (once the last one is over), or
            # copies stopped counting (a server drains or died): their
            # files may need copies here.
            self._cursor, self._rescanAt, self._walked = 0, now + RESCAN, False
        if uncounted - self._uncounted:
            for retry in self.retries.values():
                retry.due = min(retry.due, now)
        self._uncounted = uncounted
        wanted: dict[str, int | None] = {}
        work: list[FileInfo] = []
        due = sorted(i for i, retry in self.retries.items() if retry.due <= now)
        for file_id in due[: self._batch]:
            found = await node.store.missing_replicas(me, file_id - 1, 1, file_id)
            if found and found[0].id == file_id:
                # A second look: copy if still short, whoever was picked.
                decision = await self._decide(found[0], wanted)
                if decision is Decision.ENOUGH:
                    del self.retries[file_id]
                else:
                    work.append(found[0])
            else:
                # Copied, deleted or purged since.
                del self.retries[file_id]
        queued = await node.store.queued_files(me, self._queued, self._batch)
        await self._consider(queued, wanted, work, now)
        self._queued = queued[-1].id if len(queued) == self._batch else 0
        # The last file stored before the walk's pages are read: if a page is
        # short, nothing up to its window's end is missing.  A file below it
        # committed later (PostgreSQL) is notified, and its notification
        # moves the cursor back (L{_heard}).
        self._heardBelow = None
        high = await node.store.max_file_id()
        if self._resume:
            # After a restart, not from id 0: a backfill cut short goes on
            # where its copies end, and a server holding everything does
            # not walk it all again at once (the hourly walk will).
            self._resume = False
            self._cursor = max(self._cursor, await node.store.max_held(me))
        cursor = self._cursor
        full = False
        for _ in range(WINDOWS_PER_PASS):
            if cursor >= high:
                self._walked = True
                break
            upto = min(cursor + WINDOW, high)
            page = await node.store.missing_replicas(me, cursor, self._batch, upto)
            await self._consider(page, wanted, work, now)
            if len(page) == self._batch:
                cursor, full = max(cursor, page[-1].id), True
                break
            cursor = upto
        results = await gatherResults(
            [self._copies.run(lambda info=info: ensureDeferred(self._copy(info))) for info in work]
        )
        if self._heardBelow is not None and self._heardBelow < cursor:
            # Heard of during this pass: the page may not have had it.
            cursor = self._heardBelow
            self._again = True
        self._cursor = cursor
        if full or len(queued) == self._batch or len(due) > self._batch:
            self._again = True
        return sum(results)

    async def _consider(
        self, page: list[FileInfo], wanted: dict[str, int | None], work: list[FileInfo], now: float
    ) -> None:
        """
        Decide about each file of C{page}, which this server lacks: into
        C{work} if it is to copy it now, into the retries if others are to
        copy it first, off the replication queue if it has its copies.
        """
        for info in page:
            if info.id in self.retries or any(w.id == info.id for w in work):
                continue
            decision = await self._decide(info, wanted)
            if decision is Decision.COPY:
                work.append(info)
            elif decision is Decision.DEFER:
                delay = self._interval * DEFER_INTERVALS
                self.retries[info.id] = Retry(now + delay, 0, deferred=True)
            else:
                await self._node.store.settle(info.id)

    async def _decide(self, info: FileInfo, wanted: dict[str, int | None]) -> Decision:
        """
        L{choose} for C{info}, with its namespace's replica count looked up
        once a pass (into C{wanted}).
        """
        node = self._node
        if info.namespace not in wanted:
            namespace = await node.store.namespace(info.namespace)
            wanted[info.namespace] = None if namespace is None else namespace.replicas
        return choose(
            info,
            node.name,
            node.servers,
            wanted[info.namespace],
            self._clock.seconds(),
            node.config.down_after,
        )

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
            if isinstance(e, NoSpace):
                # Our disk, not the file: try again as soon as there is room.
                delay = self._interval
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
            except NoSpace:
                raise  # no peer can help: our disk is full
            except KoboldError as e:
                # Killed (connection lost), hung (no frame for
                # --peer-timeout), or a bad copy there: try the next.
                log.info(
                    "copy of {fid} from {peer} to {name} failed, trying the next holder: {error}",
                    fid=info.fid,
                    peer=peer.name,
                    name=node.name,
                    error=e,
                )
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
        # Refused before a connection is made when it would not fit.
        upload = node.storage.open_upload(info.path, size=info.size)
        try:
            conn = await node.peers.acquire(peer.address)
        except BaseException:
            await upload.abort()
            raise
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


#: The least a scrubbed file counts for against the scrub's rate.
SCRUB_FILE_COST = 64 * 1024


class Scrubber(Service):
    """
    One server's background scrub: re-reads every copy it holds, by file
    id, at most C{rate} bytes a second, verifying each against its size
    and SHA-256; a bad or missing one is set aside (L{INode.replica_failed
    <koboldfs.interfaces.INode.replica_failed>}), which makes the replicator
    copy it again from a good one.

    Reads run in the thread pool (L{Reader <koboldfs.storage.Reader>});
    the pace is kept by waiting on the clock after each chunk, so the
    reactor is never blocked.  After the last file it rests C{rest}
    seconds and starts again from the first.

    A service that runs (C{running}) only while the scrub is on.

    Its progress, for a status page: C{cursor} (the last file id checked
    this round), C{rounds} (complete rounds), C{files_checked} and
    C{bytes_checked} (since start), C{bad} (copies set aside) and
    C{last_bad} (the last one's reason).
    """

    def __init__(
        self,
        node: INode,
        clock: Any,
        rate: float,
        rest: float,
        batch: int = BATCH,
    ) -> None:
        """
        @param clock: provides C{IReactorTime}.
        @param rate: bytes a second; 0 disables the scrub.
        """
        self._node = node
        self._clock = clock
        self.rate = rate
        self._rest = rest
        self._batch = batch
        self.cursor = 0
        self.rounds = 0
        self.files_checked = 0
        self.bytes_checked = 0
        self.bad = 0
        self.last_bad: str | None = None
        self._stopping = True
        self._done: Deferred[None] = succeed(None)
        self._wait: Deferred[None] | None = None

    def startService(self) -> None:
        if self.rate <= 0 or self.running:
            return
        super().startService()
        self._stopping = False
        self._done = ensureDeferred(self._run())

    def stopService(self) -> Deferred[None]:
        """
        Stop after the chunk being read; fire once stopped.
        """
        super().stopService()
        self._stopping = True
        wait, self._wait = self._wait, None
        if wait is not None:
            wait.cancel()
        return self._done

    def _sleep(self, seconds: float) -> Deferred[None]:
        """
        Wait C{seconds} on the clock; L{stopService} cuts the wait short.
        """
        d: Deferred[None] = Deferred(lambda d: call.cancel())
        call = self._clock.callLater(seconds, d.callback, None)
        self._wait = d
        return d

    async def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    if not await logged(f"scrub on {self._node.name}", self._page, False):
                        await self._sleep(self._rest)
                except CancelledError:
                    break
        finally:
            self._wait = None

    async def _page(self) -> bool:
        """
        Check the next page of copies; True once done (False would be a
        failure: see L{logged}).
        """
        node = self._node
        page = await node.store.held_files(node.name, self.cursor, self._batch)
        if not page:
            self.rounds += 1
            self.cursor = 0
            await self._sleep(self._rest)
            return True
        for info in page:
            if self._stopping:
                return True
            await self._check(info)
            self.cursor = info.id
            # A file costs a lookup and an open whatever its size: count a
            # small one as SCRUB_FILE_COST bytes, or a store of 4 KiB files
            # would be scrubbed at thousands of files a second.
            if info.size < SCRUB_FILE_COST and not self._stopping:
                await self._sleep((SCRUB_FILE_COST - info.size) / self.rate)
        return True

    async def _check(self, info: FileInfo) -> None:
        """
        Read our copy of C{info} through, at the rate; set it aside if it
        is missing or bad and still ours and live.
        """
        node = self._node
        reader = node.storage.open_read(info.path, expect_sha256=info.sha256, expect_size=info.size)
        step = max(1, min(CHUNK_SIZE, int(self.rate)))
        reason = None
        try:
            if info.size <= step:
                await self._check_whole(reader, info, step)
            elif not await self._check_chunks(reader, step):
                return
        except NotFound:
            reason = "missing from disk"
        except CorruptReplica as e:
            reason = str(e)
        self.files_checked += 1
        if reason is None:
            return
        # Deleted, overwritten or set aside by a reader meanwhile: not a
        # bad copy of a live file any more.
        current = await node.store.lookup_fid(info.fid)
        if current is None or node.name not in current[0].replicas:
            return
        self.bad += 1
        self.last_bad = f"{info.fid} ({info.key!r}): {reason}"
        await node.replica_failed(info, f"scrub: {reason}")

    async def _check_whole(self, reader: Reader, info: FileInfo, step: int) -> None:
        """
        A file of one step (most files, in a store of small ones): opened,
        read, verified and closed in one thread job instead of four (open,
        the read, the read that finds the end, close), each a hand-off the
        server's requests wait behind.
        """
        size, data = await reader.read_whole(step)
        if data is None:
            raise CorruptReplica(
                ErrorCode.CORRUPT, f"{info.path} has {size} bytes, not {info.size}"
            )
        self.bytes_checked += len(data)
        await self._sleep(len(data) / self.rate)

    async def _check_chunks(self, reader: Reader, step: int) -> bool:
        """
        A larger file, a step at a time at the rate: True once read
        through, False if the scrub stopped first.
        """
        try:
            await reader.open()
            while not self._stopping:
                chunk = await reader.read(step)
                if not chunk:
                    return True
                self.bytes_checked += len(chunk)
                await self._sleep(len(chunk) / self.rate)
            return False
        finally:
            await reader.close()
