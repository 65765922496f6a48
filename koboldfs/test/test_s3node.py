"""
Tests of what the server core (L{koboldfs.node}) does for the S3 front
end, through L{INode} as a front end calls it: puts that compute an MD5
and record attributes and conditions, copies, multipart uploads.  Real
storage and SQLite metadata in memory (L{MemoryServer}, L{MemoryCluster}).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutput
from twisted.trial.unittest import SynchronousTestCase, TestCase

from koboldfs.attributes import AttributesTooLarge
from koboldfs.deferredclient import DeferredClient
from koboldfs.errors import ChecksumMismatch, NotFound, PreconditionFailed
from koboldfs.interfaces import FileInfo, INode
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.storage import relpath_names
from koboldfs.tap import Options, makeService
from koboldfs.test.cluster import CHECKOUT, ClusterMixin, ServerProcess
from koboldfs.test.test_forwarding import FakeProducer as Producer
from koboldfs.test.test_node import Sink
from koboldfs.test.support import eventually
from koboldfs.testing import MemoryCluster, MemoryServer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def stored_fids(root: str) -> set[str]:
    """
    The fids of every file published under data directory C{root}.
    """
    found = set()
    for directory, _, names in os.walk(root):
        for name in names:
            fid = relpath_names(os.path.relpath(os.path.join(directory, name), root))
            if fid is not None:
                found.add(fid)
    return found


class PutTests(SynchronousTestCase):
    """
    Puts with an MD5, attributes and conditions, on one server.
    """

    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.node: INode = self.server.node

    def wait(self, d: Any) -> Any:
        return self.server.flush(d)

    def put(self, key: str, body: bytes, **finish: Any) -> FileInfo:
        stream = self.node.put("ns", key, len(body), Producer(), md5=True)
        for i in range(0, len(body), CHUNK_SIZE):
            stream.write(body[i : i + CHUNK_SIZE])
        try:
            info: FileInfo = self.wait(stream.finish(None, **finish))
        finally:
            self.assertEqual(self.node.uploads, 0)
        return info

    def test_md5AndAttributes(self) -> None:
        """
        The MD5 is computed as the bytes stream in (a body of several
        chunks too), checked against the client's, and recorded with the
        attributes: the ETag is the MD5, and lookup returns both.
        """
        body = os.urandom(3 * CHUNK_SIZE + 5)
        attributes = {"content-type": "image/png", "x-amz-meta-who": "me"}
        info = self.put("k", body, md5=md5(body), attributes=attributes)
        self.assertEqual((info.md5, info.etag, info.sha256), (md5(body), md5(body), sha(body)))
        found = self.wait(self.node.lookup("ns", "k"))
        self.assertEqual(dict(found.attributes), attributes)
        self.assertEqual(found.etag, md5(body))
        listed = self.wait(self.node.list_files("ns", "", None, 5000))
        self.assertEqual([(i.key, i.etag) for i in listed], [("k", md5(body))])

    def test_md5Mismatch(self) -> None:
        """
        A body whose MD5 is not the client's is refused and nothing is
        published: no file, no bytes left on disk.
        """
        body = b"hello"
        with self.assertRaises(ChecksumMismatch):
            self.put("k", body, md5=md5(b"other"))
        with self.assertRaises(NotFound):
            self.wait(self.node.lookup("ns", "k"))
        self.assertEqual(stored_fids(self.server.storage.root), set())

    def test_attributesTooLarge(self) -> None:
        """
        Over 2 KiB of user metadata is refused before anything is kept;
        the upload's slot is freed.
        """
        with self.assertRaises(AttributesTooLarge):
            self.put("k", b"x", attributes={"x-amz-meta-big": "v" * 3000})
        with self.assertRaises(NotFound):
            self.wait(self.node.lookup("ns", "k"))

    def test_conditions(self) -> None:
        """
        A put if absent writes once; a put if match replaces only that
        version.  The refused put's bytes are not kept.
        """
        first = self.put("k", b"one", if_absent=True)
        with self.assertRaises(PreconditionFailed):
            self.put("k", b"two", if_absent=True)
        with self.assertRaises(PreconditionFailed):
            self.put("k", b"two", if_match=md5(b"nope"))
        second = self.put("k", b"two", if_match=first.etag)
        self.assertEqual(self.wait(self.node.lookup("ns", "k")).fid, second.fid)
        self.assertEqual(stored_fids(self.server.storage.root), {first.fid, second.fid})

    def test_binaryPutHasNoMD5(self) -> None:
        """
        A put without C{md5} (the binary protocol's) records none: its
        ETag is the SHA-256 form.
        """
        stream = self.node.put("ns", "k", 3, Producer())
        stream.write(b"abc")
        info = self.wait(stream.finish(sha(b"abc")))
        self.assertIsNone(info.md5)
        self.assertEqual(info.etag, f"{sha(b'abc')}-0")


class ForwardedPutTests(SynchronousTestCase):
    """
    A put with attributes to a namespace that wants copies on two hosts.
    """

    def test_forwarded(self) -> None:
        """
        The copies are made on the way in and the file is recorded once,
        with its MD5 and attributes, held by both hosts.
        """
        cluster = MemoryCluster(os.path.abspath(self.mktemp()), ["a", "b"])
        self.addCleanup(cluster.stop)
        a: INode = cluster.servers["a"].node
        cluster.flush(a.store.set_namespace("ns", min_copies=2))
        body = os.urandom(CHUNK_SIZE + 1)
        stream = a.put("ns", "k", len(body), Producer(), md5=True)
        stream.write(body)
        # No SHA-256 from the client (S3's unsigned payloads): the peer's
        # digest is checked against ours instead.
        info = cluster.flush(stream.finish(None, md5=md5(body), attributes={"content-type": "a/b"}))
        self.assertEqual(info.sha256, sha(body))
        self.assertEqual(info.replicas, ("a", "b"))
        self.assertEqual(info.md5, md5(body))
        b = cluster.servers["b"].node
        found = cluster.flush(b.lookup("ns", "k"))
        self.assertEqual(dict(found.attributes), {"content-type": "a/b"})
        sink = Sink()
        cluster.flush(cluster.flush(b.get(found, local=True)).send(sink))
        self.assertEqual(sink.data, body)


class RealServersTests(ClusterMixin, TestCase):
    """
    The put path of S3, with attributes, between real servers: this
    process's core (standing for the S3 front end, which calls it) forwards
    its copy to a C{twistd koboldfs} process on another host, and that
    process serves the file, its content type included, to the binary
    client and the C{koboldfs stat} command.
    """

    async def startLocal(self, db: str, peer: ServerProcess) -> INode:
        base = os.path.abspath(self.mktemp())
        options = Options()
        options.parseOptions(
            [
                "--name=a",
                "--host=a",
                f"--data={os.path.join(base, 'data')}",
                "--listen=tcp:0:interface=127.0.0.1",
                "--http=tcp:0:interface=127.0.0.1",
                "--heartbeat=1",
                "--down-after=5",
                f"--db={db}",
            ]
        )
        service = makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        node: INode = service.node
        await eventually(lambda: node.up("a") is not None, what="the local server registered")

        async def both_up() -> bool:
            await node.refresh_servers()
            return node.up(peer.name) is not None

        await eventually(both_up, what=f"{peer.name} seen up")
        return node

    async def test_putWithAttributes(self) -> None:
        """
        The file is on both hosts when the put is acknowledged, with its
        MD5 as its ETag; the peer process serves its bytes and its content
        type; a body that fails its MD5 is not published.
        """
        db = f"sqlite:///{os.path.abspath(self.mktemp())}.sqlite"
        b = await self.startServer("b", db=db)
        node = await self.startLocal(db, b)
        await node.store.set_namespace("ns", min_copies=2)
        body = os.urandom(3 * CHUNK_SIZE + 11)
        producer = Producer()
        stream = node.put("ns", "photo.png", len(body), producer, md5=True)
        for i in range(0, len(body), CHUNK_SIZE):
            stream.write(body[i : i + CHUNK_SIZE])
        info = await stream.finish(
            None, md5=md5(body), attributes={"content-type": "image/png", "x-amz-meta-k": "v"}
        )
        self.assertEqual(info.replicas, ("a", "b"))
        self.assertEqual(info.etag, md5(body))

        client = DeferredClient("ns", [b.address], reactor)
        self.addCleanup(client.close)
        received = io.BytesIO()
        self.assertTrue(await client.get("photo.png", received))
        self.assertEqual(received.getvalue(), body)
        stat = await client.stat("photo.png")
        assert stat is not None
        self.assertEqual(stat.content_type, "image/png")
        env = {**os.environ, "PYTHONPATH": CHECKOUT}
        out = await getProcessOutput(
            sys.executable,
            [
                "-c",
                "from koboldfs.cli import main; raise SystemExit(main())",
                "stat",
                "-s",
                b.address,
                "-n",
                "ns",
                "photo.png",
            ],
            env=env,
        )
        self.assertIn("type:      image/png", out.decode())

        # A body whose MD5 is not the client's is not published.
        stream = node.put("ns", "bad.png", 3, Producer(), md5=True)
        stream.write(b"abc")
        with self.assertRaises(ChecksumMismatch):
            await stream.finish(None, md5=md5(b"abd"))
        self.assertIsNone(await client.stat("bad.png"))
