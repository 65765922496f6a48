"""
End-to-end tests of replication: real C{twistd koboldfs} servers sharing
one metadata database (SQLite, and PostgreSQL when the environment gives
one), copying files between their data directories over loopback.

The scenarios of issue 4 are L{Scenarios}: a writer killed and caught up,
flipped bytes never served and repaired, peers killed or hung in the middle
of a copy, a drained server, deletes reaching a server that was down, and
a new server backfilling 1,000 files.  Those where the metadata backend
matters (notifications, the cursor) run on both backends.

A put to one of several servers (on distinct C{--host}s) is forwarded to a
second one as it arrives (L{koboldfs.forwarding}), so a copy found on a
second server may not be the replicator's.  Where the replicator's copy is
the subject, the namespace sets C{min_copies=1} (L{one_copy_per_put}), or
the copy is made by a server started after the put;
L{Scenarios.test_writer_killed} shows the two together.
"""

from __future__ import annotations

import http.client
import io
import os
import signal
import sqlite3
import time
import urllib.request
from typing import Any, Iterable

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.errors import ErrorCode
from koboldfs.interfaces import FileInfo
from koboldfs.metadata import store_from_url
from koboldfs.protocol import Data, FrameDecoder, Op, encode_message
from koboldfs.test.cluster import POSTGRES_URL, ClusterMixin, ServerProcess
from koboldfs.test.pgcluster import PostgresMixin, query
from koboldfs.test.test_end_to_end import files_on_disk, raw_connection
from koboldfs.test.support import eventually

#: Short passes, so that what SQLite does not notify is seen quickly.
FAST = ("--replicate-interval=0.5",)
#: Passes so rare that only PostgreSQL's notifications can explain a copy
#: or a reclaim within a test.
SLOW = ("--replicate-interval=300",)


async def one_copy_per_put(db: str, namespace: str = "demo") -> None:
    """
    Set C{namespace}'s C{min_copies} to 1, as C{koboldfs admin namespace
    set NAME --min-copies 1} does: its puts are not forwarded, so any
    other copy of its files is the replicator's.
    """
    store = store_from_url(db, reactor)
    await store.start()
    try:
        info = await store.set_namespace(namespace, min_copies=1)
        assert info.min_copies == 1
    finally:
        await store.stop()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ReplicationTests(ClusterMixin, TestCase):
    """
    Two servers on one SQLite file: every file reaches both, verified, and
    a deleted one leaves both, including one that was down at the time.
    Puts land on one server only (L{one_copy_per_put}): the second copy is
    the replicator's.
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
            await one_copy_per_put(self.db)
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
            await one_copy_per_put(self.db)
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
    The put lands on A only (L{one_copy_per_put}): B's copy is its
    replicator's, woken by the notification.
    """

    timeout = 120

    if POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    def test_notified(self) -> defer.Deferred[None]:
        async def run() -> None:
            assert POSTGRES_URL is not None
            db = await self.freshDatabase(POSTGRES_URL)
            await one_copy_per_put(db)
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


NAMESPACE = "demo"
#: The peers of the mid-copy tests: no scrub (it would hold the files
#: open too), a short timeout for a hung peer, and nobody taken as down,
#: so that only the timeout can get a copy past a hung peer.
PATIENT = ("--scrub-rate=0", "--peer-timeout=2", "--down-after=600")
#: A file big enough that copying it takes a while, to be caught mid-copy.
BIG = 32 * 1024 * 1024


def flip(path: str, offset: int = 0) -> None:
    """
    Invert one byte of a stored copy in place: same size, wrong bytes.
    """
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def on_disk(server: ServerProcess, info: FileInfo) -> bytes | None:
    """
    C{server}'s copy of a file, or None.
    """
    try:
        return read(os.path.join(server.data, info.path))
    except FileNotFoundError:
        return None


def has_open(server: ServerProcess, paths: Iterable[str]) -> bool:
    """
    Whether the server process has one of C{paths} open: a peer streaming
    a file holds it open until the last chunk is read.
    """
    assert server.process is not None
    fds = f"/proc/{server.process.pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(os.path.join(fds, fd)) in paths:
                return True
        except FileNotFoundError:
            pass
    return False


