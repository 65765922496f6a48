"""
End-to-end tests: real C{twistd koboldfs} processes on loopback, driven by
the real clients and by raw sockets playing a misbehaving client.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import urllib.request

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from koboldfs import Client
from koboldfs.client import DeferredClient
from koboldfs.errors import ChecksumMismatch, InvalidKey, InvalidNamespace
from koboldfs.protocol import VERSION, FrameDecoder, Op, encode_data, encode_message
from koboldfs.test.pgcluster import create_database, drop_database
from koboldfs.test.cluster import POSTGRES_URL, ClusterMixin, ServerProcess
from koboldfs.test.support import eventually, free_port


def files_on_disk(server: ServerProcess, area: str = "files") -> list[str]:
    found = []
    for dirpath, _, names in os.walk(os.path.join(server.data, area)):
        found.extend(os.path.join(dirpath, n) for n in names)
    return found


def raw_connection(server: ServerProcess) -> socket.socket:
    """
    A hand-driven connection, past the handshake.
    """
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(encode_message(Op.HELLO, {"versions": [VERSION]}))
    decoder = FrameDecoder()
    frames: list = []
    while not frames:
        frames = decoder.feed(sock.recv(65536))
    assert frames[0].op is Op.WELCOME, frames
    return sock


class SampleTests(ClusterMixin, TestCase):
    """
    The README's sample, as printed, against two servers sharing one SQLite
    database: what the seed promised its users.
    """

    timeout = 120

    async def _sample(self, db: str | None) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        db = db or f"sqlite:///{base}/shared.sqlite"
        a = await self.startServer("a", db=db)
        b = await self.startServer("b", db=db)
        motd = os.path.join(base, "motd")
        with open(motd, "wb") as f:
            f.write(b"Linux kobold 6.1.0 #1 SMP\nWelcome.\n")

        def sample() -> None:
            client = Client("demo", servers=[a.address, b.address])
            self.assertIs(client.ping(), True)
            self.assertIs(client.put("motd", motd), True)
            out = io.BytesIO()
            self.assertIs(client.get("motd", out), True)
            self.assertEqual(out.getvalue(), open(motd, "rb").read())
            url = client.get_url("motd")
            self.assertTrue(url.startswith("http://"), url)
            with urllib.request.urlopen(url) as response:
                self.assertEqual(response.read(), open(motd, "rb").read())
            # The other server answers for the same key.
            other = Client("demo", servers=[b.address, a.address])
            out2 = io.BytesIO()
            self.assertIs(other.get("motd", out2), True)
            self.assertEqual(out2.getvalue(), out.getvalue())
            self.assertIs(client.delete("motd"), True)
            self.assertIs(client.get("motd", out), False)
            self.assertIsNone(client.get_url("motd"))
            self.assertIs(client.delete("motd"), False)
            self.assertIsNone(client.stat("motd"))
            client.close()
            other.close()

        await deferToThread(sample)

    def test_sample_sqlite(self) -> defer.Deferred[None]:
        """
        Two servers, one SQLite file: the embedded default scaled to two.
        """
        return defer.ensureDeferred(self._sample(None))

    def test_sample_postgresql(self) -> defer.Deferred[None]:
        """
        Two servers, one PostgreSQL database: the production setup.
        """

        async def sample() -> None:
            assert POSTGRES_URL is not None
            url = await create_database(POSTGRES_URL)
            self.addCleanup(lambda: defer.ensureDeferred(drop_database(url)))
            await self._sample(url)

        return defer.ensureDeferred(sample())

    if not POSTGRES_URL:
        test_sample_postgresql.skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"


class ClientTests(ClusterMixin, TestCase):
    """
    The Deferred client against one real server.
    """

    timeout = 120

    async def _client(self, *servers: ServerProcess, **kwargs) -> DeferredClient:
        client = DeferredClient("demo", [s.address for s in servers], reactor, **kwargs)
        self.addCleanup(client.close)
        return client

    def test_round_trip_sources(self) -> defer.Deferred[None]:
        """
        Bytes, a path and a file object are all accepted; a 9 MiB body
        spans several DATA frames and comes back byte for byte.
        """

        async def run() -> None:
            server = await self.startServer("s")
            client = await self._client(server)
            body = os.urandom(9 * 1024 * 1024 + 17)
            path = os.path.abspath(self.mktemp())
            with open(path, "wb") as f:
                f.write(body)
            self.assertTrue(await client.put("bytes", body))
            self.assertTrue(await client.put("path", path))
            with open(path, "rb") as f:
                self.assertTrue(await client.put("file", f))
            self.assertTrue(await client.put("empty", b""))
            for key in ("bytes", "path", "file"):
                out = io.BytesIO()
                self.assertTrue(await client.get(key, out))
                self.assertEqual(
                    hashlib.sha256(out.getvalue()).digest(), hashlib.sha256(body).digest()
                )
            out = io.BytesIO()
            self.assertTrue(await client.get("empty", out))
            self.assertEqual(out.getvalue(), b"")
            stat = await client.stat("path")
            self.assertEqual(
                (stat.size, stat.sha256, stat.servers),
                (len(body), hashlib.sha256(body).hexdigest(), ("s",)),
            )

        return defer.ensureDeferred(run())

    def test_overwrite_and_list(self) -> defer.Deferred[None]:
        """
        Overwriting gives readers the new version; list pages through
        keys in order, across more keys than one page.
        """

        async def run() -> None:
            server = await self.startServer("s")
            client = await self._client(server)
            await client.put("k", b"one")
            await client.put("k", b"two")
            out = io.BytesIO()
            await client.get("k", out)
            self.assertEqual(out.getvalue(), b"two")
            keys = [f"item/{i:03d}" for i in range(25)]
            for key in keys:
                await client.put(key, key.encode())
            self.assertEqual(await client.list("item/", limit=10), keys[:10])
            self.assertEqual(await client.list("item/", after=keys[9], limit=10), keys[10:20])
            self.assertEqual(await client.list("item/", after=keys[19]), keys[20:])
            self.assertEqual(await client.list("nothing"), [])

        return defer.ensureDeferred(run())

    def test_bad_names_refused_before_sending(self) -> defer.Deferred[None]:
        """
        A bad key or namespace raises a ValueError in the client, before
        any connection is made (the server port here is closed).
        """
        self.assertRaises(InvalidNamespace, DeferredClient, "bad/ns", ["127.0.0.1:1"], reactor)
        client = DeferredClient("demo", ["127.0.0.1:1"], reactor)
        self.addCleanup(client.close)
        for key in ("", "a\0b", "x" * 1025, "\udc80"):
            self.assertRaises(InvalidKey, client.put, key, b"")
            self.assertRaises(ValueError, client.stat, key)
        return defer.succeed(None)

    def test_failover(self) -> defer.Deferred[None]:
        """
        A listed server that is down is skipped: the sample lists two
        servers and works with either one running.
        """

        async def run() -> None:
            server = await self.startServer("s")
            dead = f"127.0.0.1:{free_port()}"
            client = DeferredClient("demo", [dead, server.address, dead], reactor, backoff=0.01)
            self.addCleanup(client.close)
            for i in range(4):
                self.assertTrue(await client.put(f"k{i}", b"x"))
                self.assertTrue(await client.ping())
            none = DeferredClient("demo", [dead], reactor, retries=1, backoff=0.01)
            self.addCleanup(none.close)
            self.assertFalse(await none.ping())

        return defer.ensureDeferred(run())

    def test_server_checks_names(self) -> defer.Deferred[None]:
        """
        A client that skips its own checks gets an error frame, and the
        connection goes on serving.
        """

        async def run() -> None:
            server = await self.startServer("s")

            def talk() -> list:
                sock = raw_connection(server)
                sock.sendall(encode_message(Op.STAT, {"ns": "bad/ns", "key": "k"}))
                sock.sendall(encode_message(Op.STAT, {"ns": "ok", "key": ""}))
                sock.sendall(encode_message(Op.PING))
                decoder, frames = FrameDecoder(), []
                while len(frames) < 3:
                    frames += decoder.feed(sock.recv(65536))
                sock.close()
                return frames

            frames = await deferToThread(talk)
            self.assertEqual([f.op for f in frames], [Op.ERROR, Op.ERROR, Op.OK])
            self.assertEqual([f["code"] for f in frames[:2]], [5, 6])

        return defer.ensureDeferred(run())

    def test_malformed_frame_closes_only_that_connection(self) -> defer.Deferred[None]:
        """
        Garbage gets an ERROR frame and a closed connection; the server
        keeps serving other clients.
        """

        async def run() -> None:
            server = await self.startServer("s")
            client = await self._client(server)

            def garbage() -> list:
                sock = raw_connection(server)
                sock.sendall(b"\x00\x00\x00\x02\x99{}")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                sock.close()
                return FrameDecoder().feed(data)

            frames = await deferToThread(garbage)
            self.assertEqual(frames[0].op, Op.ERROR)
            self.assertEqual(frames[0]["code"], 2)
            self.assertTrue(await client.put("still", b"serving"))

        return defer.ensureDeferred(run())

    def test_checksum_mismatch_refused(self) -> defer.Deferred[None]:
        """
        A body whose END checksum does not match is refused, and nothing
        is published or left on disk.
        """

        async def run() -> None:
            server = await self.startServer("s")

            def bad_put() -> list:
                sock = raw_connection(server)
                sock.sendall(encode_message(Op.PUT, {"ns": "demo", "key": "k", "size": 5}))
                sock.sendall(encode_data(b"hello"))
                sock.sendall(encode_message(Op.END, {"sha256": "0" * 64}))
                decoder, frames = FrameDecoder(), []
                while not frames:
                    frames = decoder.feed(sock.recv(65536))
                sock.close()
                return frames

            [reply] = await deferToThread(bad_put)
            self.assertEqual((reply.op, reply["code"]), (Op.ERROR, 8))
            client = await self._client(server)
            self.assertIsNone(await client.stat("k"))
            self.assertEqual(files_on_disk(server), [])
            self.assertEqual(files_on_disk(server, "tmp"), [])

        return defer.ensureDeferred(run())


class CrashTests(ClusterMixin, TestCase):
    """
    Uploads cut short, by the client or by the server dying, leave no file
    and no metadata row.
    """

    timeout = 120

    def _partial_upload(self, server: ServerProcess) -> socket.socket:
        sock = raw_connection(server)
        sock.sendall(encode_message(Op.PUT, {"ns": "demo", "key": "partial", "size": 10**8}))
        for _ in range(8):
            sock.sendall(encode_data(os.urandom(1024 * 1024)))
        return sock

    def test_client_vanishes_mid_upload(self) -> defer.Deferred[None]:
        """
        The client disconnects after 8 MiB of 100 MB: the temp file goes,
        no row is written, and the server goes on serving.
        """

        async def run() -> None:
            server = await self.startServer("s")
            sock = await deferToThread(self._partial_upload, server)
            await eventually(lambda: files_on_disk(server, "tmp"), what="temp file")
            sock.close()
            await eventually(lambda: not files_on_disk(server, "tmp"), what="temp file removal")
            client = DeferredClient("demo", [server.address], reactor)
            self.addCleanup(client.close)
            self.assertIsNone(await client.stat("partial"))
            self.assertEqual(files_on_disk(server), [])
            self.assertTrue(await client.put("after", b"fine"))

        return defer.ensureDeferred(run())

    def test_server_killed_mid_upload(self) -> defer.Deferred[None]:
        """
        SIGKILL mid-upload, then a restart on the same data: no partial
        file is visible, the leftover temp file is cleared, and acknowledged
        files are all there.
        """

        async def run() -> None:
            server = await self.startServer("s")
            client = DeferredClient("demo", [server.address], reactor, backoff=0.05)
            self.addCleanup(client.close)
            await client.put("acknowledged", b"safe")
            sock = await deferToThread(self._partial_upload, server)
            await eventually(lambda: files_on_disk(server, "tmp"), what="temp file")
            server.kill()
            sock.close()
            await server.start()
            self.assertEqual(files_on_disk(server, "tmp"), [])
            self.assertIsNone(await client.stat("partial"))
            out = io.BytesIO()
            self.assertTrue(await client.get("acknowledged", out))
            self.assertEqual(out.getvalue(), b"safe")
            self.assertEqual(len(files_on_disk(server)), 1)

        return defer.ensureDeferred(run())

    def test_sigterm_stops_cleanly(self) -> defer.Deferred[None]:
        """
        SIGTERM stops a server with an upload in flight: it exits, and the
        upload left nothing visible.
        """

        async def run() -> None:
            server = await self.startServer("s")
            sock = await deferToThread(self._partial_upload, server)
            await eventually(lambda: files_on_disk(server, "tmp"), what="temp file")
            code = await server.stop()
            sock.close()
            self.assertIn(code, (0, -signal.SIGTERM, 128 + signal.SIGTERM))
            self.assertEqual(files_on_disk(server), [])

        return defer.ensureDeferred(run())

    def test_corrupt_replica_not_served(self) -> defer.Deferred[None]:
        """
        Bytes flipped on disk: the read fails with a checksum error rather
        than return wrong bytes.
        """

        async def run() -> None:
            server = await self.startServer("s")
            client = DeferredClient("demo", [server.address], reactor, retries=0)
            self.addCleanup(client.close)
            body = os.urandom(3 * 1024 * 1024)
            await client.put("victim", body)
            [path] = files_on_disk(server)
            with open(path, "r+b") as f:
                f.seek(2 * 1024 * 1024)
                f.write(b"\xff\x00\xff")
            out = io.BytesIO()
            error = await self.assertFailure(client.get("victim", out), ChecksumMismatch)
            self.assertIn("CORRUPT", str(error) + repr(error.code))

        return defer.ensureDeferred(run())
