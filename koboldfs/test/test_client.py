"""
Tests of L{koboldfs.deferredclient}: the rounds of failover and retries of
L{DeferredClient}, on a fake clock against scripted servers in memory (no
sockets, no sleeps); and the layout of the client side's modules.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import random
from typing import Any, Iterator

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import koboldfs
from koboldfs import client as facade
from koboldfs import connection
from koboldfs.connection import ClientProtocol, ConnectionCache
from koboldfs.deferredclient import DeferredClient, Stat
from koboldfs.errors import ConnectionFailed, ErrorCode, ServerError, Unavailable
from koboldfs.pool import ClientPool
from koboldfs.protocol import (
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameProtocol,
    Message,
    Op,
    encode_data,
    encode_message,
)
from koboldfs.testing import InlineThreadPool, SyncReactor
from koboldfs.txnclient import DeferredTransaction, TransactionalClientPool

#: What a scripted server answers a STAT with when it succeeds.
STAT = {"key": "k", "size": 1, "sha256": "00" * 32, "created": 0.0, "servers": ["a"]}
#: A scripted reply that drops the connection instead of answering.
DROP = "drop"
#: A scripted reply that never comes: the server hangs (SIGSTOP), its
#: kernel still taking the bytes.
HANG = "hang"


class _ScriptedServer(FrameProtocol):
    """
    A server that welcomes every client, then answers each request with the
    next reply of its script: an L{ErrorCode} (an ERROR frame), L{DROP}, or
    the fields of an OK frame.  A PUT's error is sent as soon as the PUT
    arrives, as a real server refusing an upload does; its OK after END.
    """

    def __init__(self, fake: _Servers, address: str) -> None:
        self._fake = fake
        self._address = address
        self._put_reply: dict[str, Any] | None = None

    def frameReceived(self, frame: Frame) -> None:
        if self._address in self._fake.hung:
            now = self._fake.clock.seconds()
            self._fake.log.append((self._address, f"{frame.op.name} unheard", now))
            return
        if frame.op is Op.HELLO:
            self.sendMessage(
                Op.WELCOME,
                {"version": VERSION, "server": self._address, "max_payload": MAX_PAYLOAD},
            )
        elif frame.op is Op.DATA:
            pass
        elif frame.op is Op.END:
            assert isinstance(frame, Message)
            if self._put_reply is not None and not frame.get("abort"):
                self.sendMessage(Op.OK, self._put_reply)
            self._put_reply = None
        else:
            self._answer(frame.op)

    def _answer(self, op: Op) -> None:
        self._fake.log.append((self._address, op.name, self._fake.clock.seconds()))
        reply = self._fake.scripts[self._address].pop(0)
        if reply == DROP:
            self.transport.loseConnection()
        elif reply == HANG:
            self._fake.hung.add(self._address)
        elif op is Op.GET:
            body = reply["body"]
            digest = hashlib.sha256(body).hexdigest()
            self.sendMessage(Op.FILE, {"size": len(body), "sha256": digest})
            self.sendData(body)
            self.sendMessage(Op.END, {"sha256": digest})
        elif isinstance(reply, ErrorCode):
            self.sendError(reply, f"{reply.name} from {self._address}")
        elif op is Op.PUT:
            self._put_reply = reply
        else:
            self.sendMessage(Op.OK, reply)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, fake: _Servers, address: str) -> None:
        self._fake = fake
        self._address = address

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        fake = self._fake
        if self._address not in fake.scripts:
            fake.log.append((self._address, "refused", fake.clock.seconds()))
            return defer.fail(ConnectionRefusedError("refused"))
        client = factory.buildProtocol(None)
        server = _ScriptedServer(fake, self._address)
        fake.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=fake.clock,
            )
        )
        return defer.succeed(client)


class _Servers:
    """
    Scripted servers on one fake clock, reached through memory; an address
    with no script refuses connections.

    @ivar log: what each server was asked and when, or when it refused a
        connection: C{(address, "STAT", seconds)}, C{(address, "refused",
        seconds)}.
    """

    def __init__(self, **scripts: list[Any]) -> None:
        self.clock = SyncReactor()
        self.scripts = {f"{name}:1": list(replies) for name, replies in scripts.items()}
        self.log: list[tuple[str, str, float]] = []
        #: The servers that answer nothing any more.
        self.hung: set[str] = set()
        self.pumps: list[iosim.IOPump] = []

    def client(self, *names: str, **options: Any) -> DeferredClient:
        return DeferredClient(
            "test",
            [f"{name}:1" for name in names],
            self.clock,
            endpoint_factory=lambda address: _Endpoint(self, address),
            threadpool=InlineThreadPool(),
            **options,
        )

    def pump(self) -> None:
        moved = True
        while moved:
            moved = any([pump.flush() for pump in self.pumps])

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()

    def start(self, d: defer.Deferred[Any]) -> list[Any]:
        """
        Start C{d} and move its bytes; the list holds its outcome once it
        has one.
        """
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.pump()
        return outcome

    def asked(self) -> list[tuple[str, str, float]]:
        """
        The log, with times rounded to the millisecond.
        """
        return [(address, what, round(when, 3)) for address, what, when in self.log]


class FailoverTests(SynchronousTestCase):
    """
    One request's rounds: every server in turn, then again after a backoff
    that doubles, until one succeeds, an error ends it, or the rounds run
    out.  The client starts at the first listed server (its start is
    random, to spread the load, and made fixed here).
    """

    def setUp(self) -> None:
        self.patch(random, "randrange", lambda n: 0)

    def test_down_server_skipped(self) -> None:
        """
        A first server that refuses the connection costs no wait: the
        request goes on to the next in the same round, and succeeds there.
        """
        servers = _Servers(b=[STAT])
        client = servers.client("a", "b", backoff=1.0)
        outcome = servers.start(client.stat("k"))
        self.assertEqual(outcome, [Stat.from_reply(Message(Op.OK, STAT))])
        self.assertEqual(servers.asked(), [("a:1", "refused", 0), ("b:1", "STAT", 0)])

    def test_dropped_connection_fails_over(self) -> None:
        """
        A server that drops the connection in the middle of a request is a
        retryable failure: the next server is asked at once.
        """
        servers = _Servers(a=[DROP], b=[STAT])
        client = servers.client("a", "b")
        outcome = servers.start(client.stat("k"))
        self.assertEqual([s.size for s in outcome], [1])
        self.assertEqual(servers.asked(), [("a:1", "STAT", 0), ("b:1", "STAT", 0)])

    def test_busy_then_unavailable_then_ok(self) -> None:
        """
        A server that answers BUSY, then UNAVAILABLE, is asked again after
        C{backoff}, then after twice that; its success ends the request.
        """
        servers = _Servers(a=[ErrorCode.BUSY, ErrorCode.UNAVAILABLE, STAT])
        client = servers.client("a", retries=3, backoff=0.25)
        outcome = servers.start(client.stat("k"))
        self.assertEqual(servers.asked(), [("a:1", "STAT", 0)])
        servers.advance(0.125)
        self.assertEqual(len(servers.log), 1)
        servers.advance(0.125)
        self.assertEqual(servers.asked()[1:], [("a:1", "STAT", 0.25)])
        servers.advance(0.25)
        self.assertEqual((len(servers.log), outcome), (2, []))
        servers.advance(0.25)
        self.assertEqual(servers.asked()[2:], [("a:1", "STAT", 0.75)])
        self.assertEqual([s.size for s in outcome], [1])
        self.assertEqual(servers.clock.getDelayedCalls(), [])

    def test_rounds_go_round(self) -> None:
        """
        Each round asks every server once, starting one further along the
        list than the round before, with the backoff only between rounds.
        """
        servers = _Servers(a=[ErrorCode.BUSY, ErrorCode.READONLY], b=[ErrorCode.NO_SPACE, STAT])
        client = servers.client("a", "b", retries=1, backoff=0.5)
        outcome = servers.start(client.stat("k"))
        servers.advance(0.5)
        self.assertEqual([s.size for s in outcome], [1])
        self.assertEqual(
            servers.asked(),
            [("a:1", "STAT", 0), ("b:1", "STAT", 0), ("b:1", "STAT", 0.5)],
        )

    def test_gives_up_after_last_round(self) -> None:
        """
        After C{retries} rounds beyond the first, the request fails with
        L{Unavailable}, carrying the last error's code and what the servers
        said; nothing more is sent, nothing is left scheduled.
        """
        servers = _Servers(a=[ErrorCode.UNAVAILABLE] * 3, b=[ErrorCode.BUSY] * 3)
        client = servers.client("a", "b", retries=2, backoff=0.25)
        outcome = servers.start(client.stat("k"))
        servers.advance(0.25)
        servers.advance(0.25)
        self.assertEqual((len(servers.log), outcome), (4, []))
        servers.advance(0.25)
        self.assertEqual(
            servers.asked(),
            [
                ("a:1", "STAT", 0),
                ("b:1", "STAT", 0),
                ("b:1", "STAT", 0.25),
                ("a:1", "STAT", 0.25),
                ("a:1", "STAT", 0.75),
                ("b:1", "STAT", 0.75),
            ],
        )
        [failure] = outcome
        error = failure.value
        self.assertIsInstance(error, Unavailable)
        self.assertEqual(error.code, ErrorCode.BUSY)
        self.assertIn("stat failed on every server", str(error))
        self.assertIn("a:1: UNAVAILABLE: UNAVAILABLE from a:1", str(error))
        self.assertIn("b:1: BUSY: BUSY from b:1", str(error))
        servers.advance(60)
        self.assertEqual(len(servers.log), 6)
        self.assertEqual(servers.clock.getDelayedCalls(), [])

    def test_not_found_not_retried(self) -> None:
        """
        A missing key is missing everywhere: C{stat} is None after one
        server was asked, with no other server or round tried.
        """
        servers = _Servers(a=[ErrorCode.NOT_FOUND], b=[STAT])
        client = servers.client("a", "b")
        self.assertEqual(servers.start(client.stat("k")), [None])
        self.assertEqual(servers.asked(), [("a:1", "STAT", 0)])
        self.assertEqual(servers.clock.getDelayedCalls(), [])

    def test_refusal_not_retried(self) -> None:
        """
        An error that every server would repeat (a refused key, a bad
        request) fails the request at once, as itself.
        """
        for code in (ErrorCode.FORBIDDEN, ErrorCode.BAD_REQUEST):
            servers = _Servers(a=[code], b=[STAT])
            client = servers.client("a", "b")
            [failure] = servers.start(client.stat("k"))
            self.assertIsInstance(failure.value, ServerError)
            self.assertNotIsInstance(failure.value, Unavailable)
            self.assertEqual(failure.value.code, code)
            self.assertEqual(servers.asked(), [("a:1", "STAT", 0)])
            self.assertEqual(servers.clock.getDelayedCalls(), [])

    def test_ping_one_round(self) -> None:
        """
        C{ping} asks each server once, with no retry round: False at once
        when none answers.
        """
        servers = _Servers(b=[ErrorCode.BUSY])
        client = servers.client("a", "b", retries=5)
        self.assertEqual(servers.start(client.ping()), [False])
        self.assertEqual(servers.asked(), [("a:1", "refused", 0), ("b:1", "PING", 0)])
        self.assertEqual(servers.clock.getDelayedCalls(), [])

    def test_put_sent_again(self) -> None:
        """
        A put refused by a server (BUSY) is sent again from the start to
        the next one, when its source can be read again.
        """
        servers = _Servers(a=[ErrorCode.BUSY], b=[{}])
        client = servers.client("a", "b")
        self.assertEqual(servers.start(client.put("k", b"body")), [True])
        self.assertEqual(servers.asked(), [("a:1", "PUT", 0), ("b:1", "PUT", 0)])

    def test_put_not_sent_again(self) -> None:
        """
        A put whose source cannot be read again (not seekable) is not sent
        twice: the request fails with L{ConnectionFailed} after the first
        server refused it.
        """
        servers = _Servers(a=[ErrorCode.BUSY], b=[{}])
        client = servers.client("a", "b")
        [failure] = servers.start(client.put("k", _Unseekable(b"body")))
        self.assertIsInstance(failure.value, ConnectionFailed)
        self.assertIn("cannot be re-read", str(failure.value))
        self.assertEqual(servers.asked(), [("a:1", "PUT", 0)])


#: Each operation of the client, with what a server that succeeds answers.
OPERATIONS: dict[str, tuple[Any, Any]] = {
    "stat": (lambda c: c.stat("k"), STAT),
    "delete": (lambda c: c.delete("k"), {}),
    "list": (lambda c: c.list(), {"keys": ["k"], "truncated": False}),
    "get_url": (lambda c: c.get_url("k"), {"url": "http://b/k"}),
    "get": (lambda c: c.get("k", io.BytesIO()), {"body": b"abc"}),
    "put": (lambda c: c.put("k", b"body"), {}),
    "begin": (lambda c: DeferredTransaction.begin(c), {"txn": "ab" * 16, "timeout": 60}),
}


class HungServerTests(SynchronousTestCase):
    """
    A hung server (its kernel takes the bytes, nothing answers) costs a
    request the connection's deadline or the reply's, 5 s by default,
    before the next server is asked: for every operation, whether the
    server hung before the connection or after it was made.
    """

    def setUp(self) -> None:
        self.patch(random, "randrange", lambda n: 0)

    def check(
        self, servers: _Servers, client: DeferredClient, name: str, operation: Any
    ) -> list[Any]:
        outcome = servers.start(operation(client))
        servers.advance(4.9)
        self.assertEqual(outcome, [])
        self.assertNotIn("b:1", [address for address, *_ in servers.log])
        # A put's deadline is a hair longer: its body takes time to fsync.
        servers.advance(0.1 if name != "put" else 0.2)
        self.assertEqual(len(outcome), 1)
        self.assertNotIsInstance(outcome[0], Failure)
        return outcome

    def test_hung_before_connecting(self) -> None:
        """
        A server hung from the start: TCP completes, the handshake never
        does; after 5 s the next server answers.
        """
        for name, (operation, reply) in OPERATIONS.items():
            with self.subTest(name):
                servers = _Servers(a=[], b=[reply])
                servers.hung.add("a:1")
                client = servers.client("a", "b", retries=0)
                self.check(servers, client, name, operation)
                self.assertEqual(servers.asked()[0], ("a:1", "HELLO unheard", 0))
                address, _, when = servers.asked()[-1]
                self.assertEqual((address, round(when)), ("b:1", 5))
                servers.advance(60)
                self.assertEqual(servers.clock.getDelayedCalls(), [])

    def test_hung_connected(self) -> None:
        """
        A server that hangs once connected (its connection is reused):
        the reply's first frame is 5 s late, and the next server answers.
        """
        for name, (operation, reply) in OPERATIONS.items():
            with self.subTest(name):
                servers = _Servers(a=[{}, HANG], b=[reply])
                client = servers.client("a", "b", retries=0)
                self.assertEqual(len(servers.start(client.request(Op.PING, {}))), 1)
                client._next = 0
                self.check(servers, client, name, operation)
                address, _, when = servers.asked()[-1]
                self.assertEqual((address, round(when)), ("b:1", 5))

    def test_handshake_deadline_is_configurable(self) -> None:
        """
        C{connect_timeout} and C{reply_timeout} set the two deadlines.
        """
        servers = _Servers(a=[], b=[STAT])
        servers.hung.add("a:1")
        client = servers.client("a", "b", retries=0, connect_timeout=1.5)
        outcome = servers.start(client.stat("k"))
        servers.advance(1.5)
        self.assertEqual([s.size for s in outcome], [1])
        servers = _Servers(a=[{}, HANG], b=[STAT])
        client = servers.client("a", "b", retries=0, reply_timeout=2)
        servers.start(client.request(Op.PING, {}))
        client._next = 0
        outcome = servers.start(client.stat("k"))
        servers.advance(1.9)
        self.assertEqual(outcome, [])
        servers.advance(0.1)
        self.assertEqual([s.size for s in outcome], [1])

    def test_said_why(self) -> None:
        """
        With no other server, the request fails after the deadline, and
        the error says which server did what.
        """
        servers = _Servers(a=[], b=[{}, HANG])
        servers.hung.add("a:1")
        client = servers.client("a", retries=0)
        outcome = servers.start(client.stat("k"))
        servers.advance(5)
        [failure] = outcome
        self.assertIsInstance(failure.value, Unavailable)
        self.assertIn("a:1 did not complete its handshake in 5 s", str(failure.value))
        client = servers.client("b", retries=0)
        servers.start(client.request(Op.PING, {}))
        outcome = servers.start(client.stat("k"))
        servers.advance(5)
        [failure] = outcome
        self.assertIn("b:1 began no reply for 5 s", str(failure.value))


class ReplyDeadlineTests(SynchronousTestCase):
    """
    L{ClientProtocol}'s deadlines, on a fake clock: a reply must begin in
    C{reply_timeout}; once it has (and while a put's body goes out), only
    C{timeout} seconds of silence are allowed, however long it all takes.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.conn = ClientProtocol(self.clock, timeout=30, reply_timeout=5)
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        welcome = self.conn.handshake()
        fields = {"version": VERSION, "server": "s", "max_payload": MAX_PAYLOAD}
        self.conn.dataReceived(encode_message(Op.WELCOME, fields))
        self.successResultOf(welcome)

    def outcome(self, d: defer.Deferred[Any]) -> list[Any]:
        result: list[Any] = []
        d.addBoth(result.append)
        return result

    def test_reply_late(self) -> None:
        """
        A reply not begun in 5 s fails the request, retryably, and the
        connection is dropped.
        """
        outcome = self.outcome(self.conn.request(Op.STAT, {"ns": "n", "key": "k"}))
        self.clock.advance(4.9)
        self.assertEqual(outcome, [])
        self.clock.advance(0.1)
        [failure] = outcome
        self.assertIsInstance(failure.value, ConnectionFailed)
        self.assertTrue(failure.value.retryable)
        self.assertTrue(self.transport.disconnecting)

    def test_slow_body_not_cut(self) -> None:
        """
        A get whose FILE comes in time and whose body then trickles, a
        frame every 20 s for minutes, completes.
        """
        body = b"x" * 10
        outcome = self.outcome(self.conn.get({"ns": "n", "key": "k"}, lambda chunk: None))
        self.clock.advance(4)
        sha = hashlib.sha256(body).hexdigest()
        self.conn.dataReceived(encode_message(Op.FILE, {"size": len(body), "sha256": sha}))
        for byte in body:
            self.clock.advance(20)
            self.conn.dataReceived(encode_data(bytes([byte])))
        self.conn.dataReceived(encode_message(Op.END, {"sha256": sha}))
        self.assertEqual([m["size"] for m in outcome], [10])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.transport.disconnecting)

    def test_body_silence(self) -> None:
        """
        Once a body has begun, 30 s without a frame end it.
        """
        outcome = self.outcome(self.conn.get({"ns": "n", "key": "k"}, lambda chunk: None))
        self.conn.dataReceived(encode_message(Op.FILE, {"size": 1, "sha256": "00" * 32}))
        self.clock.advance(29.9)
        self.assertEqual(outcome, [])
        self.clock.advance(0.1)
        [failure] = outcome
        self.assertIn("went silent for 30 s", str(failure.value))

    def test_slow_put_body_not_cut(self) -> None:
        """
        A put's body sent slowly (a frame every 20 s) is not cut; its
        answer is then due within 5 s of END, plus a second per
        L{SYNC_RATE} bytes sent (the time to fsync them).
        """
        self.patch(connection, "SYNC_RATE", 1000)
        outcome = self.outcome(self.conn.begin_put({"ns": "n", "key": "k", "size": 3000}))
        for _ in range(3):
            self.clock.advance(20)
            self.conn.send_frame(encode_data(b"y" * 995))
        self.assertEqual(outcome, [])
        self.conn.end_put("00" * 32)
        self.clock.advance(5 + 3 - 0.1)
        self.assertEqual(outcome, [])
        self.clock.advance(0.1)
        [failure] = outcome
        self.assertIn("began no reply for 8 s", str(failure.value))

    def test_put_answered_early(self) -> None:
        """
        A put refused before its END (the body is discarded by the
        server, no more answer comes) leaves no deadline behind.
        """
        outcome = self.outcome(self.conn.begin_put({"ns": "n", "key": "k", "size": 3}))
        self.conn.dataReceived(encode_message(Op.ERROR, {"code": 10, "message": "too large"}))
        self.conn.end_put(None, abort=True)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(outcome), 1)
        self.assertTrue(self.conn.reusable)


