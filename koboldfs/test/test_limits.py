"""
The server's limits: connections, uploads, frame sizes, key length and the
timeouts that drop silent or slow clients, each refused with a clear error
while the server goes on serving others.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.protocol import VERSION, FrameDecoder, Op, encode_data, encode_message
from koboldfs.binaryserver import ABORT_AFTER, PREAUTH_PAYLOAD, ServerProtocol
from koboldfs.testing import MemoryServer
from koboldfs.web import guarded, make_site

HELLO = encode_message(Op.HELLO, {"versions": [VERSION]})


class LimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.config = self.server.config

    def connect(self, host: str = "10.0.0.1", hello: bool = True) -> tuple:
        proto = ServerProtocol(self.server.node, self.server.metrics)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 4242))
        proto.makeConnection(transport)
        decoder = FrameDecoder()
        if hello and not transport.disconnecting:
            proto.dataReceived(HELLO)
            self.assertEqual(decoder.feed(transport.value())[0].op, Op.WELCOME)
            transport.clear()
        return proto, transport, decoder

    def answer(self, transport: StringTransport, decoder: FrameDecoder) -> list:
        data = transport.value()
        transport.clear()
        return decoder.feed(data)

    def test_connectionsPerAddress(self) -> None:
        """
        Past the per-address limit a connection gets BUSY and is closed;
        other addresses are still taken, and a slot frees when one closes.
        """
        self.config.max_connections_per_ip = 2
        first, _, _ = self.connect()
        self.connect()
        _, transport, decoder = self.connect(hello=False)
        [error] = self.answer(transport, decoder)
        self.assertEqual(error["code"], ErrorCode.BUSY)
        self.assertIn("from 10.0.0.1", error["message"])
        self.assertTrue(transport.disconnecting)
        self.assertFalse(self.connect("10.0.0.2")[1].disconnecting)
        first.connectionLost(None)
        self.assertFalse(self.connect()[1].disconnecting)
        self.assertEqual(self.server.node.connections, {"10.0.0.1": 2, "10.0.0.2": 1})

    def test_connectionsInAll(self) -> None:
        self.config.max_connections = 3
        for i in range(3):
            self.connect(f"10.0.0.{i}")
        _, transport, decoder = self.connect("10.0.1.1", hello=False)
        [error] = self.answer(transport, decoder)
        self.assertEqual(error["code"], ErrorCode.BUSY)
        self.assertIn("limit of 3 connections", error["message"])

    def test_uploads(self) -> None:
        """
        Past the upload limit a PUT is BUSY (its body discarded, the
        connection kept); the slot frees when the first PUT ends.
        """
        self.config.max_uploads = 1
        a, ta, da = self.connect()
        b, tb, db = self.connect()
        a.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "a"}) + encode_data(b"abc"))
        b.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "b"}))
        [error] = self.answer(tb, db)
        self.assertEqual(error["code"], ErrorCode.BUSY)
        self.assertIn("limit of 1 uploads", error["message"])
        b.dataReceived(encode_data(b"xyz") + encode_message(Op.END, {"abort": True}))
        a.dataReceived(encode_message(Op.END, {"sha256": hashlib.sha256(b"abc").hexdigest()}))
        self.assertEqual(self.answer(ta, da)[0].op, Op.OK)
        self.assertEqual(self.server.node.uploads, 0)
        body = b"xyz"
        b.dataReceived(
            encode_message(Op.PUT, {"ns": "t", "key": "b"})
            + encode_data(body)
            + encode_message(Op.END, {"sha256": hashlib.sha256(body).hexdigest()})
        )
        self.assertEqual(self.answer(tb, db)[0].op, Op.OK)
        # A connection lost mid-upload frees its slot too.
        a.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "c"}))
        self.assertEqual(self.server.node.uploads, 1)
        a.connectionLost(None)
        self.assertEqual(self.server.node.uploads, 0)

    def test_clientSeesBusy(self) -> None:
        """
        The client takes BUSY for a retryable error and, with no other
        server, reports it.
        """
        self.config.max_uploads = 0
        error = self.assertRaises(
            Unavailable, self.server.flush, self.server.client("t", retries=0).put("k", b"x")
        )
        self.assertEqual(error.code, ErrorCode.BUSY)
        self.assertIn("uploads", str(error))

    def test_preauthFrameLimit(self) -> None:
        """
        Before the handshake a frame over 64 KiB is refused from its
        header; after it, the configured frame size applies.
        """
        p, transport, decoder = self.connect(hello=False)
        p.dataReceived(b"\x00\x01\x00\x01\x01")  # 65537 bytes of HELLO
        self.assertGreater(65537, PREAUTH_PAYLOAD)
        self.assertEqual(self.answer(transport, decoder)[0]["code"], ErrorCode.BAD_FRAME)
        self.assertTrue(transport.disconnecting)
        self.config.max_frame_size = 2 * 1024 * 1024
        p, transport, decoder = self.connect()
        p.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "k"}))
        p.dataReceived(b"\x00\x20\x00\x00\x40")  # exactly 2 MiB: accepted so far
        self.assertFalse(transport.disconnecting)
        p, transport, decoder = self.connect()
        p.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "k"}))
        p.dataReceived(b"\x00\x20\x00\x01\x40")
        [error] = self.answer(transport, decoder)
        self.assertEqual(error["code"], ErrorCode.BAD_FRAME)
        self.assertIn("2097152", error["message"])

    def test_keyLength(self) -> None:
        """
        A key over 1024 bytes of UTF-8 is BAD_KEY, and the connection goes
        on.
        """
        p, transport, decoder = self.connect()
        p.dataReceived(encode_message(Op.STAT, {"ns": "t", "key": "é" * 513}))
        [error] = self.answer(transport, decoder)
        self.assertEqual(error["code"], ErrorCode.BAD_KEY)
        self.assertIn("1024", error["message"])
        p.dataReceived(encode_message(Op.STAT, {"ns": "t", "key": "é" * 512}))
        self.assertEqual(self.answer(transport, decoder)[0]["code"], ErrorCode.NOT_FOUND)

    def test_silentClient(self) -> None:
        """
        A client that connects and says nothing is dropped after the
        handshake timeout, and no longer counted.
        """
        _, transport, decoder = self.connect(hello=False)
        self.server.reactor.advance(self.config.handshake_timeout - 0.5)
        self.assertFalse(transport.disconnecting)
        self.server.reactor.advance(1)
        [error] = self.answer(transport, decoder)
        self.assertEqual(error["code"], ErrorCode.TIMEOUT)
        self.assertIn("handshake", error["message"])
        self.assertTrue(transport.disconnecting)
        # A client that does not take the error and close is cut.
        self.assertFalse(transport.disconnected)
        self.server.reactor.advance(ABORT_AFTER)
        self.assertTrue(transport.disconnected)

    def test_slowHandshake(self) -> None:
        """
        A HELLO trickled a byte a second never buys more time.
        """
        p, transport, decoder = self.connect(hello=False)
        for byte in HELLO[:-1]:
            if transport.disconnecting:
                break
            p.dataReceived(bytes([byte]))
            self.server.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.answer(transport, decoder)[0]["code"], ErrorCode.TIMEOUT)

    def test_slowFrame(self) -> None:
        """
        After the handshake, a frame sent a byte a second is dropped after
        the frame timeout, long before the idle timeout.
        """
        p, transport, decoder = self.connect()
        frame = encode_message(Op.STAT, {"ns": "t", "key": "k" * 100})
        seconds = 0
        for byte in frame:
            if transport.disconnecting:
                break
            p.dataReceived(bytes([byte]))
            self.server.reactor.advance(1)
            seconds += 1
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(seconds, self.config.frame_timeout + 1)
        [error] = self.answer(transport, decoder)
        self.assertEqual(error["code"], ErrorCode.TIMEOUT)
        self.assertIn("frame", error["message"])

    def test_slowBody(self) -> None:
        """
        A PUT whose body stops arriving is dropped after the frame timeout,
        and its upload is abandoned.
        """
        p, transport, decoder = self.connect()
        p.dataReceived(encode_message(Op.PUT, {"ns": "t", "key": "k"}) + encode_data(b"x"))
        self.assertEqual(self.server.node.uploads, 1)
        self.server.reactor.advance(self.config.frame_timeout + 1)
        self.assertTrue(transport.disconnecting)
        p.connectionLost(None)
        self.assertEqual(self.server.node.uploads, 0)
        self.assertEqual(self.server.node.connections, {})

    def test_idleBetweenRequests(self) -> None:
        """
        Between requests, the idle timeout applies, not the frame timeout.
        """
        p, transport, decoder = self.connect()
        p.dataReceived(encode_message(Op.PING))
        self.server.reactor.advance(self.config.frame_timeout * 2)
        self.assertFalse(transport.disconnecting)
        self.server.reactor.advance(self.config.idle_timeout)
        self.assertTrue(transport.disconnecting)


class HTTPLimitTests(SynchronousTestCase):
    """
    The HTTP port shares the connection limits, and drops silent and
    trickling clients.
    """

    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.config = self.server.config
        self.factory = guarded(self.server.node, make_site(self.server.node))

    def connect(self, host: str = "10.0.0.1") -> tuple:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 4242))
        proto.makeConnection(transport)
        return proto, transport

    def test_limits(self) -> None:
        self.config.max_connections_per_ip = 1
        first, _ = self.connect()
        _, refused = self.connect()
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"too many connections from 10.0.0.1", refused.value())
        self.assertTrue(refused.disconnecting)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.server.node.connections, {})
        _, transport = self.connect()
        self.assertFalse(transport.disconnecting)

    def test_silent(self) -> None:
        _, transport = self.connect()
        self.server.reactor.advance(self.config.handshake_timeout - 0.5)
        self.assertFalse(transport.disconnecting)
        self.server.reactor.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_trickle(self) -> None:
        """
        A request head sent a byte a second is cut after the frame
        timeout; a whole one is answered, and the connection then waits
        for the next without a deadline of ours.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b" 404 ", transport.value())
        self.server.reactor.advance(self.config.handshake_timeout + 1)
        self.assertFalse(transport.disconnecting)
        seconds = 0
        for byte in b"GET /nothing HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"x" * 100:
            if transport.disconnecting:
                break
            proto.dataReceived(bytes([byte]))
            self.server.reactor.advance(1)
            seconds += 1
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(seconds, self.config.frame_timeout + 1)
