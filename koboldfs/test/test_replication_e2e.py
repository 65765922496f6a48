"""
End-to-end tests of replication: real C{twistd koboldfs} servers sharing
one metadata database (SQLite, and PostgreSQL when the environment gives
one), copying files between their data directories over loopback.
"""

from __future__ import annotations

import io
import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.test.cluster import POSTGRES_URL, ClusterMixin, ServerProcess
from koboldfs.test.pgcluster import PostgresMixin, query
from koboldfs.test.test_end_to_end import eventually, files_on_disk

#: Short passes, so that what SQLite does not notify is seen quickly.
FAST = ("--replicate-interval=0.5",)
#: Passes so rare that only PostgreSQL's notifications can explain a copy
#: or a reclaim within a test.
SLOW = ("--replicate-interval=300",)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ReplicationTests(ClusterMixin, TestCase):
    """
    Two servers on one SQLite file: every file reaches both, verified, and
    a deleted one leaves both, including one that was down at the time.
    """

    timeout = 120

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.db_path = os.path.join(self.base, "shared.sqlite")
        self.db = f"sqlite:///{self.db_path}"

    def client(self, *servers: ServerProcess) -> DeferredClient:
        client = DeferredClient("demo", [s.address for s in servers], reactor)
        self.addCleanup(client.close)
        return client

    def file_rows(self) -> int:
        with sqlite3.connect(self.db_path) as db:
            return db.execute("SELECT count(*) FROM files").fetchone()[0]

    async def replicated(self, client: DeferredClient, key: str, *servers: ServerProcess) -> None:
        names = tuple(sorted(s.name for s in servers))

        async def held() -> bool:
            stat = await client.stat(key)
            return stat is not None and stat.servers == names

        await eventually(held, timeout=15, what=f"{key} on {', '.join(names)}")

    def test_copy_and_delete(self) -> defer.Deferred[None]:
        """
        A put to A reaches B's disk, byte for byte, within seconds; a delete
        then removes both copies and, with the last, the file's row.
        """

        async def run() -> None:
            a = await self.startServer("a", db=self.db, extra=FAST)
            b = await self.startServer("b", db=self.db, extra=FAST)
            client = self.client(a)
            body = os.urandom(3 * 1024 * 1024 + 5)
            self.assertTrue(await client.put("big.bin", body))
            await self.replicated(client, "big.bin", a, b)
            [copy] = files_on_disk(b)
            self.assertEqual(read(copy), body)
            self.assertEqual(files_on_disk(b, "tmp"), [])
            self.assertTrue(await client.delete("big.bin"))
            await eventually(
                lambda: not files_on_disk(a) and not files_on_disk(b) and not self.file_rows(),
                what="both copies and the row gone",
            )

        return defer.ensureDeferred(run())

    def test_down_during_delete(self) -> defer.Deferred[None]:
        """
        B serves a replicated file with A stopped; a delete made while A is
        down is done on A's disk when A returns, and the row goes then.
        """

        async def run() -> None:
            a = await self.startServer("a", db=self.db, extra=FAST)
            b = await self.startServer("b", db=self.db, extra=FAST)
            writer = self.client(a)
            self.assertTrue(await writer.put("k.txt", b"kept twice"))
            await self.replicated(writer, "k.txt", a, b)
            await a.stop()
            client = self.client(b)
            out = io.BytesIO()
            self.assertTrue(await client.get("k.txt", out))
            self.assertEqual(out.getvalue(), b"kept twice")
            self.assertTrue(await client.delete("k.txt"))
            await eventually(lambda: not files_on_disk(b), what="B's copy gone")
            self.assertEqual(len(files_on_disk(a)), 1)
            self.assertEqual(self.file_rows(), 1)
            await a.start()
            await eventually(
                lambda: not files_on_disk(a) and not self.file_rows(),
                what="A's copy and the row gone after A's return",
            )

        return defer.ensureDeferred(run())

    def test_corrupt_source_not_copied(self) -> defer.Deferred[None]:
        """
        A source copy whose bytes were flipped on disk is not replicated:
        the source quarantines it when B asks for it, and B keeps nothing.
        """

        async def run() -> None:
            a = await self.startServer("a", db=self.db, extra=FAST)
            client = self.client(a)
            self.assertTrue(await client.put("k.txt", b"precious bytes"))
            [path] = files_on_disk(a)
            with open(path, "r+b") as f:
                f.write(b"P")
            b = await self.startServer("b", db=self.db, extra=FAST)
            await eventually(lambda: files_on_disk(a, "quarantine"), what="A's copy quarantined")
            self.assertEqual(files_on_disk(b), [])
            self.assertEqual(files_on_disk(b, "tmp"), [])
            stat = await client.stat("k.txt")
            self.assertEqual(stat.servers, ())

        return defer.ensureDeferred(run())


class PostgresReplicationTests(PostgresMixin, ClusterMixin, TestCase):
    """
    Two servers on PostgreSQL, passes so rare that only LISTEN/NOTIFY can
    wake them: a put is copied, and a delete reclaimed, within seconds.
    """

    timeout = 120

    if POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    def test_notified(self) -> defer.Deferred[None]:
        async def run() -> None:
            assert POSTGRES_URL is not None
            db = await self.freshDatabase(POSTGRES_URL)
            a = await self.startServer("a", db=db, extra=SLOW)
            b = await self.startServer("b", db=db, extra=SLOW)
            client = DeferredClient("demo", [a.address], reactor)
            self.addCleanup(client.close)
            body = os.urandom(100_000)
            self.assertTrue(await client.put("k.bin", body))

            async def copied() -> bool:
                stat = await client.stat("k.bin")
                return stat is not None and stat.servers == ("a", "b")

            await eventually(copied, timeout=10, what="B's copy")
            [copy] = files_on_disk(b)
            self.assertEqual(read(copy), body)
            self.assertTrue(await client.delete("k.bin"))

            async def reclaimed() -> bool:
                [(rows,)] = await query(db, "SELECT count(*) FROM files")
                return not files_on_disk(a) and not files_on_disk(b) and rows == 0

            await eventually(reclaimed, timeout=10, what="both copies and the row gone")

        return defer.ensureDeferred(run())
