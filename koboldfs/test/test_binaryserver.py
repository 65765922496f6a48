"""
Tests of the binary protocol's server end (L{koboldfs.binaryserver}): its
connection state machine and request handling, and
of the Deferred client against it, all in memory: L{StringTransport} for
one side, L{koboldfs.testing.MemoryServer} (iosim) for both.
"""

from __future__ import annotations

import hashlib
import io
import os

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.errors import ErrorCode, NotFound
from koboldfs.protocol import (
    CHUNK_SIZE,
    VERSION,
    Data,
    FrameDecoder,
    Message,
    Op,
    encode_data,
    encode_message,
)
from koboldfs.binaryserver import ServerProtocol
from koboldfs.testing import MemoryServer


class _ServerMixin:
    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.start()
        self.addCleanup(self.server.stop)


class ServerProtocolTests(_ServerMixin, SynchronousTestCase):
    """
    The server's side of a connection, fed bytes by hand.
    """

    def connect(self, hello: bool = True) -> tuple[ServerProtocol, StringTransport]:
        proto = ServerProtocol(self.server.node, self.server.metrics)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.decoder = FrameDecoder()
        if hello:
            proto.dataReceived(encode_message(Op.HELLO, {"versions": [VERSION]}))
            self.assertEqual(self.frames(transport)[0].op, Op.WELCOME)
        return proto, transport

    def frames(self, transport: StringTransport) -> list:
        data = transport.value()
        transport.clear()
        return self.decoder.feed(data)

    def test_request_before_hello(self) -> None:
        """
        Nothing is served before the handshake: a request first is a
        protocol error, answered and closed.
        """
        proto, transport = self.connect(hello=False)
        proto.dataReceived(encode_message(Op.PING))
        [error] = self.frames(transport)
        self.assertEqual(error["code"], ErrorCode.BAD_REQUEST)
        self.assertTrue(transport.disconnecting)

    def test_unsupported_version(self) -> None:
        """
        A client speaking only other versions is told so and dropped.
        """
        proto, transport = self.connect(hello=False)
        proto.dataReceived(encode_message(Op.HELLO, {"versions": [VERSION + 1]}))
        [error] = self.frames(transport)
        self.assertEqual(error["code"], ErrorCode.BAD_VERSION)
        self.assertTrue(transport.disconnecting)

    def test_byte_at_a_time_put(self) -> None:
        """
        A PUT split into single bytes is stored like any other.
        """
        proto, transport = self.connect()
        body = b"hello, kobold"
        stream = (
            encode_message(Op.PUT, {"ns": "t", "key": "k", "size": len(body)})
            + encode_data(body)
            + encode_message(Op.END, {"sha256": hashlib.sha256(body).hexdigest()})
        )
        for byte in stream:
            proto.dataReceived(bytes([byte]))
        [ok] = self.frames(transport)
        self.assertEqual((ok.op, ok["size"], ok["servers"]), (Op.OK, len(body), ["memory"]))

    def test_refused_put_discards_body(self) -> None:
        """
        A PUT refused at once (bad namespace) is answered before its body;
        the body is dropped up to END, and the connection goes on.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode_message(Op.PUT, {"ns": "no/slash", "key": "k"}))
        [error] = self.frames(transport)
        self.assertEqual(error["code"], ErrorCode.BAD_NAMESPACE)
        proto.dataReceived(encode_data(b"x" * 100) + encode_message(Op.END, {"abort": True}))
        self.assertEqual(self.frames(transport), [])
        proto.dataReceived(encode_message(Op.PING))
        self.assertEqual(self.frames(transport)[0].op, Op.OK)
        self.assertFalse(transport.disconnecting)

    def test_client_abort(self) -> None:
        """
        A client that gives up mid-body gets one answer, nothing is stored,
        and the temp file is gone.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "k"}) + encode_data(b"abc"))
        proto.dataReceived(encode_message(Op.END, {"abort": True}))
        [error] = self.frames(transport)
        self.assertEqual(error["code"], ErrorCode.BAD_REQUEST)
        self.assertEqual(os.listdir(os.path.join(self.server.storage.root, "tmp")), [])
        proto.dataReceived(encode_message(Op.STAT, {"ns": "t", "key": "k"}))
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.NOT_FOUND)

    def test_end_without_checksum(self) -> None:
        """
        END of a PUT must carry the checksum the client computed.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "k"}))
        proto.dataReceived(encode_message(Op.END, {}))
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.BAD_REQUEST)
        self.assertTrue(transport.disconnecting)

    def test_stray_data(self) -> None:
        """
        DATA outside a PUT is a protocol error.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode_data(b"stray"))
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.BAD_REQUEST)
        self.assertTrue(transport.disconnecting)

    def test_oversized_frame(self) -> None:
        """
        A frame over the limit is refused from its header alone.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"\xff\xff\xff\xff\x40")
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.BAD_FRAME)
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """
        A connection that stays silent is dropped after the idle timeout,
        so it holds no resources forever.
        """
        proto, transport = self.connect()
        self.server.reactor.advance(self.server.config.idle_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.server.reactor.advance(2)
        self.assertEqual(self.frames(transport)[0]["code"], ErrorCode.TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_disconnect_mid_upload(self) -> None:
        """
        A client that vanishes mid-body leaves no temp file and no row.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "k"}))
        # Past the first flush, so the temp file exists on disk.
        proto.dataReceived(encode_data(b"x" * CHUNK_SIZE))
        proto.dataReceived(encode_data(b"x" * CHUNK_SIZE))
        self.assertNotEqual(os.listdir(os.path.join(self.server.storage.root, "tmp")), [])
        proto.connectionLost(None)
        self.assertEqual(os.listdir(os.path.join(self.server.storage.root, "tmp")), [])
        self.assertIsNone(self.server.flush(self.server.store.lookup("t", "k")))

    def test_get_stream(self) -> None:
        """
        GET answers FILE, the body in DATA frames, then END.
        """
        proto, transport = self.connect()
        body = os.urandom(2_500_000)
        digest = hashlib.sha256(body).hexdigest()
        proto.dataReceived(
            encode_message(Op.PUT, {"ns": "t", "key": "k", "size": len(body)})
            + encode_data(body[:2_000_000])
            + encode_data(body[2_000_000:])
            + encode_message(Op.END, {"sha256": digest})
        )
        self.assertEqual(self.frames(transport)[0].op, Op.OK)
        proto.dataReceived(encode_message(Op.GET, {"ns": "t", "key": "k"}))
        frames = self.frames(transport)
        self.assertEqual(frames[0], Message(Op.FILE, {"size": len(body), "sha256": digest}))
        self.assertEqual(b"".join(f.payload for f in frames if isinstance(f, Data)), body)
        self.assertEqual(frames[-1].op, Op.END)