@implementer(IStreamClientEndpoint)
class _SilentEndpoint:
    """
    Connects to a peer that never says a word (or, with C{tcp=False},
    whose TCP connect never completes).
    """

    def __init__(self, clock: Any, tcp: bool = True) -> None:
        self.clock = clock
        self.tcp = tcp
        self.transports: list[StringTransport] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if not self.tcp:

            def cancel(d: defer.Deferred[Any]) -> None:
                self.cancelled += 1

            return defer.Deferred(cancel)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        transport.abortConnection = lambda: proto.connectionLost(Failure(ConnectionDone()))  # type: ignore[method-assign]
        proto.makeConnection(transport)
        self.transports.append(transport)
        return defer.succeed(proto)


class ConnectDeadlineTests(SynchronousTestCase):
    """
    L{ConnectionCache}'s connect deadline covers the TCP connect, TLS and
    the handshake together.
    """

    def acquire(self, endpoint: _SilentEndpoint, clock: Clock) -> list[Any]:
        cache = ConnectionCache(clock, endpoint_factory=lambda address: endpoint)
        outcome: list[Any] = []
        defer.ensureDeferred(cache.acquire("a:1")).addBoth(outcome.append)
        return outcome

    def test_handshake_never_answered(self) -> None:
        clock = Clock()
        endpoint = _SilentEndpoint(clock)
        outcome = self.acquire(endpoint, clock)
        self.assertIn(b"agent", endpoint.transports[0].value())  # HELLO went out
        clock.advance(4.9)
        self.assertEqual(outcome, [])
        clock.advance(0.1)
        [failure] = outcome
        self.assertIsInstance(failure.value, ConnectionFailed)
        self.assertEqual(str(failure.value), "a:1 did not complete its handshake in 5 s")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_tcp_never_completes(self) -> None:
        clock = Clock()
        endpoint = _SilentEndpoint(clock, tcp=False)
        outcome = self.acquire(endpoint, clock)
        clock.advance(5)
        [failure] = outcome
        self.assertEqual(str(failure.value), "a:1 did not complete its handshake in 5 s")
        self.assertEqual(endpoint.cancelled, 1)


