"""
Tests of the replicator in memory: servers of a L{MemoryCluster} sharing
one SQLite file and one clock, copying files over iosim connections.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from koboldfs.interfaces import FileInfo
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.replicator import RESCAN, Replicator
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

    def replicator(self, name: str, **options: int) -> Replicator:
        """
        Start the replicator of server C{name}: its first pass runs now.
        """
        server = self.cluster.servers[name]
        replicator = Replicator(server.node, self.cluster.reactor, INTERVAL, **options)
        self.replicators[name] = replicator
        replicator.start()
        self.addCleanup(lambda: self.cluster.flush(replicator.stop()))
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

    def file_rows(self) -> int:
        with sqlite3.connect(os.path.join(self.root, "metadata.sqlite")) as db:
            return db.execute("SELECT count(*) FROM files").fetchone()[0]

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
        self.cluster.flush(self.replicator("b").stop())
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

    def test_rescan(self) -> None:
        """
        A copy lost behind the cursor (quarantined, say) is made again by
        the periodic pass from the first id, not by every pass.
        """
        for server in self.cluster.servers.values():
            server.config.down_after = 2 * RESCAN
        info = self.put("k", b"again")
        self.replicator("b")
        node = self.cluster.servers["b"].node
        self.cluster.flush(node.replica_failed(self.lookup("k"), "a test"))
        self.advance(INTERVAL)
        self.assertIsNone(self.on_disk("b", info))
        # In two steps, so that connections the peer closed as idle are
        # seen closed before the rescan.
        self.advance(RESCAN - 2 * INTERVAL)
        self.assertIsNone(self.on_disk("b", info))
        self.advance(INTERVAL)
        self.assertEqual(self.on_disk("b", info), b"again")

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
