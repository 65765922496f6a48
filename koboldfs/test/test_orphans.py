"""
Tests of the orphan sweep (L{koboldfs.orphans}) on a real storage
directory and metadata, in memory: what no row names and is old enough
goes; everything else stays.
"""

from __future__ import annotations

import os
import time

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.orphans import GRACE, INTERVAL, OrphanSweeper
from koboldfs.storage import new_fid, relpath_for
from koboldfs.testing import MemoryCluster, MemoryServer

#: How far the sweep's clock is ahead of the files' mtimes in these tests.
LATER = GRACE + 60


class OrphanSweeperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()), "a")
        self.server.start()
        self.addCleanup(self.server.stop)
        self.root = self.server.storage.root
        # Wall-clock time, LATER ahead: files written now are old to it.
        self.clock = Clock()
        self.clock.advance(time.time() + LATER)

    def sweeper(self, **options: float) -> OrphanSweeper:
        return OrphanSweeper(self.server.node, self.clock, **options)

    def sweep(self, sweeper: OrphanSweeper | None = None) -> int:
        return self.server.flush((sweeper or self.sweeper()).sweep())

    def write(self, relpath: str, body: bytes = b"bytes", age: float = 0.0) -> str:
        """
        Put a file at C{relpath} under the root, last modified C{age}
        seconds before now.
        """
        path = os.path.join(self.root, *relpath.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)
        if age:
            stamp = time.time() - age
            os.utime(path, (stamp, stamp))
        return path

    def put(self, key: str, body: bytes) -> str:
        client = self.server.client()
        self.assertTrue(self.server.flush(client.put(key, body)))
        self.server.flush(client.close())
        info = self.server.flush(self.server.store.lookup("test", key))
        return os.path.join(self.root, *info.path.split("/"))

    def test_orphan_removed(self) -> None:
        """
        A stored file no row names, older than the grace period, goes, in
        files/ and in private/ alike.
        """
        public = self.write(relpath_for(new_fid(), "a.txt"))
        private = self.write(relpath_for(new_fid(), "b", private="ns"))
        self.assertEqual(self.sweep(), 2)
        self.assertFalse(os.path.exists(public))
        self.assertFalse(os.path.exists(private))

    def test_recorded_kept(self) -> None:
        """
        Files with a row stay, live or deleted (a deleted one is the
        replicator's to reclaim), however old.
        """
        live = self.put("live", b"live")
        deleted = self.put("deleted", b"deleted")
        self.server.flush(self.server.store.delete("test", "deleted", time.time()))
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(os.path.exists(live))
        self.assertTrue(os.path.exists(deleted))

    def test_young_kept(self) -> None:
        """
        A file modified within the grace period may be a put between its
        rename and its commit: it stays.
        """
        young = self.write(relpath_for(new_fid(), "a"))
        sweeper = OrphanSweeper(self.server.node, self.clock, grace=LATER + 3600)
        self.assertEqual(self.sweep(sweeper), 0)
        self.assertTrue(os.path.exists(young))

    def test_other_names_kept(self) -> None:
        """
        What is not named like a stored file is not ours to judge.
        """
        fid = new_fid()
        odd = [
            self.write(f"files/{fid[0:2]}/{fid[2:4]}/README"),
            self.write(f"files/{fid[0:2]}/{fid[2:4]}/{fid}.TXT"),
            self.write(f"files/zz/{fid[2:4]}/{fid}"),
            self.write(f"quarantine/{fid}"),
        ]
        self.assertEqual(self.sweep(), 0)
        for path in odd:
            self.assertTrue(os.path.exists(path), path)

    def test_tmp(self) -> None:
        """
        Stale files in tmp/ go; a young one, and an upload still open
        however old its temp file, stay.
        """
        stale = self.write("tmp/crashed.part")
        young = self.write("tmp/young.part", age=-LATER)
        upload = self.server.storage.open_upload(relpath_for(new_fid(), "k"))
        upload.write(b"x" * (2 * 1024 * 1024))  # flushed to its temp file
        self.assertTrue(os.path.exists(upload.tmppath))
        self.assertEqual(self.sweep(), 1)
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(young))
        self.assertTrue(os.path.exists(upload.tmppath))
        self.server.flush(upload.abort())
        self.assertEqual(self.server.storage.open_uploads, set())

    def test_many(self) -> None:
        """
        Pages of fids are asked of the metadata: orphans among recorded
        files over several pages all go, the recorded ones stay.
        """
        kept = [self.put(f"k{i}", b"kept") for i in range(5)]
        orphans = [self.write(relpath_for(new_fid(), "x")) for _ in range(7)]
        self.assertEqual(self.sweep(self.sweeper(batch=2)), 7)
        self.assertTrue(all(os.path.exists(p) for p in kept))
        self.assertFalse(any(os.path.exists(p) for p in orphans))

    def test_schedule(self) -> None:
        """
        A sweep runs at start, then every interval; an orphan left between
        sweeps goes at the next.
        """
        sweeper = self.sweeper()
        first = self.write(relpath_for(new_fid(), "a"))
        sweeper.startService()
        self.server.pump()
        self.assertFalse(os.path.exists(first))
        second = self.write(relpath_for(new_fid(), "a"))
        self.clock.advance(INTERVAL - 1)
        self.server.pump()
        self.assertTrue(os.path.exists(second))
        self.clock.advance(1)
        self.server.pump()
        self.assertFalse(os.path.exists(second))
        self.assertEqual(sweeper.removed, 2)
        self.server.flush(sweeper.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_database_down(self) -> None:
        """
        If the metadata cannot be asked, nothing is removed and the sweep
        says it removed nothing (and logs why) rather than failing.
        """
        orphan = self.write(relpath_for(new_fid(), "a"))
        self.server.store.known_fids = lambda fids: fail(
            Unavailable(ErrorCode.UNAVAILABLE, "database gone")
        )
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(os.path.exists(orphan))


class PeerOrphanTests(SynchronousTestCase):
    """
    A peer's copy of a put whose commit failed is removed by the peer's
    sweep.
    """

    def test_uncommitted_copy(self) -> None:
        cluster = MemoryCluster(os.path.abspath(self.mktemp()), ["a", "b"])
        self.addCleanup(cluster.stop)
        a, b = cluster.servers["a"], cluster.servers["b"]
        a.store.add_file = lambda *args, **kwargs: fail(
            Unavailable(ErrorCode.UNAVAILABLE, "database gone")
        )
        client = a.client(retries=0)
        self.addCleanup(lambda: cluster.flush(client.close()))
        with self.assertRaises(Unavailable):
            cluster.flush(client.put("k", b"never committed"))
        files = os.path.join(b.storage.root, "files")
        [copy] = [os.path.join(d, f) for d, _, fs in os.walk(files) for f in fs]
        clock = Clock()
        clock.advance(time.time() + LATER)
        self.assertEqual(cluster.flush(OrphanSweeper(b.node, clock).sweep()), 1)
        self.assertFalse(os.path.exists(copy))