def _thdCatchCopy(
    receiver: ServerProcess, holders: list[ServerProcess], infos: list[FileInfo], timeout: float
) -> list[ServerProcess]:
    """
    Wait until C{receiver} has part of a copy in its C{tmp/}, then stop
    every holder with SIGSTOP and return those streaming one of C{infos}
    to it; the others are resumed.  An empty list: the copies got past
    us (or never began) before the deadline.
    """
    tmp = os.path.join(receiver.data, "tmp")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            partial = any(e.stat().st_size for e in os.scandir(tmp))
        except FileNotFoundError:
            partial = False
        if partial:
            for holder in holders:
                holder.signal(signal.SIGSTOP)
            sources = [
                h for h in holders if has_open(h, [os.path.join(h.data, i.path) for i in infos])
            ]
            for holder in holders:
                if holder not in sources:
                    holder.signal(signal.SIGCONT)
            return sources
        time.sleep(0.0005)
    return []


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def raw_get(server: ServerProcess, key: str) -> tuple[int, Any]:
    """
    GET C{key} from C{server}'s own copy over a raw connection: the body
    bytes it sent, and its last frame (END, or ERROR).
    """
    sock = raw_connection(server)
    try:
        sock.sendall(encode_message(Op.GET, {"ns": NAMESPACE, "key": key, "local": True}))
        decoder = FrameDecoder()
        received = 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                raise AssertionError(f"{server.name} closed the connection mid-GET")
            for frame in decoder.feed(data):
                if isinstance(frame, Data):
                    received += len(frame.payload)
                elif frame.op in (Op.END, Op.ERROR):
                    return received, frame
    finally:
        sock.close()


