"""
Tests of L{koboldfs.deferredclient}: the rounds of failover and retries of
L{DeferredClient}, on a fake clock against scripted servers in memory (no
sockets, no sleeps); and the layout of the client side's modules.
"""

from __future__ import annotations

import ast
import io
import os
import random
from typing import Any, Iterator

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import koboldfs
from koboldfs import client as facade
from koboldfs.deferredclient import DeferredClient, Stat
from koboldfs.errors import ConnectionFailed, ErrorCode, ServerError, Unavailable
from koboldfs.pool import ClientPool
from koboldfs.protocol import MAX_PAYLOAD, VERSION, Frame, FrameProtocol, Message, Op
from koboldfs.testing import InlineThreadPool, SyncReactor
from koboldfs.txnclient import DeferredTransaction, TransactionalClientPool

#: What a scripted server answers a STAT with when it succeeds.
STAT = {"key": "k", "size": 1, "sha256": "00" * 32, "created": 0.0, "servers": ["a"]}
#: A scripted reply that drops the connection instead of answering.
DROP = "drop"


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
