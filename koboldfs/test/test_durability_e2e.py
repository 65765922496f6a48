"""
End-to-end tests of write durability: real C{twistd koboldfs} servers on
distinct C{--host}s sharing one metadata database (SQLite, and PostgreSQL
when the environment gives one).  Replication passes are made so rare
that a copy on the second host when a put returns can only come from the
put itself.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.errors import Unavailable
from koboldfs.test.cluster import POSTGRES_URL, ClusterMixin, ServerProcess
from koboldfs.test.pgcluster import PostgresMixin, query
from koboldfs.test.test_end_to_end import files_on_disk
from koboldfs.test.support import eventually, sleep

#: No replication pass during a test: only the put can make a copy.
SLOW = ("--replicate-interval=300",)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object  # the concrete classes below are the test cases


class _DurabilityTests(ClusterMixin, _Base):
    """
    The tests, for a metadata database given by L{database}.
    """

    timeout = 120

    async def database(self) -> str:
        raise NotImplementedError

    async def sql(self, db: str, statement: str) -> list[tuple[Any, ...]]:
        if db.startswith("sqlite:///"):
            with sqlite3.connect(db[len("sqlite:///") :]) as conn:
                return conn.execute(statement).fetchall()
        return await query(db, statement)

    async def replicas(self, db: str) -> list[tuple[str, str]]:
        """
        Every (key, server) replica row, in order.
        """
        return sorted(
            await self.sql(
                db,
                "SELECT files.key, replicas.server FROM replicas "
                "JOIN files ON files.id = replicas.file_id "
                "JOIN namespaces ON namespaces.id = files.namespace_id "
                "WHERE namespaces.name = 'demo'",
            )
        )

    def client(self, *servers: ServerProcess, **options: Any) -> DeferredClient:
        client = DeferredClient("demo", [s.address for s in servers], reactor, **options)
        self.addCleanup(client.close)
        return client

    async def pair(self) -> tuple[str, ServerProcess, ServerProcess]:
        """
        A and B, each on a host of its own, once A knows B is up: puts of
        probe files in another namespace until one lands on both (a
        server learns of others when it starts and at each heartbeat).
        """
        db = await self.database()
        b = await self.startServer("b", db=db, host="host-b", extra=SLOW)
        a = await self.startServer("a", db=db, host="host-a", extra=SLOW)
        probe = DeferredClient("probe", [a.address], reactor)
        self.addCleanup(probe.close)
        n = 0

        async def both() -> bool:
            nonlocal n
            n += 1
            await probe.put(f"probe{n}", b"probe")
            stat = await probe.stat(f"probe{n}")
            return stat.servers == ("a", "b")

        await eventually(both, timeout=30, what="A to know B")
        return db, a, b

    def test_second_host_before_ack(self) -> defer.Deferred[None]:
        """
        When a put to A returns, B holds the bytes on its disk, verified,
        and both replica rows are committed.
        """

        async def run() -> None:
            db, a, b = await self.pair()
            probes = set(files_on_disk(a)), set(files_on_disk(b))
            client = self.client(a)
            body = os.urandom(5 * 1024 * 1024 + 3)
            self.assertTrue(await client.put("big.bin", body))
            self.assertEqual(await self.replicas(db), [("big.bin", "a"), ("big.bin", "b")])
            [copy] = set(files_on_disk(b)) - probes[1]
            self.assertEqual(read(copy), body)
            [original] = set(files_on_disk(a)) - probes[0]
            self.assertEqual(os.path.relpath(copy, b.data), os.path.relpath(original, a.data))
            self.assertEqual(files_on_disk(b, "tmp"), [])
            stat = await client.stat("big.bin")
            self.assertEqual(stat.servers, ("a", "b"))

        return defer.ensureDeferred(run())

    def test_first_put_of_fresh_cluster(self) -> defer.Deferred[None]:
        """
        The very first put after a fresh start is on both hosts when it is
        acknowledged, even on the server that started first and so saw
        no peer at its start; heartbeats and replication passes are made
        too rare to have told it since.
        """

        async def run() -> None:
            db = await self.database()
            rare = (*SLOW, "--heartbeat=300", "--down-after=900")
            a = await self.startServer("a", db=db, host="host-a", extra=rare)
            b = await self.startServer("b", db=db, host="host-b", extra=rare)
            # B answers only once registered (and A would too).
            self.assertTrue(await self.client(b).ping())
            body = os.urandom(2 * 1024 * 1024 + 5)
            self.assertTrue(await self.client(a, retries=0).put("first.bin", body))
            self.assertEqual(
                await self.replicas(db), [("first.bin", "a"), ("first.bin", "b")]
            )
            [copy] = files_on_disk(b)
            self.assertEqual(read(copy), body)
            [original] = files_on_disk(a)
            self.assertEqual(os.path.relpath(copy, b.data), os.path.relpath(original, a.data))

        return defer.ensureDeferred(run())

    def test_peer_killed(self) -> defer.Deferred[None]:
        """
        With B killed and the namespace requiring two copies, a put to A
        fails with an error that says why, and leaves nothing: no row, no
        bytes, no temp file.  Without the requirement, once A sees B down,
        a put keeps one copy.
        """

        async def run() -> None:
            db, a, b = await self.pair()
            client = self.client(a, retries=0)
            self.assertTrue(await client.put("first", b"on both"))
            await self.sql(db, "UPDATE namespaces SET min_copies = 2 WHERE name = 'demo'")
            kept = set(files_on_disk(a))
            b.kill()
            with self.assertRaises(Unavailable) as caught:
                await client.put("second", os.urandom(3 * 1024 * 1024))
            message = str(caught.exception)
            self.assertIn("needs copies on 2 distinct hosts", message)
            self.assertIn("cannot connect", message)
            self.assertEqual(await self.replicas(db), [("first", "a"), ("first", "b")])
            self.assertEqual(set(files_on_disk(a)), kept)
            self.assertEqual(files_on_disk(a, "tmp"), [])

            # Once A takes B for down (--down-after=5), it says so at once.
            async def alone() -> bool:
                try:
                    await client.put("third", b"x")
                except Unavailable as e:
                    return "only 1 host is alive" in str(e)
                raise AssertionError("a put needing two hosts succeeded on one")

            await eventually(alone, timeout=30, what="A to take B for down")
            await self.sql(db, "UPDATE namespaces SET min_copies = NULL WHERE name = 'demo'")
            self.assertTrue(await client.put("fourth", b"alone"))
            self.assertEqual(
                await self.replicas(db), [("first", "a"), ("first", "b"), ("fourth", "a")]
            )

        return defer.ensureDeferred(run())

    def test_peer_stopped(self) -> defer.Deferred[None]:
        """
        With B hung (SIGSTOP) and taken for down, a put needing two copies
        fails at once, saying so, and keeps nothing.
        """

        async def run() -> None:
            db, a, b = await self.pair()
            client = self.client(a, retries=0)
            self.assertTrue(await client.put("first", b"on both"))
            await self.sql(db, "UPDATE namespaces SET min_copies = 2 WHERE name = 'demo'")
            kept = set(files_on_disk(a))
            b.signal(signal.SIGSTOP)
            self.addCleanup(b.signal, signal.SIGCONT)

            # Until then, A would wait for B's answer for its peer timeout.
            async def silent() -> bool:
                [(beat,)] = await self.sql(db, "SELECT heartbeat FROM servers WHERE name = 'b'")
                # --down-after=5, and A refreshes what it knows every second.
                return time.time() - beat > 5 + 2

            await eventually(silent, timeout=30, what="B silent for longer than --down-after")
            with self.assertRaises(Unavailable) as caught:
                await client.put("second", os.urandom(3 * 1024 * 1024))
            self.assertIn("only 1 host is alive", str(caught.exception))
            self.assertEqual(await self.replicas(db), [("first", "a"), ("first", "b")])
            self.assertEqual(set(files_on_disk(a)), kept)
            self.assertEqual(files_on_disk(a, "tmp"), [])

        return defer.ensureDeferred(run())


def peak_rss(server: ServerProcess) -> int:
    """
    The most memory the server's process has held, in bytes (VmHWM).
    """
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


class SQLiteDurabilityTests(_DurabilityTests, TestCase):
    def test_peer_stalls(self) -> defer.Deferred[None]:
        """
        While B is stopped mid-put, A stops reading from the client rather
        than holding what B cannot take: A's memory grows by a small part
        of the file at most.  The put completes once B resumes.
        """

        async def run() -> None:
            db, a, b = await self.pair()
            size = 128 * 1024 * 1024
            source = os.path.abspath(self.mktemp())
            with open(source, "wb") as f:
                for _ in range(size // (1024 * 1024)):
                    f.write(os.urandom(1024 * 1024))
            before = peak_rss(a)
            client = self.client(a, retries=0)
            put = client.put("big.bin", source)

            def receiving() -> bool:
                return sum(map(os.path.getsize, files_on_disk(b, "tmp"))) >= 8 * 1024 * 1024

            await eventually(receiving, what="B receiving the copy")
            b.signal(signal.SIGSTOP)
            try:
                await sleep(3)
            finally:
                b.signal(signal.SIGCONT)
            self.assertTrue(await put)
            self.assertEqual(await self.replicas(db), [("big.bin", "a"), ("big.bin", "b")])
            self.assertLess(peak_rss(a) - before, 48 * 1024 * 1024)

        return defer.ensureDeferred(run())

    async def database(self) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        return f"sqlite:///{base}/shared.sqlite"


class PostgresDurabilityTests(_DurabilityTests, PostgresMixin, TestCase):
    if POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    async def database(self) -> str:
        assert POSTGRES_URL is not None
        return await self.freshDatabase(POSTGRES_URL)
