"""
Tests of write durability (L{koboldfs.forwarding}): the rules, with plain
records, and puts forwarded between the servers of a L{MemoryCluster}
(real storage, metadata and protocol, connected in memory).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.forwarding import SETUP_SPARE, UNREACHABLE_FOR, Forward, Gate
from koboldfs.errors import ChecksumMismatch, ConnectionFailed, ErrorCode, ServerError, Unavailable
from koboldfs.interfaces import FileInfo, NamespaceInfo
from koboldfs.protocol import CHUNK_SIZE, FrameDecoder, Message, Op, WriteFlow, encode_message
from koboldfs.placement import forward_targets
from koboldfs.config import ServerConfig
from koboldfs.binaryserver import ServerProtocol
from koboldfs.storage import PendingPut
from koboldfs.storage import relpath_for
from koboldfs.test.test_placement import NOW, server
from koboldfs.testing import MemoryCluster


class FakeProducer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class GateTests(SynchronousTestCase):
    """
    The client's connection is paused while any consumer lags, and
    resumed once none does.
    """

    def test_slowest_wins(self) -> None:
        producer = FakeProducer()
        gate = Gate(producer)
        disk, peer = gate.side("disk"), gate.side("peer")
        disk.pauseProducing()
        peer.pauseProducing()
        disk.pauseProducing()
        self.assertEqual(producer.calls, ["pause"])
        disk.resumeProducing()
        self.assertEqual(producer.calls, ["pause"])
        self.assertTrue(gate.paused)
        peer.resumeProducing()
        self.assertEqual(producer.calls, ["pause", "resume"])
        peer.resumeProducing()
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_closed(self) -> None:
        """
        Once its put is over, a gate no longer touches the connection: a
        late resume must not release the next put's pause.
        """
        producer = FakeProducer()
        gate = Gate(producer)
        gate.pause("peer")
        gate.close()
        gate.resume("peer")
        gate.pause("disk")
        self.assertEqual(producer.calls, ["pause"])


class _ClusterMixin:
    """
    A L{MemoryCluster} of servers called C{names}, each on a host of its
    own, and helpers.
    """

    names: list[str]

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.cluster = MemoryCluster(self.root, self.names)
        self.addCleanup(self.cluster.stop)

    def put(self, key: str, body: bytes, on: str = "a") -> bool:
        client = self.cluster.servers[on].client(retries=0)
        try:
            return self.cluster.flush(client.put(key, body))
        finally:
            self.cluster.flush(client.close())

    def lookup(self, key: str) -> FileInfo | None:
        return self.cluster.flush(self.cluster.servers["a"].store.lookup("test", key))

    def set_namespace(self, **settings: object) -> None:
        store = self.cluster.servers["a"].store
        self.cluster.flush(store.set_namespace("test", **settings))

    def on_disk(self, name: str, tree: str = "files") -> dict[str, bytes]:
        found = {}
        for directory, _, files in os.walk(os.path.join(self.root, name, tree)):
            for f in files:
                with open(os.path.join(directory, f), "rb") as fh:
                    found[f] = fh.read()
        return found

    def rows(self, table: str) -> int:
        with sqlite3.connect(os.path.join(self.root, "metadata.sqlite")) as db:
            return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def assertNothingKept(self) -> None:
        """
        No row, and no bytes on any disk: every failure these tests make
        happens before a peer's rename, so not even an orphan is left.
        """
        self.assertEqual(self.rows("files"), 0)
        self.assertEqual(self.rows("replicas"), 0)
        for name in self.cluster.servers:
            self.assertEqual(self.on_disk(name), {}, name)
            self.assertEqual(self.on_disk(name, "tmp"), {}, name)


class ForwardTests(_ClusterMixin, SynchronousTestCase):
    """
    Puts to a server of a cluster of two servers on distinct hosts.
    """

    names = ["a", "b"]

    def test_second_host_at_once(self) -> None:
        """
        When the put returns, the file is durable on B too, byte for byte
        at the same path, and both copies are recorded, in one commit: no
        replicator runs here.
        """
        body = os.urandom(3 * CHUNK_SIZE + 11)
        self.assertTrue(self.put("big.bin", body))
        info = self.lookup("big.bin")
        self.assertEqual(info.replicas, ("a", "b"))
        self.assertEqual(self.on_disk("a"), {os.path.basename(info.path): body})
        self.assertEqual(self.on_disk("b"), {os.path.basename(info.path): body})
        self.assertEqual(self.on_disk("b", "tmp"), {})

    def test_just_started(self) -> None:
        """
        A server that has not learnt who is registered yet (it has just
        started) looks before deciding: it does not take the put alone.
        """
        self.cluster.servers["a"].node._servers = {}
        self.assertTrue(self.put("k", b"early"))
        self.assertEqual(self.lookup("k").replicas, ("a", "b"))

    def test_peer_started_since(self) -> None:
        """
        A server whose last look found itself alone (B registered after
        it, before its next heartbeat) looks again before taking a put
        alone: the put is on both hosts when it returns.
        """
        node = self.cluster.servers["a"].node
        node._servers = {"a": node.servers["a"]}
        self.assertTrue(self.put("k", b"first"))
        info = self.lookup("k")
        assert info is not None
        self.assertEqual(info.replicas, ("a", "b"))
        self.assertEqual(list(self.on_disk("b").values()), [b"first"])
        self.assertIn("b", node.servers)

    def test_small(self) -> None:
        """
        A body that arrives with its END before the peer is connected
        waits for it.
        """
        self.assertTrue(self.put("s.txt", b"tiny"))
        self.assertEqual(self.lookup("s.txt").replicas, ("a", "b"))
        self.assertEqual(list(self.on_disk("b").values()), [b"tiny"])

    def test_private(self) -> None:
        """
        A private namespace's file goes to the same private path on both.
        """
        self.set_namespace(private=True)
        self.assertTrue(self.put("p.txt", b"secret"))
        info = self.lookup("p.txt")
        self.assertTrue(info.path.startswith("private/test/"))
        self.assertEqual(list(self.on_disk("b", "private").values()), [b"secret"])

    def test_namespace_one_copy(self) -> None:
        """
        A namespace asking for one copy is not forwarded.
        """
        self.set_namespace(min_copies=1)
        self.assertTrue(self.put("k", b"once"))
        self.assertEqual(self.lookup("k").replicas, ("a",))
        self.assertEqual(self.on_disk("b"), {})

    def test_more_than_hosts(self) -> None:
        """
        A namespace asking for more copies than there are live hosts fails
        the put at once with an error saying so; nothing is kept.
        """
        self.set_namespace(min_copies=3)
        with self.assertRaises(Unavailable) as caught:
            self.put("k", os.urandom(2 * CHUNK_SIZE))
        self.assertIn("needs copies on 3 distinct hosts", str(caught.exception))
        self.assertIn("only 2 hosts are alive", str(caught.exception))
        self.assertNothingKept()

    def test_peer_down(self) -> None:
        """
        With B silent for longer than down_after, A is alone: by default a
        put keeps one copy; a namespace that requires two fails it.
        """
        self.cluster.beat()
        self.cluster.reactor.advance(60)
        self.cluster.beat("a")
        self.assertTrue(self.put("one", b"alone"))
        self.assertEqual(self.lookup("one").replicas, ("a",))
        self.assertEqual(self.on_disk("b"), {})
        self.set_namespace(min_copies=2)
        with self.assertRaises(Unavailable) as caught:
            self.put("two", b"needs two")
        self.assertIn("only 1 host is alive", str(caught.exception))
        self.assertIsNone(self.lookup("two"))
        self.assertEqual(self.on_disk("a", "tmp"), {})

    def test_peer_unreachable(self) -> None:
        """
        A peer listed as up that cannot be reached: a namespace requiring
        two copies fails the put, with its reason, and nothing is kept; by
        default the peer is as good as down and the put keeps one copy.
        """
        peers = self.cluster.servers["a"].node.peers

        def unreachable(address: str) -> object:
            raise ConnectionRefusedError("refused")

        peers._endpoint = unreachable
        self.set_namespace(min_copies=2)
        with self.assertRaises(Unavailable) as caught:
            self.put("k", b"x" * 100)
        self.assertIn("only 1 could be reached", str(caught.exception))
        self.assertNothingKept()
        self.set_namespace(min_copies=None)
        self.assertTrue(self.put("k", b"x" * 100))
        self.assertEqual(self.lookup("k").replicas, ("a",))
        self.assertEqual(self.on_disk("b"), {})

    def test_peer_disk_full(self) -> None:
        """
        A peer whose disk fills mid-stream: a namespace requiring two
        copies fails the put (retryable), and neither server keeps
        anything; by default the put goes on without that copy.
        """

        def full(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.cluster.servers["b"].storage._write = full
        self.set_namespace(min_copies=2)
        with self.assertRaises(Unavailable) as caught:
            self.put("k", os.urandom(3 * CHUNK_SIZE))
        self.assertIn("the copy on b", str(caught.exception))
        self.assertIn("NO_SPACE", str(caught.exception))
        self.assertNothingKept()
        self.set_namespace(min_copies=None)
        body = os.urandom(3 * CHUNK_SIZE)
        self.assertTrue(self.put("k", body))
        self.assertEqual(self.lookup("k").replicas, ("a",))
        self.assertEqual(list(self.on_disk("a").values()), [body])
        self.assertEqual(self.on_disk("b", "tmp"), {})

    def test_bad_checksum(self) -> None:
        """
        A client whose bytes do not match its checksum gets the checksum
        error, not a durability one; no copy is published.
        """
        client = self.cluster.servers["a"].client(retries=0)
        self.addCleanup(lambda: self.cluster.flush(client.close()))
        proto = self.cluster.flush(client._pool.acquire("a:0"))
        reply = proto.begin_put({"ns": "test", "key": "k", "size": 3})
        proto.send_chunk(b"abc")
        proto.end_put("00" * 32)
        with self.assertRaises(ChecksumMismatch):
            self.cluster.flush(reply)
        self.cluster.pump()
        self.assertNothingKept()

    def test_commit_fails(self) -> None:
        """
        If the commit fails, A removes its copy and the put fails; B's
        durable copy has no row: an orphan for the sweep (test_orphans).
        """
        store = self.cluster.servers["a"].store

        def broken(*args: object, **kwargs: object) -> object:
            from twisted.internet.defer import fail

            return fail(Unavailable(ErrorCode.UNAVAILABLE, "database gone"))

        store.add_file = broken  # type: ignore[assignment]
        with self.assertRaises(Unavailable):
            self.put("k", b"orphaned")
        self.assertEqual(self.rows("files"), 0)
        self.assertEqual(self.on_disk("a"), {})
        self.assertEqual(list(self.on_disk("b").values()), [b"orphaned"])


class ThreeHostTests(_ClusterMixin, SynchronousTestCase):
    """
    Puts to a server of a cluster of three servers on distinct hosts.
    """

    names = ["a", "b", "c"]

    def test_second_host_at_once(self) -> None:
        """
        Two copies by default: A's and one on the peer the placement picks.
        """
        self.assertTrue(self.put("k", b"twice"))
        info = self.lookup("k")
        servers = self.cluster.servers["a"].node.servers
        targets = forward_targets(info.fid, "a", "a", servers, self.cluster.reactor.seconds(), 30)
        self.assertEqual(info.replicas, tuple(sorted(("a", targets[0].name))))

    def test_three(self) -> None:
        self.set_namespace(min_copies=3)
        self.assertTrue(self.put("k", b"thrice"))
        self.assertEqual(self.lookup("k").replicas, ("a", "b", "c"))
        for name in "abc":
            self.assertEqual(list(self.on_disk(name).values()), [b"thrice"])

    def test_more_than_hosts(self) -> None:
        self.set_namespace(min_copies=4)
        with self.assertRaises(Unavailable) as caught:
            self.put("k", b"x")
        self.assertIn("only 3 hosts are alive", str(caught.exception))
        self.assertNothingKept()

    def test_peer_unreachable(self) -> None:
        """
        With a third host, a peer that cannot be reached is replaced.
        """
        peers = self.cluster.servers["a"].node.peers
        connect = peers._endpoint
        refused = []

        def some_unreachable(address: str) -> object:
            if not refused:
                refused.append(address)
                raise ConnectionRefusedError("refused")
            return connect(address)

        peers._endpoint = some_unreachable
        self.assertTrue(self.put("k", b"x" * 100))
        info = self.lookup("k")
        self.assertEqual(len(info.replicas), 2)
        self.assertNotIn(refused[0].partition(":")[0], info.replicas)


class ReplicaPutTests(SynchronousTestCase):
    """
    The peer's side of REPLICA_PUT, fed frames by hand: the path must be
    a stored file's path for the fid, and nothing is recorded.
    """

    def setUp(self) -> None:
        self.cluster = MemoryCluster(os.path.abspath(self.mktemp()), ["b"])
        self.addCleanup(self.cluster.stop)
        self.server = self.cluster.servers["b"]

    def request(self, fields: dict, body: bytes = b"", sha256: str | None = None) -> list:
        proto = ServerProtocol(self.server.node, self.server.metrics)
        transport = StringTransport()
        proto.makeConnection(transport)
        decoder = FrameDecoder()
        proto.dataReceived(encode_message(Op.HELLO, {"versions": [1]}))
        proto.dataReceived(encode_message(Op.REPLICA_PUT, fields))
        if body:
            from koboldfs.protocol import encode_data

            proto.dataReceived(encode_data(body))
        digest = sha256 or hashlib.sha256(body).hexdigest()
        proto.dataReceived(encode_message(Op.END, {"sha256": digest}))
        self.cluster.pump()
        return decoder.feed(transport.value())[1:]

    def test_stored_not_recorded(self) -> None:
        fid = "ab" * 16
        path = relpath_for(fid, "k.txt")
        [reply] = self.request({"fid": fid, "path": path, "size": 5}, b"hello")
        self.assertEqual(
            reply, Message(Op.OK, {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()})
        )
        with open(os.path.join(self.server.storage.root, *path.split("/")), "rb") as f:
            self.assertEqual(f.read(), b"hello")
        self.assertIsNone(self.cluster.flush(self.server.store.lookup_fid(fid)))

    def test_bad_paths(self) -> None:
        """
        A path that is not the fid's stored path is refused before any
        byte is written.
        """
        fid = "ab" * 16
        for path in [
            "../etc/passwd",
            "tmp/" + fid,
            relpath_for("cd" * 16, "k"),
            "files/ab/ab/" + fid + "/x",
        ]:
            [error] = self.request({"fid": fid, "path": path, "size": 1}, b"x")
            self.assertEqual(error.op, Op.ERROR, path)
            self.assertEqual(error["code"], ErrorCode.BAD_REQUEST, path)
        self.assertEqual(os.listdir(os.path.join(self.server.storage.root, "files")), [])

    def test_checksum(self) -> None:
        fid = "ab" * 16
        path = relpath_for(fid, "k")
        [error] = self.request({"fid": fid, "path": path, "size": 1}, b"x", sha256="00" * 32)
        self.assertEqual(error["code"], ErrorCode.CHECKSUM_MISMATCH)
        self.assertEqual(os.listdir(os.path.join(self.server.storage.root, "files")), [])
        self.assertEqual(os.listdir(os.path.join(self.server.storage.root, "tmp")), [])


class AloneTests(SynchronousTestCase):
    """
    A single server takes puts without forwarding, unless the namespace
    asks for more than one copy.
    """

    def test_alone(self) -> None:
        cluster = MemoryCluster(os.path.abspath(self.mktemp()), ["a"])
        self.addCleanup(cluster.stop)
        server = cluster.servers["a"]
        client = server.client(retries=0)
        self.addCleanup(lambda: cluster.flush(client.close()))
        self.assertTrue(cluster.flush(client.put("k", b"one")))
        cluster.flush(server.store.set_namespace("test", min_copies=2))
        with self.assertRaises(ServerError) as caught:
            cluster.flush(client.put("k2", b"two"))
        self.assertEqual(caught.exception.code, ErrorCode.UNAVAILABLE)
        self.assertIn("only 1 host is alive", str(caught.exception))
        self.assertIsNone(cluster.flush(server.store.lookup("test", "k2")))
        self.assertEqual(os.listdir(os.path.join(server.storage.root, "tmp")), [])


class FakeConn:
    """
    The client end of a connection to a peer, as L{Forward} uses it.
    """

    def __init__(self) -> None:
        self.flow = WriteFlow()
        self.sent: list[bytes] = []
        self.header: dict | None = None
        self.reply: Deferred[Message] = Deferred()
        self.ended: str | None = None
        self.closed = False

    def begin_replica_put(self, fields: dict) -> Deferred[Message]:
        self.header = fields
        return self.reply

    def send_chunk(self, chunk: bytes) -> None:
        self.sent.append(chunk)

    def end_put(self, sha256: str) -> None:
        self.ended = sha256

    def close(self) -> None:
        self.closed = True
        if not self.reply.called:
            self.reply.errback(ConnectionFailed("closed"))


class FakePool:
    def __init__(self) -> None:
        self.connecting: dict[str, Deferred[FakeConn]] = {}
        self.released: list[FakeConn] = []

    def acquire(self, address: str) -> Deferred[FakeConn]:
        d: Deferred[FakeConn] = Deferred()
        self.connecting[address] = d
        return d

    def release(self, address: str, conn: FakeConn) -> None:
        self.released.append(conn)


class FakeStore:
    min_copies: int | None = 2

    def namespace(self, name: str) -> Deferred[NamespaceInfo | None]:
        return succeed(NamespaceInfo(1, name, 0.0, min_copies=self.min_copies))


class FakeNode:
    def __init__(self) -> None:
        self.name = "a"
        self.config = ServerConfig(name="a", host="h1", data="unused")
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = FakeStore()
        self.peers = FakePool()
        self.servers = {"a": server("a", "h1"), "b": server("b", "h2")}
        self.unreachable: dict[str, float] = {}


class ForwardFlowTests(SynchronousTestCase):
    """
    L{Forward}'s flow control, with a fake peer connection whose send
    buffer the test fills and drains: the client is read only while the
    peer keeps up, and no chunk is lost or reordered meanwhile.
    """

    def setUp(self) -> None:
        self.node = FakeNode()
        self.client = FakeProducer()
        self.gate = Gate(self.client)
        self.failures: list[Exception] = []
        put = PendingPut("test", "k.txt", "ab" * 16, relpath_for("ab" * 16, "k.txt"), 10, None)
        self.forward = Forward(self.node, put, self.gate, self.failures.append)

    def connect(self) -> FakeConn:
        self.forward.start()
        self.assertEqual(self.client.calls, ["pause"])
        conn = FakeConn()
        self.node.peers.connecting["b:1"].callback(conn)
        return conn

    def test_setup(self) -> None:
        """
        The client is paused while the peer is connected; what arrived
        meanwhile is sent on first, in order, then the client resumes.
        """
        self.forward.start()
        self.assertEqual(self.client.calls, ["pause"])
        self.forward.write(b"one")
        self.forward.write(b"two")
        conn = FakeConn()
        self.node.peers.connecting["b:1"].callback(conn)
        self.assertEqual(conn.header["fid"], "ab" * 16)
        self.assertEqual(conn.sent, [b"one", b"two"])
        self.assertEqual(self.client.calls, ["pause", "resume"])
        self.forward.write(b"three")
        self.assertEqual(conn.sent, [b"one", b"two", b"three"])
        self.assertEqual(self.forward.peers, ["b"])

    def test_peer_lags(self) -> None:
        """
        When the peer's send buffer fills, the client is paused until it
        drains, even if the disk has caught up meanwhile.
        """
        conn = self.connect()
        disk = self.gate.side("disk")
        disk.pauseProducing()
        conn.flow.pauseProducing()
        self.forward.write(b"chunk")
        self.assertEqual(self.client.calls, ["pause", "resume", "pause"])
        disk.resumeProducing()
        self.assertEqual(self.client.calls, ["pause", "resume", "pause"])
        conn.flow.resumeProducing()
        self.assertEqual(self.client.calls, ["pause", "resume", "pause", "resume"])

    def test_peer_fails(self) -> None:
        """
        A peer that answers before the end (an error) fails the put at
        once, with a retryable error naming it; its connection is closed.
        """
        conn = self.connect()
        conn.reply.errback(ServerError(ErrorCode.NO_SPACE, "disk full"))
        [error] = self.failures
        self.assertIsInstance(error, Unavailable)
        self.assertTrue(error.retryable)
        self.assertIn("the copy on b (h2) failed", str(error))
        self.assertTrue(conn.closed)
        self.forward.write(b"more")
        self.assertEqual(conn.sent, [])

    def test_peer_fails_best_effort(self) -> None:
        """
        By default (no C{min_copies} set) a failing peer is dropped: its
        connection is closed, nothing more is sent to it, the put goes on.
        """
        self.node.store.min_copies = None
        conn = self.connect()
        conn.reply.errback(ServerError(ErrorCode.NO_SPACE, "disk full"))
        self.assertEqual(self.failures, [])
        self.assertTrue(conn.closed)
        self.assertEqual(self.forward.peers, [])
        self.forward.write(b"more")
        self.assertEqual(conn.sent, [])
        self.assertIsNone(self.forward.error)

    def test_setup_bounded(self) -> None:
        """
        Peers that hang one after another share one deadline, the peer
        connect timeout and SETUP_SPARE: a default put then goes on alone
        before its client's reply deadline, the hung peers passed by.
        """
        self.node.store.min_copies = None
        self.node.servers["c"] = server("c", "h3")
        self.forward.start()
        # b takes its whole connect deadline, and c hangs too.
        self.node.clock.advance(self.node.config.peer_connect_timeout)
        self.node.peers.connecting["b:1"].errback(ConnectionFailed("b:1: no answer within 3 s"))
        self.assertIn("c:1", self.node.peers.connecting)
        self.assertEqual(self.client.calls, ["pause"])
        self.node.clock.advance(SETUP_SPARE)
        self.assertEqual(self.failures, [])
        self.assertEqual(self.forward.peers, [])
        self.assertEqual(self.client.calls, ["pause", "resume"])
        self.assertEqual(set(self.node.unreachable), {"b", "c"})

    def another_put(self, fid: str) -> None:
        """
        Start forwarding a second put through the same node.
        """
        put = PendingPut("test", fid, fid, relpath_for(fid, "k"), 10, cast(Any, None))
        node: Any = self.node
        Forward(node, put, Gate(cast(Any, FakeProducer())), self.failures.append).start()

    def test_unreachable_passed_by(self) -> None:
        """
        A peer that did not answer is passed by for UNREACHABLE_FOR
        seconds (it may still heartbeat: cut off from us alone), so the
        next put fails at once; after that it is tried again.
        """
        self.forward.start()
        first = self.node.peers.connecting["b:1"]
        first.errback(ConnectionFailed("b:1: no answer within 3 s"))
        self.assertEqual(len(self.failures), 1)
        self.another_put("cd" * 16)
        self.assertEqual(len(self.failures), 2)
        self.assertIn("b: unreachable lately, passed by for 15s", str(self.failures[1]))
        self.assertIs(self.node.peers.connecting["b:1"], first)  # not tried
        self.node.clock.advance(UNREACHABLE_FOR)
        self.another_put("ef" * 16)
        self.assertIsNot(self.node.peers.connecting["b:1"], first)
        self.node.peers.connecting["b:1"].callback(FakeConn())
        self.assertNotIn("b", self.node.unreachable)

    def test_aborted_while_connecting(self) -> None:
        """
        A put given up while its peer connects sends the peer nothing.
        """
        self.forward.start()
        self.forward.abort()
        conn = FakeConn()
        self.node.peers.connecting["b:1"].callback(conn)
        self.assertIsNone(conn.header)
        self.assertEqual(self.node.peers.released, [conn])
        self.assertEqual(self.failures, [])
