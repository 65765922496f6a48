"""
Tests of the replicator in memory: servers of a L{MemoryCluster} sharing
one SQLite file and one clock, copying files over iosim connections.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from typing import Any

from twisted.internet.defer import succeed
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.interfaces import FileInfo, ServerInfo
from koboldfs.metadata.events import FILE_ADDED
from koboldfs.protocol import CHUNK_SIZE
from koboldfs import replicator as replicator_module
from koboldfs.replicator import (
    DEFER_INTERVALS,
    RESCAN,
    SCRUB_FILE_COST,
    Replicator,
    Scrubber,
)
from koboldfs.config import ServerConfig
from koboldfs.tap import Options
from koboldfs.testing import MemoryCluster

#: Seconds between passes in these tests.
INTERVAL = 10.0


class ReplicatorTests(SynchronousTestCase):
    """
    Copies, retries and reclaims, driven by the clock and by the store's
    notifications, with real storage and metadata.
    """

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.cluster = MemoryCluster(self.root, ["a", "b", "c"])
        self.addCleanup(self.cluster.stop)
        self.replicators: dict[str, Replicator] = {}
        # A put lands on one server, for the replicators to copy: these
        # tests are about them, not about write durability.
        store = self.cluster.servers["a"].store
        self.cluster.flush(store.set_namespace("test", min_copies=1))

    def replicator(self, name: str, **options: int) -> Replicator:
        """
        Start the replicator of server C{name}: its first pass runs now.
        """
        server = self.cluster.servers[name]
        replicator = Replicator(server.node, self.cluster.reactor, INTERVAL, **options)
        self.replicators[name] = replicator
        replicator.startService()
        self.addCleanup(lambda: self.cluster.flush(replicator.stopService()))
        self.cluster.pump()
        return replicator

    def put(self, key: str, body: bytes, on: str = "a") -> FileInfo:
        client = self.cluster.servers[on].client()
        self.assertTrue(self.cluster.flush(client.put(key, body)))
        self.cluster.flush(client.close())
        return self.lookup(key)

    def lookup(self, key: str) -> FileInfo:
        return self.cluster.flush(self.cluster.servers["a"].store.lookup("test", key))

    def on_disk(self, name: str, info: FileInfo) -> bytes | None:
        path = os.path.join(self.cluster.servers[name].storage.root, *info.path.split("/"))
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def advance(self, seconds: float, alive: tuple[str, ...] = ()) -> None:
        """
        Let C{seconds} pass, heartbeating C{alive} (default: every server)
        first so that only the others go down.
        """
        self.cluster.beat(*alive)
        self.cluster.reactor.advance(seconds)
        self.cluster.pump()

    def walk_only(self, name: str) -> None:
        """
        Hide the replication queue from server C{name}'s replicator: what
        it copies, the walk of file ids finds alone.
        """
        store = self.cluster.servers[name].store
        store.queued_files = lambda server, after, limit: succeed([])  # type: ignore[method-assign]

    def file_rows(self) -> int:
        with sqlite3.connect(os.path.join(self.root, "metadata.sqlite")) as db:
            return db.execute("SELECT count(*) FROM files").fetchone()[0]

    def test_heardDuringPass(self) -> None:
        """
        A file heard of while a page is being copied, though its id is
        inside the page already read (its transaction committed after a
        later id's, as PostgreSQL's can), is copied at the next pass: the
        cursor does not move past it at the end of this one.
        """
        first = self.put("first", b"1")
        second = self.put("second", b"2")
        self.walk_only("b")
        node = self.cluster.servers["b"].node
        replicator = Replicator(node, self.cluster.reactor, INTERVAL)
        read = node.store.missing_replicas
        late = [True]

        def missing_replicas(server: str, after: int, limit: int, upto: int | None = None) -> Any:
            def commit_late(page: list[FileInfo]) -> list[FileInfo]:
                if late[0] and any(info.id == first.id for info in page):
                    late[0] = False
                    # Not committed yet when the page was read; heard of now.
                    replicator._heard(FILE_ADDED, {"id": first.id})
                    return [info for info in page if info.id != first.id]
                return page

            return read(server, after, limit, upto).addCallback(commit_late)

        node.store.missing_replicas = missing_replicas  # type: ignore[method-assign]
        replicator.startService()
        self.addCleanup(lambda: self.cluster.flush(replicator.stopService()))
        self.cluster.pump()
        self.advance(INTERVAL)
        self.assertEqual(self.on_disk("b", second), b"2")
        self.assertEqual(self.on_disk("b", first), b"1")

    def test_copiesMissing(self) -> None:
        """
        A server copies the files it lacks from a peer at its first pass,
        byte for byte, streamed over several frames, and records its copy
        only once verified; the file keeps its path.
        """
        body = os.urandom(3 * CHUNK_SIZE + 17)
        small = self.put("small.txt", b"tiny")
        big = self.put("big.bin", body)
        self.replicator("b")
        self.assertEqual(self.on_disk("b", big), body)
        self.assertEqual(self.on_disk("b", small), b"tiny")
        self.assertEqual(self.lookup("big.bin").replicas, ("a", "b"))
        self.assertEqual(self.lookup("small.txt").replicas, ("a", "b"))
        self.assertEqual(os.listdir(os.path.join(self.root, "b", "tmp")), [])

    def test_intervalPicksUpNewFiles(self) -> None:
        """
        Files another process adds (SQLite tells no other process) are found
        by the next pass of the loop, from the cursor.
        """
        self.replicator("b")
        info = self.put("k", b"later")
        self.assertIsNone(self.on_disk("b", info))
        self.advance(INTERVAL)
        self.assertEqual(self.on_disk("b", info), b"later")

    def test_wokenByOwnChanges(self) -> None:
        """
        A change the server's own store reports wakes the replicator with no
        wait: a delete made through it is reclaimed and purged at once.
        """
        self.replicator("b")
        info = self.put("k", b"mine", on="b")
        client = self.cluster.servers["b"].client()
        self.assertTrue(self.cluster.flush(client.delete("k")))
        self.cluster.flush(client.close())
        self.assertIsNone(self.on_disk("b", info))
        self.assertEqual(self.file_rows(), 0)

    def test_batches(self) -> None:
        """
        A backlog larger than a batch is copied in one sweep, a batch at a
        time, each batch starting where the last ended.
        """
        infos = [self.put(f"k{n}", f"body {n}".encode()) for n in range(7)]
        self.replicator("b", batch=2, concurrency=2)
        self.assertEqual(
            [self.on_disk("b", i) for i in infos], [f"body {n}".encode() for n in range(7)]
        )

    def test_overwrite(self) -> None:
        """
        Only the live version of a key is copied; the replaced one's bytes
        are reclaimed by the server that held them, and its row purged.
        """
        old = self.put("k", b"old")
        new = self.put("k", b"new")
        self.replicator("b")
        self.replicator("a")
        self.assertIsNone(self.on_disk("b", old))
        self.assertEqual(self.on_disk("b", new), b"new")
        self.assertIsNone(self.on_disk("a", old))
        self.assertEqual(self.file_rows(), 1)

    def test_delete(self) -> None:
        """
        A deleted file's copies leave every server that runs a pass, and
        its row goes with the last copy.
        """
        info = self.put("k", b"doomed")
        self.replicator("a")
        self.replicator("b")
        self.assertEqual(self.lookup("k").replicas, ("a", "b"))
        client = self.cluster.servers["a"].client()
        self.assertTrue(self.cluster.flush(client.delete("k")))
        self.cluster.flush(client.close())
        self.assertIsNone(self.on_disk("a", info))
        self.assertEqual(self.on_disk("b", info), b"doomed")
        self.advance(INTERVAL)
        self.assertIsNone(self.on_disk("b", info))
        self.assertEqual(self.file_rows(), 0)

    def test_downDuringDelete(self) -> None:
        """
        A server that was not running during a delete removes its copy when
        it comes back, and purges the row that waited for it.
        """
        info = self.put("k", b"doomed")
        self.cluster.flush(self.replicator("b").stopService())
        self.assertEqual(self.on_disk("b", info), b"doomed")
        self.cluster.flush(self.cluster.servers["a"].node.delete("test", "k"))
        self.replicator("a")
        self.assertEqual(self.file_rows(), 1)
        self.replicator("b")
        self.assertIsNone(self.on_disk("b", info))
        self.assertEqual(self.file_rows(), 0)

    def test_noLivePeerBacksOff(self) -> None:
        """
        A file whose only holder is down waits in the retry queue, tried
        again after one interval, then two, four...; once its holder is back
        it is copied and leaves the queue.
        """
        info = self.put("k", b"patient")
        self.advance(self.cluster.servers["b"].config.down_after + 1, alive=("b", "c"))
        replicator = self.replicator("b")
        self.assertEqual(replicator.retries[info.id].failures, 1)
        self.advance(INTERVAL, alive=("b", "c"))
        self.assertEqual(replicator.retries[info.id].failures, 2)
        self.advance(INTERVAL, alive=("b", "c"))
        self.assertEqual(replicator.retries[info.id].failures, 2)
        self.advance(INTERVAL)
        self.assertEqual(replicator.retries, {})
        self.assertEqual(self.on_disk("b", info), b"patient")

    def test_corruptSourceNotCopied(self) -> None:
        """
        A source copy that fails its checksum is never copied: the source
        quarantines it, and the file waits for a good copy.
        """
        info = self.put("k", b"precious bytes")
        path = os.path.join(self.root, "a", *info.path.split("/"))
        with open(path, "r+b") as f:
            f.write(b"P")
        replicator = self.replicator("b")
        self.assertIsNone(self.on_disk("b", info))
        self.assertIn(info.id, replicator.retries)
        self.assertEqual(self.lookup("k").replicas, ())
        self.assertEqual(os.listdir(os.path.join(self.root, "b", "tmp")), [])
        quarantined = os.listdir(os.path.join(self.root, "a", "quarantine"))
        self.assertEqual(quarantined, [os.path.basename(info.path)])

    def test_corruptSourceOtherPeer(self) -> None:
        """
        With one good copy left among the holders, a server ends up with
        that copy, whichever holder it asked first.
        """
        body = b"precious bytes"
        info = self.put("k", body)
        self.replicator("c")
        with open(os.path.join(self.root, "a", *info.path.split("/")), "r+b") as f:
            f.write(b"P")
        self.replicator("b")
        self.assertEqual(self.on_disk("b", info), body)
        self.assertEqual(hashlib.sha256(self.on_disk("b", info)).hexdigest(), info.sha256)
        self.assertIn("b", self.lookup("k").replicas)

    def test_repairAtOnce(self) -> None:
        """
        A copy of ours found bad (by a read or the scrub) is made again from
        a good one at once, not at the hourly pass from the first id.
        """
        info = self.put("k", b"again")
        self.replicator("b")
        node = self.cluster.servers["b"].node
        self.cluster.flush(node.replica_failed(self.lookup("k"), "a test"))
        self.assertEqual(self.on_disk("b", info), b"again")
        self.assertEqual(self.lookup("k").replicas, ("a", "b"))
        quarantined = os.listdir(os.path.join(self.root, "b", "quarantine"))
        self.assertEqual(quarantined, [os.path.basename(info.path)])

    def test_cursorPastHeldFiles(self) -> None:
        """
        A pass that finds nothing missing moves the cursor to the last file
        stored, so that the next pass asks only for files after it (and
        nothing when there are none): a pass with nothing to do costs the
        same at any number of files.  After a restart the walk starts where
        this server's copies end.  Files stored later are still found.
        """
        infos = [self.put(f"k{n}", b"mine", on="b") for n in range(3)]
        store = self.cluster.servers["b"].store
        asked: list[int] = []
        missing = store.missing_replicas

        def spy(server: str, after: int, limit: int, upto: int | None = None) -> Any:
            asked.append(after)
            return missing(server, after, limit, upto)

        store.missing_replicas = spy  # type: ignore[method-assign]
        self.replicator("b")
        self.advance(INTERVAL)
        self.assertEqual(asked, [])
        later = self.put("later", b"theirs")
        self.advance(INTERVAL)
        self.assertEqual(self.on_disk("b", later), b"theirs")
        self.assertEqual(asked[:1], [infos[-1].id])

    def test_notifiedBelowCursorDuringPass(self) -> None:
        """
        A file that becomes visible below the last id while a pass runs
        (PostgreSQL commits ids out of order) is told of during the pass:
        the pass's own move of the cursor does not skip it.
        """
        info = self.put("late", b"committed late")
        newer = self.put("newer", b"x", on="c")
        self.walk_only("b")
        store = self.cluster.servers["b"].store
        missing = store.missing_replicas

        def late_commit(server: str, after: int, limit: int, upto: int | None = None) -> Any:
            # The first page does not see the file yet; its notification
            # arrives while the pass is under way.
            store.missing_replicas = missing  # type: ignore[method-assign]
            d = missing(server, after, limit, upto)
            d.addCallback(lambda page: [f for f in page if f.id != info.id])
            self.replicators["b"]._heard(FILE_ADDED, {"id": info.id})
            return d

        store.missing_replicas = late_commit  # type: ignore[method-assign]
        self.replicator("b")
        self.assertGreater(newer.id, info.id)
        self.assertEqual(self.on_disk("b", info), b"committed late")

    def test_rescan(self) -> None:
        """
        A copy lost behind the cursor with nobody told (its row removed
        by hand, so not queued) is made again by the periodic walk from the
        first id, not by every pass.
        """
        for server in self.cluster.servers.values():
            server.config.down_after = 2 * RESCAN
        info = self.put("k", b"again")
        self.replicator("b")
        server = self.cluster.servers["b"]
        self.cluster.flush(server.storage.remove(info.path))
        with sqlite3.connect(os.path.join(self.root, "metadata.sqlite")) as db:
            db.execute("DELETE FROM replicas WHERE file_id = ? AND server = 'b'", (info.id,))
            db.execute("DELETE FROM copy_queue WHERE file_id = ?", (info.id,))
        self.assertEqual(self.lookup("k").replicas, ("a",))
        self.advance(INTERVAL)
        self.assertIsNone(self.on_disk("b", info))
        # In two steps, so that connections the peer closed as idle are
        # seen closed before the rescan.
        self.advance(RESCAN - 2 * INTERVAL)
        self.assertIsNone(self.on_disk("b", info))
        self.advance(INTERVAL)
        self.assertEqual(self.on_disk("b", info), b"again")

    def test_queueAlone(self) -> None:
        """
        A file a change left short of copies is copied from the replication
        queue, without the walk of file ids, and leaves the queue once it
        has its copies.
        """
        info = self.put("k", b"queued")
        store = self.cluster.servers["b"].store
        store.missing_replicas = lambda *args: succeed([])  # type: ignore[method-assign]
        self.assertEqual(self.cluster.flush(store.health()).queued, 1)
        self.replicator("b")
        self.assertEqual(self.on_disk("b", info), b"queued")
        self.assertEqual(self.cluster.flush(store.health()).queued, 1)  # c lacks it still
        self.replicator("c")
        self.assertEqual(self.on_disk("c", info), b"queued")
        self.assertEqual(self.cluster.flush(store.health()).queued, 0)

    def test_walkInWindows(self) -> None:
        """
        The walk of file ids asks for one window of ids at a time, a few
        windows a pass, and still finds every file it lacks.
        """
        self.patch(replicator_module, "WINDOW", 2)
        self.patch(replicator_module, "WINDOWS_PER_PASS", 2)
        infos = [self.put(f"k{n}", b"w", on="a") for n in range(7)]
        self.walk_only("b")
        store = self.cluster.servers["b"].store
        asked: list[tuple[int, int | None]] = []
        missing = store.missing_replicas

        def spy(server: str, after: int, limit: int, upto: int | None = None) -> Any:
            asked.append((after, upto))
            return missing(server, after, limit, upto)

        store.missing_replicas = spy  # type: ignore[method-assign]
        self.replicator("b", batch=1)
        for _ in range(10):
            self.advance(INTERVAL)
        for info in infos:
            self.assertEqual(self.on_disk("b", info), b"w")
        walk = [(after, upto) for after, upto in asked if upto != after + 1]
        self.assertTrue(walk)
        for after, upto in walk:
            self.assertIsNotNone(upto)
            assert upto is not None
            self.assertLessEqual(upto - after, 2)

    def test_readonlyTakesNoCopies(self) -> None:
        """
        A server not taking new files takes no copies either, but still
        reclaims deleted ones.
        """
        info = self.put("k", b"x")
        store = self.cluster.servers["b"].store
        self.cluster.flush(store.set_server_state("b", "readonly"))
        self.cluster.beat()
        self.replicator("b")
        self.assertIsNone(self.on_disk("b", info))

    def test_databaseDown(self) -> None:
        """
        A pass that cannot reach the metadata is logged and the loop goes
        on: the next pass after the database returns does the work.
        """
        info = self.put("k", b"x")
        server = self.cluster.servers["b"]
        self.cluster.flush(server.store.stop())
        self.replicator("b")
        self.cluster.reactor.advance(INTERVAL)
        self.assertIsNone(self.on_disk("b", info))
        self.cluster.flush(server.store.start())
        self.advance(INTERVAL)
        self.assertEqual(self.on_disk("b", info), b"x")

    # -- server states and replica counts

    def set_state(self, name: str, state: str) -> None:
        store = self.cluster.servers[name].store
        self.assertTrue(self.cluster.flush(store.set_server_state(name, state)))
        self.cluster.beat()

    def set_host(self, name: str, host: str) -> None:
        server = self.cluster.servers[name]
        server.config.host = host
        info = ServerInfo(name, host, server.address, "http://memory")
        self.cluster.flush(server.store.register_server(info))
        self.cluster.beat()

    def set_replicas(self, count: int | None) -> None:
        store = self.cluster.servers["a"].store
        self.cluster.flush(store.set_namespace("test", replicas=count))

    def test_drainIsSourceNotTarget(self) -> None:
        """
        A draining server's files are copied from it to the others, it
        takes none of theirs, and it keeps its own copies meanwhile.
        """
        mine = self.put("mine", b"on a")
        theirs = self.put("theirs", b"on b", on="b")
        self.set_state("a", "drain")
        self.replicator("a")
        self.replicator("b")
        self.replicator("c")
        self.assertEqual(self.on_disk("b", mine), b"on a")
        self.assertEqual(self.on_disk("c", mine), b"on a")
        self.assertIsNone(self.on_disk("a", theirs))
        self.assertEqual(self.on_disk("a", mine), b"on a")
        self.assertEqual(self.lookup("mine").replicas, ("a", "b", "c"))

    def test_drainWithReplicaCount(self) -> None:
        """
        With a replica count, a draining server's copy does not count: its
        file is copied until that many copies are on other servers.
        """
        self.set_replicas(1)
        info = self.put("k", b"moving")
        self.replicator("b")
        self.replicator("c")
        self.assertEqual(self.lookup("k").replicas, ("a",))
        self.set_state("a", "drain")
        self.advance(INTERVAL)
        self.assertEqual(len(self.lookup("k").replicas), 2)
        self.assertEqual(self.on_disk("a", info), b"moving")
        self.advance(DEFER_INTERVALS * INTERVAL)
        self.advance(INTERVAL)
        self.assertEqual(len(self.lookup("k").replicas), 2)

    def test_deadForgotten(self) -> None:
        """
        A dead server's copies do not count: they are made again elsewhere,
        readers are never sent to it, and a deleted file it alone holds is
        purged.
        """
        self.set_replicas(2)
        kept = self.put("kept", b"twice")
        self.replicator("b")
        self.replicator("c")
        holders = self.lookup("kept").replicas
        self.assertEqual(len(holders), 2)
        [other] = set(holders) - {"a"}
        [spare] = {"b", "c"} - {other}
        doomed = self.put("doomed", b"x", on=other)
        self.set_state(other, "dead")
        self.advance(INTERVAL)
        self.assertEqual(self.on_disk(spare, kept), b"twice")
        sources = self.cluster.servers["a"].node.peers_holding(self.lookup("kept"))
        self.assertEqual(sorted(s.name for s in sources), [spare])
        # Only the dead server held it: nobody can copy it from there.
        self.assertIsNone(self.on_disk(spare, doomed))
        client = self.cluster.servers["a"].client()
        self.assertTrue(self.cluster.flush(client.delete("doomed")))
        self.cluster.flush(client.close())
        self.advance(INTERVAL)
        self.assertEqual(self.file_rows(), 1)

    def test_replicaCount(self) -> None:
        """
        With a count of 2, of the two servers lacking a new file exactly
        one copies it; the other, if it was not the one picked, looks again
        later, finds enough copies, and forgets it.
        """
        self.set_replicas(2)
        b, c = self.replicator("b"), self.replicator("c")
        info = self.put("k", b"two copies")
        self.advance(INTERVAL)
        self.assertEqual(len(self.lookup("k").replicas), 2)
        self.advance(DEFER_INTERVALS * INTERVAL)
        self.assertEqual((b.retries, c.retries), ({}, {}))
        self.assertEqual(len(self.lookup("k").replicas), 2)
        self.assertEqual([self.on_disk(n, info) is None for n in ("b", "c")].count(True), 1)

    def test_distinctHosts(self) -> None:
        """
        Copies go to another host first: with A and B on one host, C takes
        the second copy of A's files, every time; B takes one only if C
        cannot.
        """
        self.set_host("a", "h1")
        self.set_host("b", "h1")
        self.set_replicas(2)
        infos = [self.put(f"k{n}", b"spread") for n in range(5)]
        self.replicator("b")
        self.replicator("c")
        self.assertEqual([self.lookup(i.key).replicas for i in infos], [("a", "c")] * 5)
        self.assertEqual([self.on_disk("b", i) for i in infos], [None] * 5)

    def test_distinctHostDown(self) -> None:
        """
        When the other host's server is down, one on the same host takes
        the copy after all: two copies on one host beat one.
        """
        self.set_host("a", "h1")
        self.set_host("b", "h1")
        self.set_replicas(2)
        info = self.put("k", b"somewhere")
        self.advance(self.cluster.servers["b"].config.down_after + 1)
        self.cluster.beat("a", "b")
        self.replicator("b")
        self.assertEqual(self.on_disk("b", info), b"somewhere")


class ScrubberTests(SynchronousTestCase):
    """
    The background scrub, paced on a L{task.Clock}-like reactor: it reads
    at the rate it is given, and sets aside bad and missing copies, which
    the replicator then makes again.
    """

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.cluster = MemoryCluster(self.root, ["a", "b"])
        self.addCleanup(self.cluster.stop)
        # One copy at the put: the replicator makes the others.
        store = self.cluster.servers["a"].store
        self.cluster.flush(store.set_namespace("test", min_copies=1))

    def put(self, key: str, body: bytes) -> FileInfo:
        server = self.cluster.servers["a"]
        client = server.client()
        self.assertTrue(self.cluster.flush(client.put(key, body)))
        self.cluster.flush(client.close())
        return self.cluster.flush(server.store.lookup("test", key))

    def scrubber(self, name: str, rate: float) -> Scrubber:
        scrubber = Scrubber(self.cluster.servers[name].node, self.cluster.reactor, rate, INTERVAL)
        scrubber.startService()
        self.addCleanup(lambda: self.cluster.flush(scrubber.stopService()))
        self.cluster.pump()
        return scrubber

    def replicate(self, name: str) -> Replicator:
        replicator = Replicator(self.cluster.servers[name].node, self.cluster.reactor, INTERVAL)
        replicator.startService()
        self.addCleanup(lambda: self.cluster.flush(replicator.stopService()))
        self.cluster.pump()
        return replicator

    def path(self, name: str, info: FileInfo) -> str:
        return os.path.join(self.root, name, *info.path.split("/"))

    def test_pace(self) -> None:
        """
        At one chunk a second, a file of three chunks and a byte takes four
        seconds; the round then ends and the next starts after a rest.
        """
        self.put("k", os.urandom(3 * CHUNK_SIZE + 1))
        scrubber = self.scrubber("a", CHUNK_SIZE)
        self.assertEqual(scrubber.bytes_checked, CHUNK_SIZE)
        for chunks in (2, 3):
            self.cluster.reactor.advance(1)
            self.assertEqual(scrubber.bytes_checked, chunks * CHUNK_SIZE)
        self.assertEqual(scrubber.files_checked, 0)
        self.cluster.reactor.advance(1)
        self.assertEqual(scrubber.bytes_checked, 3 * CHUNK_SIZE + 1)
        self.cluster.reactor.advance(1)
        self.assertEqual((scrubber.files_checked, scrubber.bad), (1, 0))
        self.cluster.reactor.advance(INTERVAL)
        self.assertEqual(scrubber.bytes_checked, 4 * CHUNK_SIZE + 1)

    def test_smallFilesPace(self) -> None:
        """
        A small file counts as L{SCRUB_FILE_COST} bytes against the rate,
        so a store of tiny files is not scrubbed thousands a second.
        """
        for i in range(3):
            self.put(f"k{i}", b"x")
        scrubber = self.scrubber("a", SCRUB_FILE_COST)
        checked = []
        for _ in range(250):
            self.cluster.reactor.advance(0.01)
            checked.append(scrubber.files_checked)
        # One file a second: the first at once, the others a second apart.
        self.assertEqual((checked[49], checked[149], checked[249]), (1, 2, 3))

    def test_smallRate(self) -> None:
        """
        A rate below a chunk reads in pieces of that size, one a second.
        """
        self.put("k", b"x" * 100)
        scrubber = self.scrubber("a", 30)
        self.assertEqual(scrubber.bytes_checked, 30)
        self.cluster.reactor.advance(1)
        self.assertEqual(scrubber.bytes_checked, 60)

    def test_disabled(self) -> None:
        """
        A rate of 0 turns the scrub off.
        """
        self.put("k", b"x")
        scrubber = self.scrubber("a", 0)
        self.assertFalse(scrubber.running)
        self.assertEqual(scrubber.bytes_checked, 0)

    def test_stopWhileWaiting(self) -> None:
        """
        Stopping cuts the wait between chunks short; nothing is left on
        the clock.
        """
        self.put("k", os.urandom(2 * CHUNK_SIZE))
        scrubber = self.scrubber("a", CHUNK_SIZE)
        self.cluster.flush(scrubber.stopService())
        self.assertFalse(scrubber.running)
        self.assertEqual(self.cluster.reactor.getDelayedCalls(), [])

    def test_badCopyRepaired(self) -> None:
        """
        A copy whose bytes were flipped is set aside by the scrub and made
        again from a good copy at once.
        """
        info = self.put("k", b"precious bytes")
        self.replicate("b")
        with open(self.path("b", info), "r+b") as f:
            f.write(b"P")
        scrubber = self.scrubber("b", CHUNK_SIZE)
        self.assertEqual(scrubber.bad, 1)
        self.assertIn("sha256", scrubber.last_bad)
        with open(self.path("b", info), "rb") as f:
            self.assertEqual(f.read(), b"precious bytes")
        self.assertEqual(
            os.listdir(os.path.join(self.root, "b", "quarantine")), [os.path.basename(info.path)]
        )
        found = self.cluster.flush(self.cluster.servers["a"].store.lookup("test", "k"))
        self.assertEqual(found.replicas, ("a", "b"))

    def test_missingCopyRepaired(self) -> None:
        """
        A copy gone from disk is treated the same: forgotten, then made
        again.
        """
        info = self.put("k", b"precious bytes")
        self.replicate("b")
        os.unlink(self.path("b", info))
        scrubber = self.scrubber("b", CHUNK_SIZE)
        self.assertEqual((scrubber.bad, scrubber.last_bad.endswith("missing from disk")), (1, True))
        with open(self.path("b", info), "rb") as f:
            self.assertEqual(f.read(), b"precious bytes")

    def test_smallFileOneJob(self) -> None:
        """
        A file of one step is checked in one thread job (open, read,
        verify, close), not one for each.
        """
        self.put("k", b"small and good")
        storage = self.cluster.servers["a"].node.storage
        jobs = []
        defer_job = storage._defer

        def counting(f: Any, *args: Any, **kwargs: Any) -> Any:
            jobs.append(f.__name__)
            return defer_job(f, *args, **kwargs)

        storage._defer = counting  # type: ignore[method-assign]
        scrubber = self.scrubber("a", CHUNK_SIZE)
        self.cluster.reactor.advance(0.5)
        self.assertEqual((scrubber.files_checked, scrubber.bad), (1, 0))
        self.assertEqual(jobs, ["_thdReadWhole"])

    def test_wrongSizeRepaired(self) -> None:
        """
        A small copy of the wrong size is set aside as bad, saying so, and
        made again.
        """
        info = self.put("k", b"precious bytes")
        self.replicate("b")
        with open(self.path("b", info), "ab") as f:
            f.write(b"!")
        scrubber = self.scrubber("b", CHUNK_SIZE)
        self.cluster.reactor.advance(0.5)
        self.assertEqual(scrubber.bad, 1)
        self.assertIn(f"{info.path} has 15 bytes, not 14", scrubber.last_bad)
        with open(self.path("b", info), "rb") as f:
            self.assertEqual(f.read(), b"precious bytes")

    def test_deletedMeanwhile(self) -> None:
        """
        A file whose bytes went because it was deleted is not a bad copy.
        """
        info = self.put("k", b"going")
        server = self.cluster.servers["a"]
        page = self.cluster.flush(server.store.held_files("a", 0, 10))
        self.cluster.flush(server.node.delete("test", "k"))
        scrubber = Scrubber(server.node, self.cluster.reactor, CHUNK_SIZE, INTERVAL)
        self.cluster.flush(scrubber._check(page[0]))
        self.assertEqual((scrubber.bad, scrubber.files_checked), (0, 1))
        self.assertFalse(os.path.exists(self.path("a", info)))


class ScrubRateOptionTests(SynchronousTestCase):
    """
    C{--scrub-rate}: bytes a second, 0 to turn the scrub off.
    """

    def config(self, *argv: str) -> ServerConfig:
        options = Options()
        options.parseOptions(["--data", self.mktemp(), *argv])
        return options.server_config

    def test_rate(self) -> None:
        self.assertEqual(self.config().scrub_rate, 10 * 1024 * 1024)
        self.assertEqual(self.config("--scrub-rate", "0").scrub_rate, 0)
        self.assertEqual(self.config("--scrub-rate", "1000").scrub_rate, 1000)
        for bad in ("-1", "fast", "nan"):
            self.assertRaises(UsageError, self.config, "--scrub-rate", bad)


class PeerTimeoutOptionTests(SynchronousTestCase):
    """
    C{--peer-timeout}: how long a request to a peer may go without a frame.
    """

    def test_option(self) -> None:
        options = Options()
        options.parseOptions(["--data", self.mktemp()])
        self.assertEqual(options.server_config.peer_timeout, 30)
        options = Options()
        options.parseOptions(["--data", self.mktemp(), "--peer-timeout", "2.5"])
        self.assertEqual(options.server_config.peer_timeout, 2.5)
        for bad in ("0", "-1", "soon"):
            self.assertRaises(
                UsageError, Options().parseOptions, ["--data", self.mktemp(), "--peer-timeout", bad]
            )