class Scenarios(ClusterMixin):
    """
    The issue's replication scenarios, on the metadata backend that
    L{database} gives.  C{PASSES} is the servers' pass interval: short on
    SQLite (other servers' changes are seen at the next pass), long on
    PostgreSQL (notifications must do it).
    """

    timeout = 180
    PASSES: tuple[str, ...] = FAST

    async def database(self) -> str:
        raise NotImplementedError

    async def setUpCluster(self) -> None:
        self.db = await self.database()
        self.store = store_from_url(self.db, reactor)
        await self.store.start()
        self.addCleanup(self.store.stop)  # type: ignore[attr-defined]

    def server(self, name: str, *extra: str, **kwargs: Any) -> defer.Deferred[ServerProcess]:
        return self.startServer(name, db=self.db, extra=self.PASSES + extra, **kwargs)

    def client(self, *servers: ServerProcess) -> DeferredClient:
        client = DeferredClient(NAMESPACE, [s.address for s in servers], reactor)
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client

    async def put_all(self, client: DeferredClient, bodies: dict[str, bytes]) -> None:
        for key, body in bodies.items():
            assert await client.put(key, body)

    async def lookup(self, key: str) -> FileInfo:
        info = await self.store.lookup(NAMESPACE, key)
        assert info is not None, f"no {key!r}"
        return info

    async def all_files(self) -> list[FileInfo]:
        """
        Every live file with its holders: the files a server of no name
        lacks.
        """
        files: list[FileInfo] = []
        while True:
            page = await self.store.missing_replicas("", files[-1].id if files else 0, 500)
            files.extend(page)
            if len(page) < 500:
                return files

    async def held_everywhere(
        self, bodies: dict[str, bytes], servers: Iterable[ServerProcess]
    ) -> bool:
        """
        Whether every server holds a recorded copy of each file with the
        right bytes on its disk.
        """
        for key, body in bodies.items():
            info = await self.lookup(key)
            for server in servers:
                if server.name not in info.replicas or on_disk(server, info) != body:
                    return False
        return True

    async def get(self, client: DeferredClient, key: str) -> bytes:
        out = io.BytesIO()
        assert await client.get(key, out), f"no {key!r}"
        return out.getvalue()

    def test_writer_killed(self) -> defer.Deferred[None]:
        """
        Forwarding and replication together: each file put to A is on A
        and one peer when its put is acknowledged (forwarded), and reaches
        the third from the replicator; with A killed (SIGKILL) every file
        reads through B and through C, files put and deleted meanwhile
        reach B and C; A returns and catches up: the new files copied, the
        deleted one gone from its disk and, with it, from the metadata.
        """

        async def run() -> None:
            await self.setUpCluster()
            b = await self.server("b")
            c = await self.server("c")

            async def registered() -> bool:
                return {"b", "c"} <= {s.name for s in await self.store.servers()}

            # A, started last, knows B and C from its first put on: every
            # put is forwarded.
            await eventually(registered, what="B and C registered")
            a = await self.server("a")
            before = {f"before/{i}": os.urandom(1000 * i + 1) for i in range(5)}
            before["before/big"] = os.urandom(3 * 1024 * 1024 + 7)
            client = self.client(a)
            for key, body in before.items():
                self.assertTrue(await client.put(key, body))
                # Recorded on A and a peer by the put itself; the third
                # copy can only come from a replicator.
                held = (await self.lookup(key)).replicas
                self.assertIn("a", held)
                self.assertGreaterEqual(len(held), 2, f"{key} not forwarded: {held}")
            await eventually(
                lambda: self.held_everywhere(before, [a, b, c]), what="every file on A, B and C"
            )
            doomed = await self.lookup("before/0")
            a.kill()
            for server in (b, c):
                client = self.client(server)
                for key, body in before.items():
                    self.assertEqual(await self.get(client, key), body)
            during = {f"during/{i}": os.urandom(5000 + i) for i in range(3)}
            await self.put_all(self.client(b, c), during)
            self.assertTrue(await self.client(c).delete("before/0"))
            del before["before/0"]
            await eventually(
                lambda: self.held_everywhere(during, [b, c]), what="new files on B and C"
            )
            await eventually(
                lambda: on_disk(b, doomed) is None and on_disk(c, doomed) is None,
                what="the deleted file gone from B and C",
            )
            self.assertIsNotNone(on_disk(a, doomed))
            await a.start()
            everything = {**before, **during}
            await eventually(
                lambda: self.held_everywhere(everything, [a, b, c]), what="A caught up"
            )

            async def reclaimed() -> bool:
                return on_disk(a, doomed) is None and not await self.store.deleted_files("a", 0, 10)

            await eventually(reclaimed, what="the deleted file gone from A and the metadata")
            for server in (a, b, c):
                self.assertEqual(len(files_on_disk(server)), len(everything))
            client = self.client(a)
            for key, body in everything.items():
                self.assertEqual(await self.get(client, key), body)

        return defer.ensureDeferred(run())

    def test_drain(self) -> defer.Deferred[None]:
        """
        In a namespace of two copies, draining A makes B and C copy what A
        held with one of them, so that afterwards A holds nothing that is
        nowhere else: every file has two good copies besides A's.
        """

        async def run() -> None:
            await self.setUpCluster()
            await self.store.set_namespace(NAMESPACE, replicas=2)
            a = await self.server("a")
            b = await self.server("b")
            c = await self.server("c")
            bodies = {f"k{i}": os.urandom(2000 + i) for i in range(8)}
            await self.put_all(self.client(a), bodies)

            async def two_copies() -> bool:
                files = await self.all_files()
                return len(files) == len(bodies) and all(len(f.replicas) >= 2 for f in files)

            await eventually(two_copies, what="two copies of every file")
            files = await self.all_files()
            # Every file is on A, where it was put, and on one other: the
            # drain has copies to make.
            self.assertTrue(all("a" in f.replicas for f in files))
            self.assertTrue(any(set(f.replicas) != {"a", "b", "c"} for f in files))
            self.assertTrue(await self.store.set_server_state("a", "drain"))

            async def drained() -> bool:
                return all({"b", "c"} <= set(f.replicas) for f in await self.all_files())

            await eventually(drained, what="every file on B and C")
            for info in await self.all_files():
                for server in (b, c):
                    self.assertEqual(on_disk(server, info), bodies[info.key])
            # And on disk: whatever A holds is also on B and on C.
            for path in files_on_disk(a):
                relpath = os.path.relpath(path, a.data)
                for server in (b, c):
                    self.assertEqual(read(os.path.join(server.data, relpath)), read(path))
            # A still serves reads.
            self.assertEqual(await self.get(self.client(a), "k3"), bodies["k3"])

        return defer.ensureDeferred(run())

    def test_backfill(self) -> defer.Deferred[None]:
        """
        A new, empty server copies all of 1,000 files by itself, each with
        the right bytes, and records every copy.
        """

        async def run() -> None:
            await self.setUpCluster()
            a = await self.server("a", "--scrub-rate=0")
            bodies = {f"f{i:04d}": os.urandom(64 + i) for i in range(1000)}
            clients = [self.client(a) for _ in range(4)]
            keys = list(bodies)
            await defer.gatherResults(
                [
                    defer.ensureDeferred(
                        self.put_all(client, {k: bodies[k] for k in keys[n :: len(clients)]})
                    )
                    for n, client in enumerate(clients)
                ],
                consumeErrors=True,
            )
            b = await self.server("b", "--scrub-rate=0")

            async def backfilled() -> bool:
                held = [f for f in await self.all_files() if "b" in f.replicas]
                return len(held) == len(bodies)

            await eventually(backfilled, timeout=120, what="1,000 copies on B")
            files = await self.all_files()
            self.assertEqual(len(files), len(bodies))
            for info in files:
                self.assertEqual(on_disk(b, info), bodies[info.key])
            self.assertEqual(len(files_on_disk(b)), len(bodies))
            self.assertEqual(files_on_disk(b, "tmp"), [])

        return defer.ensureDeferred(run())


