"""
Tests of the server core (L{koboldfs.node}) through its interface
(L{INode}), as a front end uses it: no frames, no HTTP.  Real storage and
metadata in memory (L{MemoryServer}, L{MemoryCluster}).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from koboldfs.binaryserver import ServerProtocol, _FrameSink
from koboldfs.errors import Busy, CorruptReplica, ErrorCode, NotFound, ServerError, Unavailable
from koboldfs.events import Listeners
from koboldfs.interfaces import FileInfo, IBodySink, INode
from koboldfs.node import Node
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.test.test_forwarding import FakeProducer as Producer
from koboldfs.testing import MemoryCluster, MemoryServer
from koboldfs.web import ResponseSink


@implementer(IBodySink)
class Sink:
    """
    Collects a body, and what the body source told it.
    """

    frame = None

    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = b""
        self.gone = False

    def begin(self) -> None:
        self.events.append("begin")

    def write(self, data: bytes) -> Deferred[None] | None:
        self.events.append("write")
        self.data += data
        return None

    def abort(self) -> None:
        self.events.append("abort")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class InterfaceTests(SynchronousTestCase):
    def test_node(self) -> None:
        """
        L{Node} provides L{INode}: the surface every front end may rely on.
        """
        server = MemoryServer(os.path.abspath(self.mktemp()))
        self.assertTrue(verifyObject(INode, server.node))

    def test_sinks(self) -> None:
        """
        The binary protocol's and HTTP's sinks provide L{IBodySink}, as
        the test sink here does.
        """
        info = FileInfo(1, "f" * 32, "ns", "k", 0, sha(b""), 0.0, "files/x")
        server = MemoryServer(os.path.abspath(self.mktemp()))
        protocol = ServerProtocol(server.node, server.metrics)
        self.assertTrue(verifyObject(IBodySink, _FrameSink(protocol, info)))

        class Request:
            def notifyFinish(self) -> Deferred[None]:
                return Deferred()

        self.assertTrue(verifyObject(IBodySink, ResponseSink(Request())))  # type: ignore[arg-type]
        self.assertTrue(verifyObject(IBodySink, Sink()))


class NodeTests(SynchronousTestCase):
    """
    One server alone: puts as streams, gets as body sources.
    """

    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.node: INode = self.server.node
        self.lost: list[FileInfo] = []
        self.node.replica_lost.add(self.lost.append)

    def wait(self, d: Any) -> Any:
        return self.server.flush(d)

    def put(self, key: str, body: bytes, chunk: int = CHUNK_SIZE) -> FileInfo:
        producer = Producer()
        stream = self.node.put("ns", key, len(body), producer)
        for i in range(0, len(body), chunk):
            stream.write(body[i : i + chunk])
        info: FileInfo = self.wait(stream.finish(sha(body)))
        self.assertEqual(self.node.uploads, 0)
        return info

    def get(self, info: FileInfo, **options: Any) -> Sink:
        sink = Sink()
        body = self.wait(self.node.get(info, **options))
        self.wait(body.send(sink))
        return sink

    def test_put_and_get(self) -> None:
        """
        A put written as a stream is published with the client's checksum;
        its body source sends exactly its bytes, after one begin.
        """
        for body in (b"small", os.urandom(2 * CHUNK_SIZE + 5)):
            info = self.put("k", body, chunk=1000)
            self.assertEqual(
                (info.size, info.sha256, info.replicas), (len(body), sha(body), ("memory",))
            )
            found = self.wait(self.node.lookup("ns", "k"))
            self.assertEqual(found.fid, info.fid)
            sink = self.get(found)
            self.assertEqual(sink.data, body)
            self.assertEqual(sink.events[0], "begin")
            self.assertNotIn("abort", sink.events)

    def test_ranges(self) -> None:
        """
        A body source sends a byte range of our copy: what an HTTP or S3
        front end asks for.
        """
        body = os.urandom(2 * CHUNK_SIZE + 5)
        info = self.put("k", body)
        for first, length in ((0, 1), (10, 100), (CHUNK_SIZE - 3, 10), (len(body) - 4, None)):
            sink = self.get(info, first=first, length=length)
            end = len(body) if length is None else first + length
            self.assertEqual(sink.data, body[first:end])
        with self.assertRaises(ServerError):
            self.wait(self.node.get(info, first=len(body) + 1))

    def test_checksum_mismatch(self) -> None:
        """
        A put whose bytes do not match the client's checksum publishes
        nothing, and frees its slot.
        """
        stream = self.node.put("ns", "k", 3, Producer())
        stream.write(b"abc")
        with self.assertRaises(ServerError):
            self.wait(stream.finish(sha(b"abd")))
        self.assertEqual(self.node.uploads, 0)
        with self.assertRaises(NotFound):
            self.wait(self.node.lookup("ns", "k"))

    def test_busy_and_abort(self) -> None:
        """
        Past the upload limit a put is refused at once; an aborted one
        frees its slot and keeps nothing.
        """
        self.server.config.max_uploads = 1
        first = self.node.put("ns", "a", None, Producer())
        first.write(b"part")
        self.assertRaises(Busy, self.node.put, "ns", "b", None, Producer())
        first.abort()
        first.abort()
        self.assertEqual(self.node.uploads, 0)
        self.assertEqual(os.listdir(os.path.join(self.server.storage.root, "tmp")), [])
        self.put("b", b"now")

    def test_delete_and_list(self) -> None:
        for key in ("a", "b", "c"):
            self.put(key, key.encode())
        self.assertEqual(self.wait(self.node.list_keys("ns", "", "a", 10)), ["b", "c"])
        self.wait(self.node.delete("ns", "b"))
        self.assertEqual(self.wait(self.node.list_keys("ns", "", None, 10)), ["a", "c"])
        with self.assertRaises(NotFound):
            self.wait(self.node.delete("ns", "b"))

    def test_corrupt_part_way(self) -> None:
        """
        A copy found bad as it is read: the sink is told before the error
        is raised, the last chunk never written; the copy is set aside and
        the listeners told, so that it is made again.
        """
        body = os.urandom(2 * CHUNK_SIZE + 5)
        info = self.put("k", body)
        path = self.server.storage.abspath(info.path)
        with open(path, "r+b") as f:
            f.seek(len(body) - 1)
            f.write(bytes([body[-1] ^ 1]))
        sink = Sink()
        source = self.wait(self.node.get(info))
        with self.assertRaises(CorruptReplica):
            self.wait(source.send(sink))
        self.assertEqual(sink.events[-1], "abort")
        self.assertLess(len(sink.data), len(body))
        self.assertEqual([i.fid for i in self.lost], [info.fid])
        self.assertFalse(os.path.exists(path))
        self.assertEqual(self.wait(self.node.lookup("ns", "k")).replicas, ())

    def test_missing_copy(self) -> None:
        """
        With our copy gone from disk and no peer, the get finds out before
        a byte is sent: set aside, and, ours being the only copy, the file
        is lost (DATA_LOST, not the retryable UNAVAILABLE of an outage).
        """
        info = self.put("k", os.urandom(CHUNK_SIZE + 1))
        os.remove(self.server.storage.abspath(info.path))
        with self.assertRaises(NotFound):
            self.wait(self.node.get(info, local=True))
        self.assertEqual([i.fid for i in self.lost], [info.fid])
        sink = Sink()
        with self.assertRaises(ServerError) as caught:
            self.wait(self.wait(self.node.get(info)).send(sink))
        self.assertIs(caught.exception.code, ErrorCode.DATA_LOST)
        self.assertFalse(caught.exception.retryable)
        self.assertEqual(sink.events, [])

    def test_transaction(self) -> None:
        """
        A put in a transaction is seen by it alone until the commit.
        """
        txn = self.wait(self.node.begin_txn("ns"))["txn"]
        stream = self.node.put("ns", "k", 2, Producer(), txn=txn)
        stream.write(b"tx")
        self.wait(stream.finish(sha(b"tx")))
        self.assertEqual(self.wait(self.node.lookup("ns", "k", txn)).size, 2)
        with self.assertRaises(NotFound):
            self.wait(self.node.lookup("ns", "k"))
        self.assertEqual(self.wait(self.node.commit_txn(txn, False))["published"], 1)
        self.assertEqual(self.get(self.wait(self.node.lookup("ns", "k"))).data, b"tx")


class ClusterTests(SynchronousTestCase):
    """
    The core on a cluster: forwarded puts and relayed gets.
    """

    def setUp(self) -> None:
        self.cluster = MemoryCluster(os.path.abspath(self.mktemp()), ["a", "b", "c"])
        self.addCleanup(self.cluster.stop)

    def test_refused_at_once(self) -> None:
        """
        A put that cannot reach its copies (more asked than hosts alive) is
        refused by L{INode.put} itself, the client's producer resumed and
        its slot freed.
        """
        node = self.cluster.servers["a"].node
        self.cluster.flush(node.store.set_namespace("ns", min_copies=4))
        producer = Producer()
        with self.assertRaises(Unavailable):
            node.put("ns", "k", 1, producer)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertEqual(node.uploads, 0)

    def test_relay_fails_over(self) -> None:
        """
        A server holding no copy relays one from a peer that has it,
        trying the next when one cannot be reached, and can send a range.
        """
        servers = self.cluster.servers
        body = os.urandom(2 * CHUNK_SIZE + 3)
        b, c = servers["b"], servers["c"]
        self.cluster.flush(b.store.set_namespace("ns", min_copies=1))
        client = b.client("ns", retries=0)
        self.assertTrue(self.cluster.flush(client.put("k", body)))
        self.cluster.flush(client.close())
        info = self.cluster.flush(b.node.lookup("ns", "k"))
        # C holds a copy too.
        os.makedirs(os.path.dirname(c.storage.abspath(info.path)))
        shutil.copy(b.storage.abspath(info.path), c.storage.abspath(info.path))
        self.cluster.flush(c.store.add_replica(info.id, "c", 0.0))
        a: Node = servers["a"].node
        info = self.cluster.flush(a.lookup("ns", "k"))
        self.assertEqual(info.replicas, ("b", "c"))
        # B, tried first, refuses every connection; C answers.
        self.patch(random, "shuffle", lambda peers: peers.sort(key=lambda s: s.name))
        b.config.max_connections = 0
        for first, length in ((0, None), (CHUNK_SIZE - 1, 7)):
            sink = Sink()
            source = self.cluster.flush(a.get(info, first=first, length=length))
            self.cluster.flush(source.send(sink))
            end = len(body) if length is None else first + length
            self.assertEqual(sink.data, body[first:end])
            self.assertEqual(sink.events.count("begin"), 1)

    def test_relay_peer_fails_before_body(self) -> None:
        """
        A peer that fails before sending any of the body (its copy is
        gone; or it hung, and its reply's deadline passed) is passed over
        for the next holder: nothing had gone out yet.
        """
        servers = self.cluster.servers
        body = os.urandom(CHUNK_SIZE + 5)
        b, c = servers["b"], servers["c"]
        self.cluster.flush(b.store.set_namespace("ns", min_copies=1))
        client = b.client("ns", retries=0)
        self.assertTrue(self.cluster.flush(client.put("k", body)))
        self.cluster.flush(client.close())
        info = self.cluster.flush(b.node.lookup("ns", "k"))
        os.makedirs(os.path.dirname(c.storage.abspath(info.path)))
        shutil.move(b.storage.abspath(info.path), c.storage.abspath(info.path))
        self.cluster.flush(c.store.add_replica(info.id, "c", 0.0))
        a: Node = servers["a"].node
        info = self.cluster.flush(a.lookup("ns", "k"))
        self.patch(random, "shuffle", lambda peers: peers.sort(key=lambda s: s.name))
        sink = Sink()
        source = self.cluster.flush(a.get(info))
        self.cluster.flush(source.send(sink))
        self.assertEqual(sink.data, body)
        self.assertEqual(sink.events.count("begin"), 1)
        self.assertNotIn("abort", sink.events)


class ListenersTests(SynchronousTestCase):
    def test_each_told(self) -> None:
        """
        Every listener is told, in order, even after one raised (logged);
        a removed one is not.
        """
        listeners: Listeners[int] = Listeners()
        heard: list[tuple[str, int]] = []

        def bad(n: int) -> None:
            raise RuntimeError("listener bug")

        listeners.add(lambda n: heard.append(("one", n)))
        listeners.add(bad)
        remove = listeners.add(lambda n: heard.append(("three", n)))
        listeners(1)
        remove()
        listeners(2)
        self.assertEqual(heard, [("one", 1), ("three", 1), ("one", 2)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