class _Unseekable(io.RawIOBase):
    """
    A source read once, like a pipe.
    """

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _imports(root: str) -> dict[str, set[str]]:
    """
    Every module of the C{koboldfs} package under C{root}, with the modules
    of the package it imports: every import statement, at any depth (in
    functions too), resolved to the module it loads.
    """
    modules: dict[str, str] = {}
    for folder, _, files in os.walk(os.path.join(root, "koboldfs")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = path

    def known(name: str) -> str:
        """
        The module that importing C{name} loads (C{from koboldfs import
        __version__}: the package).
        """
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                edges.update(known(name) for name in names if name.split(".")[0] == "koboldfs")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                if base.split(".")[0] != "koboldfs":
                    continue
                for alias in node.names:
                    edges.add(known(f"{base}.{alias.name}"))
        graph[module] = edges - {module}
    return graph


def _reachable(graph: dict[str, set[str]], *starts: str) -> set[str]:
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def _cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """
    The import cycles of C{graph}: its strongly connected components of
    more than one module (Tarjan's algorithm).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return iter(found)


class LayoutTests(SynchronousTestCase):
    """
    The client side is layers that import only those below them, and the
    public names are where docs/clients.md says.
    """

    def test_no_import_cycle(self) -> None:
        """
        No import statement anywhere (functions included) makes a cycle
        among the modules of C{koboldfs}, the client side's included.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(koboldfs.__file__)))
        graph = _imports(root)
        client_side = _reachable(graph, "koboldfs", "koboldfs.client")
        self.assertIn("koboldfs.txnclient", client_side)
        self.assertEqual(list(_cycles(graph)), [])

    def test_cycle_found(self) -> None:
        """
        The check above sees a cycle made by an import inside a function.
        """
        graph = _imports(
            self._tree({"a": "import koboldfs.b\n", "b": "def f():\n    from . import a\n"})
        )
        self.assertEqual(list(_cycles(graph)), [["koboldfs.a", "koboldfs.b"]])

    def _tree(self, sources: dict[str, str]) -> str:
        root = self.mktemp()
        os.makedirs(os.path.join(root, "koboldfs"))
        with open(os.path.join(root, "koboldfs", "__init__.py"), "w"):
            pass
        for name, source in sources.items():
            with open(os.path.join(root, "koboldfs", f"{name}.py"), "w") as f:
                f.write(source)
        return root

    def test_public_names(self) -> None:
        """
        DESIGN.md's names of the client side, from their public module.
        """
        self.assertIs(facade.DeferredClient, DeferredClient)
        self.assertIs(facade.Stat, Stat)
        self.assertIs(facade.ClientPool, ClientPool)
        self.assertIs(facade.TransactionalClientPool, TransactionalClientPool)
        self.assertIs(facade.DeferredTransaction, DeferredTransaction)
        self.assertTrue(issubclass(ClientPool, DeferredClient))
