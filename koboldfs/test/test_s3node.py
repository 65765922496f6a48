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
from koboldfs.errors import ChecksumMismatch, MultipartError, NotFound, PreconditionFailed
from koboldfs.interfaces import FileInfo, INode, UploadInfo
from koboldfs.multipart import MIN_PART_SIZE
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


class MultipartTests(SynchronousTestCase):
    """
    Multipart uploads and copies on a cluster of three hosts, each part
    taken by another server, the object assembled by a third.
    """

    def setUp(self) -> None:
        self.cluster = MemoryCluster(os.path.abspath(self.mktemp()), ["a", "b", "c"])
        self.addCleanup(self.cluster.stop)
        self.nodes: dict[str, INode] = {
            name: server.node for name, server in self.cluster.servers.items()
        }

    def wait(self, d: Any) -> Any:
        return self.cluster.flush(d)

    def part(self, node: INode, upload: UploadInfo, number: int, body: bytes) -> FileInfo:
        stream = node.upload_part(upload, number, len(body), Producer())
        for i in range(0, len(body), CHUNK_SIZE):
            stream.write(body[i : i + CHUNK_SIZE])
        info: FileInfo = self.wait(stream.finish(None, md5=md5(body)))
        return info

    def read(self, node: INode, info: FileInfo) -> bytes:
        sink = Sink()
        self.wait(self.wait(node.get(info)).send(sink))
        return sink.data

    def test_complete(self) -> None:
        """
        Parts put to different servers are assembled by a third into one
        ordinary file with S3's multipart ETag and the upload's
        attributes; the parts are discarded, and the upload is gone.
        """
        a, b = self.nodes["a"], self.nodes["b"]
        upload = self.wait(a.create_upload("ns", "big.bin", {"content-type": "x/y"}))
        one, two = os.urandom(MIN_PART_SIZE), os.urandom(1000)
        p1 = self.part(a, upload, 1, one)
        p2 = self.part(b, upload, 2, two)
        # Each on its server and a second host (the default wants two
        # copies when there are several hosts).
        self.assertEqual((len(p1.replicas), len(p2.replicas)), (2, 2))
        self.assertIn("a", p1.replicas)
        self.assertIn("b", p2.replicas)
        self.assertEqual((p1.md5, p2.md5), (md5(one), md5(two)))
        # Assembled by the server that lacks part 1: it is relayed.
        (other,) = set(self.nodes) - set(p1.replicas)
        c = self.nodes[other]
        info = self.wait(c.complete_upload(upload.upload_id, [(1, f'"{p1.etag}"'), (2, p2.etag)]))
        expected = hashlib.md5(bytes.fromhex(md5(one)) + bytes.fromhex(md5(two))).hexdigest()
        self.assertEqual(info.etag, f"{expected}-2")
        self.assertEqual((info.size, info.sha256), (len(one) + len(two), sha(one + two)))
        self.assertEqual(
            (info.part_range(1), info.part_range(2)), ((0, len(one)), (len(one), 1000))
        )
        self.assertEqual(len(info.replicas), 2)
        self.assertIn(other, info.replicas)
        self.assertEqual(dict(info.attributes or {}), {"content-type": "x/y"})
        self.assertEqual(self.read(a, self.wait(a.lookup("ns", "big.bin"))), one + two)
        self.assertIsNone(self.wait(a.store.find_upload(upload.upload_id)))
        for part in (p1, p2):
            deleted = self.wait(a.store.deleted_files(part.replicas[0], 0, 10))
            self.assertIn(part.fid, [i.fid for i in deleted])

    def test_refused(self) -> None:
        """
        A completion is refused, and nothing published, for parts out of
        order, a wrong ETag, a part under 5 MiB that is not the last, no
        part, or an upload that is not there.
        """
        a = self.nodes["a"]
        upload = self.wait(a.create_upload("ns", "k", None))
        p1 = self.part(a, upload, 1, b"small")
        p2 = self.part(a, upload, 2, b"last")
        for parts, code in (
            ([(2, p2.etag), (1, p1.etag)], "InvalidPartOrder"),
            ([(1, p1.etag), (1, p1.etag)], "InvalidPartOrder"),
            ([(1, p2.etag)], "InvalidPart"),
            ([(3, p2.etag)], "InvalidPart"),
            ([(1, p1.etag), (2, p2.etag)], "EntityTooSmall"),
            ([], "MalformedXML"),
        ):
            with self.assertRaises(MultipartError) as caught:
                self.wait(a.complete_upload(upload.upload_id, parts))
            self.assertEqual(caught.exception.s3_code, code, parts)
        with self.assertRaises(MultipartError) as caught:
            self.wait(a.complete_upload("0" * 32, [(1, p1.etag)]))
        self.assertEqual(caught.exception.s3_code, "NoSuchUpload")
        with self.assertRaises(MultipartError):
            a.upload_part(upload, 10_001, 1, Producer())
        # A single small part is a whole object.
        info = self.wait(a.complete_upload(upload.upload_id, [(1, p1.etag)]))
        self.assertEqual(self.read(a, info), b"small")
        self.assertEqual(a.uploads, 0)

    def test_abortAndSweep(self) -> None:
        """
        An aborted upload's parts are discarded; a part for it is then
        refused and its bytes not kept.  The sweep aborts uploads older
        than the timeout.
        """
        a = self.nodes["a"]
        upload = self.wait(a.create_upload("ns", "k", None))
        part = self.part(a, upload, 1, b"x")
        self.assertEqual(self.wait(a.abort_upload(upload.upload_id)), 1)
        self.assertEqual([i.fid for i in self.wait(a.store.deleted_files("a", 0, 10))], [part.fid])
        with self.assertRaises(MultipartError):
            self.part(a, upload, 2, b"y")
        old = self.wait(a.create_upload("ns", "old", None))
        self.assertEqual(self.wait(a.multipart.sweep()), 0)
        self.cluster.reactor.advance(a.config.s3_upload_timeout + 1)
        self.assertEqual(self.wait(a.multipart.sweep()), 1)
        self.assertIsNone(self.wait(a.store.find_upload(old.upload_id)))

    def test_copy(self) -> None:
        """
        A copy is a new version with new attributes and the same bytes (a
        copy onto itself too, S3's REPLACE); a file put without an MD5 gets
        one by its copy.  A part may be copied from a range of a file.
        """
        a, b = self.nodes["a"], self.nodes["b"]
        body = os.urandom(2 * CHUNK_SIZE + 7)
        stream = a.put("ns", "src", len(body), Producer())
        stream.write(body)
        source = self.wait(stream.finish(sha(body)))
        self.assertIsNone(source.md5)
        copied = self.wait(b.copy(source, "ns", "src", {"content-type": "a/b"}))
        self.assertNotEqual(copied.fid, source.fid)
        self.assertEqual((copied.md5, copied.sha256), (md5(body), source.sha256))
        self.assertEqual(dict(copied.attributes or {}), {"content-type": "a/b"})
        self.assertEqual(self.wait(a.lookup("ns", "src")).fid, copied.fid)
        kept = self.wait(a.copy(copied, "ns", "dst"))
        self.assertEqual(kept.attributes, copied.attributes)
        self.assertEqual(self.read(b, kept), body)
        with self.assertRaises(PreconditionFailed):
            self.wait(a.copy(copied, "ns", "dst", if_absent=True))
        upload = self.wait(a.create_upload("ns", "parted", None))
        part = self.wait(a.copy_part(upload, 1, kept, CHUNK_SIZE, 10))
        self.assertEqual(part.file.md5, md5(body[CHUNK_SIZE : CHUNK_SIZE + 10]))
        info = self.wait(a.complete_upload(upload.upload_id, [(1, part.etag)]))
        self.assertEqual(self.read(a, info), body[CHUNK_SIZE : CHUNK_SIZE + 10])