class SQLiteScenarios(Scenarios, TestCase):
    """
    The scenarios on one SQLite file shared by every server, with short
    passes; and those where the backend does not matter.
    """

    async def database(self) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        return f"sqlite:///{base}/shared.sqlite"

    def test_flipped_bytes(self) -> defer.Deferred[None]:
        """
        A copy whose bytes were flipped on disk is never served whole, over
        the binary protocol or HTTP: the read that finds it out ends in an
        error, the copy is set aside and made again from a good one.  The
        scrub finds one nobody reads, and it is repaired the same way.
        """

        async def run() -> None:
            await self.setUpCluster()
            a = await self.server("a", "--scrub-rate=0")
            b = await self.server("b", "--scrub-rate=0")
            body = os.urandom(3 * 1024 * 1024 + 17)
            await self.put_all(self.client(a), {"k": body})
            await eventually(lambda: self.held_everywhere({"k": body}, [a, b]), what="B's copy")
            info = await self.lookup("k")
            path = os.path.join(b.data, info.path)
            # Each bad copy is kept: the first under the fid's name, then .1, .2...
            quarantine = os.path.join(b.data, "quarantine")
            versions = iter([""] + [f".{n}" for n in range(1, 10)])
            quarantined = ""

            def corrupt(offset: int) -> bytes:
                nonlocal quarantined
                quarantined = os.path.join(quarantine, os.path.basename(info.path) + next(versions))
                flip(path, offset)
                return read(path)

            async def repaired(bad: bytes) -> bool:
                # This bad copy set aside, and a good one in its place.
                return (
                    os.path.exists(quarantined)
                    and read(quarantined) == bad
                    and await self.held_everywhere({"k": body}, [a, b])
                )

            # The binary protocol: the last chunk is withheld, ERROR instead.
            bad = corrupt(1000)
            received, last = await deferToThread(raw_get, b, "k")
            self.assertEqual(last.op, Op.ERROR)
            self.assertEqual(last["code"], ErrorCode.CORRUPT)
            self.assertLess(received, len(body))
            await eventually(lambda: repaired(bad), what="B's copy repaired after a GET")
            # A client reading through B gets the good bytes meanwhile.
            bad = corrupt(len(body) - 1)
            self.assertEqual(await self.get(self.client(b), "k"), body)
            await eventually(lambda: repaired(bad), what="B's copy repaired after a client's read")

            # HTTP: the connection is cut before the end of the body.
            bad = corrupt(5)
            url = f"{b.http}/{info.path}"
            with self.assertRaises((http.client.IncompleteRead, ConnectionError)):
                await deferToThread(http_get, url)
            await eventually(lambda: repaired(bad), what="B's copy repaired after an HTTP GET")
            self.assertEqual(await deferToThread(http_get, url), body)

            # The scrub, at a rate that reads the file in well under a second.
            await b.stop()
            bad = corrupt(2 * 1024 * 1024)
            b.extra = (*FAST, "--scrub-rate=100000000")
            await b.start()
            await eventually(lambda: repaired(bad), what="B's copy repaired after the scrub")
            self.assertEqual(len(os.listdir(quarantine)), 4)

        return defer.ensureDeferred(run())

    def test_peers_killed_and_hung_mid_copy(self) -> defer.Deferred[None]:
        """
        A peer killed (SIGKILL) while it streams a file to a new server,
        and later peers stopped (SIGSTOP) mid-stream: the copier moves on
        to another holder, at once for the killed one, after
        C{--peer-timeout} for the hung ones; no file is lost, and the
        stopped ones serve again once resumed.  A copier killed mid-copy
        records nothing, and copies everything once back.
        """

        async def run() -> None:
            await self.setUpCluster()
            a = await self.server("a", *PATIENT)
            b = await self.server("b", *PATIENT)
            bodies = {"big1": os.urandom(BIG)}
            await self.put_all(self.client(a), bodies)
            await eventually(lambda: self.held_everywhere(bodies, [a, b]), what="big1 on A and B")
            big1 = await self.lookup("big1")

            # Killed.
            c = await self.server("c", *PATIENT)
            sources = await deferToThread(_thdCatchCopy, c, [a, b], [big1], 30)
            self.assertEqual(len(sources), 1, "the copy to C was not caught in the middle")
            [killed] = sources
            self.assertNotIn("c", (await self.lookup("big1")).replicas)
            killed.kill()
            await eventually(lambda: self.held_everywhere(bodies, [c]), what="big1 on C")
            self.assertEqual(files_on_disk(c, "tmp"), [])
            await killed.start()

            # Hung.
            bodies["big2"] = os.urandom(BIG)
            await self.put_all(self.client(c), {"big2": bodies["big2"]})
            await eventually(
                lambda: self.held_everywhere(bodies, [a, b, c]), what="both files on A, B, C"
            )
            big2 = await self.lookup("big2")
            d = await self.server("d", *PATIENT)
            hung = await deferToThread(_thdCatchCopy, d, [a, b, c], [big1, big2], 30)
            self.assertTrue(hung, "the copies to D were not caught in the middle")
            self.assertLess(len(hung), 3)
            await eventually(lambda: self.held_everywhere(bodies, [d]), what="both files on D")
            self.assertEqual(files_on_disk(d, "tmp"), [])
            for server in hung:
                server.signal(signal.SIGCONT)

            # The copier killed: nothing half-copied is ever recorded or
            # left behind, and it copies everything when it returns.
            e = await self.server("e", *PATIENT)
            sources = await deferToThread(_thdCatchCopy, e, [a, b, c, d], [big1, big2], 30)
            self.assertTrue(sources, "the copies to E were not caught in the middle")
            e.kill()
            for server in sources:
                server.signal(signal.SIGCONT)
            self.assertTrue(files_on_disk(e, "tmp"))
            for key, body in bodies.items():
                info = await self.lookup(key)
                if "e" in info.replicas:
                    # Finished just before the kill: then it is whole.
                    self.assertEqual(on_disk(e, info), body)
            await e.start()
            servers = [a, b, c, d, e]
            await eventually(lambda: self.held_everywhere(bodies, [e]), what="both files on E")
            self.assertEqual(files_on_disk(e, "tmp"), [])
            self.assertTrue(await self.held_everywhere(bodies, servers))
            for server in servers:
                client = self.client(server)
                for key, body in bodies.items():
                    self.assertEqual(await self.get(client, key), body)

        return defer.ensureDeferred(run())


class PostgresScenarios(PostgresMixin, Scenarios, TestCase):
    """
    The scenarios on PostgreSQL, with passes so rare that only its
    notifications can explain a copy or a reclaim.
    """

    PASSES = SLOW

    if POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    async def database(self) -> str:
        assert POSTGRES_URL is not None
        return await self.freshDatabase(POSTGRES_URL)