class MemoryClientTests(_ServerMixin, SynchronousTestCase):
    """
    The real DeferredClient against the real server, in memory.
    """

    def test_put_get_stat_delete(self) -> None:
        """
        The client surface end to end, with bytes, BytesIO and a path.
        """
        s = self.server
        client = s.client()
        body = os.urandom(3 * 1024 * 1024 + 5)
        self.assertTrue(s.flush(client.put("a", body)))
        self.assertTrue(s.flush(client.put("b", io.BytesIO(body))))
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body)
        self.assertTrue(s.flush(client.put("c", path)))
        for key in "abc":
            out = io.BytesIO()
            self.assertTrue(s.flush(client.get(key, out)))
            self.assertEqual(out.getvalue(), body)
        stat = s.flush(client.stat("a"))
        self.assertEqual((stat.key, stat.size), ("a", len(body)))
        self.assertEqual(s.flush(client.list()), ["a", "b", "c"])
        self.assertTrue(s.flush(client.delete("a")))
        self.assertFalse(s.flush(client.delete("a")))
        self.assertIsNone(s.flush(client.stat("a")))
        self.assertFalse(s.flush(client.get("a", io.BytesIO())))
        self.assertEqual(
            s.flush(client.get_url("b")).split("/")[:4], ["http:", "", "memory", "files"]
        )
        s.flush(client.close())

    def test_connections_reused(self) -> None:
        """
        Sequential requests share one connection instead of reconnecting.
        """
        s = self.server
        client = s.client()
        for i in range(5):
            s.flush(client.put(f"k{i}", b"x"))
            s.flush(client.stat(f"k{i}"))
        self.assertEqual(len(s.pumps), 1)
        s.flush(client.close())

    def test_lookup_missing(self) -> None:
        """
        The node reports a missing key as NotFound, which the protocol
        turns into NOT_FOUND.
        """
        self.assertRaises(NotFound, self.server.flush, self.server.node.lookup("t", "nope"))
