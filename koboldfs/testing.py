"""
Fakes for testing code that uses KoboldFS, and KoboldFS itself.

L{MemoryServer} is a real server (the real L{Node}, L{Storage} and
metadata store) whose clients connect through memory rather than sockets,
and whose "thread pool" runs work inline: a test drives a put or a get to
completion with L{MemoryServer.flush}, with no threads, sockets or sleeps.
L{MemoryServer.http} sends a request to its real HTTP site the same way.
L{MemoryCluster} is several of them on one clock and one metadata file,
reaching each other in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from koboldfs.binaryserver import ServerProtocol

from koboldfs.client import DeferredClient
from koboldfs.config import ServerConfig
from koboldfs.connection import ConnectionCache
from koboldfs.interfaces import ServerInfo
from koboldfs.metadata.sqlstore import SQLAlchemyStore
from koboldfs.metrics import Metrics
from koboldfs.node import Node
from koboldfs.storage import Storage
from koboldfs.web import make_site


class InlineThreadPool:
    """
    A thread pool that runs each call at once, on the calling thread: for
    tests, so work "in a thread" finishes before the call returns.
    """

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class SyncReactor(MemoryReactorClock):
    """
    A memory reactor and clock whose C{callFromThread} runs the call now,
    which together with L{InlineThreadPool} makes thread work synchronous.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def getThreadPool(self) -> InlineThreadPool:
        return InlineThreadPool()


@dataclass(frozen=True)
class HTTPResponse:
    """
    What an HTTP client received.

    @ivar headers: lower-cased names, each with its last value.
    @ivar aborted: whether the server cut the connection instead of closing
        it: C{body} may then be short of what the headers announced.
    """

    status: int
    headers: dict[str, str]
    body: bytes
    aborted: bool = False


def parse_response(data: bytes, aborted: bool = False) -> HTTPResponse:
    """
    Parse one HTTP/1.1 response that is not chunked, from its raw bytes;
    status 0 when there are none (the connection closed first).
    """
    if not data:
        return HTTPResponse(0, {}, b"", aborted)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HTTPResponse(int(status_line.split()[1]), headers, body, aborted)


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, server: MemoryServer) -> None:
        self._server = server

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        client = factory.buildProtocol(None)
        server = ServerProtocol(self._server.node, self._server.metrics)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self._server.reactor,
        )
        self._server.pumps.append(pump)
        return defer.succeed(client)


class MemoryServer:
    """
    One KoboldFS server in memory, with its files in C{root} on disk.

    @ivar reactor: the L{SyncReactor} everything runs on; advance its clock
        to fire timeouts and retries.
    @ivar address: what it registers as its protocol address.
    """

    def __init__(
        self,
        root: str,
        name: str = "memory",
        reactor: SyncReactor | None = None,
        db: str | None = None,
        peers: Callable[[str], IStreamClientEndpoint] | None = None,
    ) -> None:
        """
        @param reactor: one shared with other servers (L{MemoryCluster}).
        @param db: a metadata database shared with other servers; by
            default, a SQLite file of its own under C{root}.
        @param peers: how it reaches a peer at an address (L{MemoryCluster}
            gives the other servers in memory); by default, over TCP.
        """
        os.makedirs(root, exist_ok=True)
        self.reactor = reactor or SyncReactor()
        self.pumps: list[iosim.IOPump] = []
        self.address = f"{name}:0"
        pool = InlineThreadPool()
        self.config = ServerConfig(name=name, host=name, data=root)
        self.storage = Storage(root, self.reactor, pool)
        self.store = SQLAlchemyStore(
            db or f"sqlite:///{os.path.join(root, 'metadata.sqlite')}", self.reactor, pool
        )
        #: Its request counters (L{koboldfs.metrics}).
        self.metrics = Metrics(name, self.reactor)
        self.node = Node(
            self.config,
            self.storage,
            self.store,
            self.reactor,
            ConnectionCache(self.reactor, endpoint_factory=peers),
        )

    def start(self) -> None:
        """
        Create the storage and schema, and register the server as alive.
        """
        self.flush(defer.ensureDeferred(self._start()))

    async def _start(self) -> None:
        await self.storage.start()
        await self.store.start()
        await self.store.register_server(
            ServerInfo(
                self.config.name,
                self.config.host,
                self.address,
                "http://memory",
                heartbeat=self.reactor.seconds(),
            )
        )
        await self.node.refresh_servers()

    def stop(self) -> None:
        self.flush(self.store.stop())

    def client(self, namespace: str = "test", **options: Any) -> DeferredClient:
        """
        A L{DeferredClient} whose connections reach this server in memory.
        """
        return DeferredClient(
            namespace,
            [self.address],
            self.reactor,
            endpoint_factory=lambda address: _MemoryEndpoint(self),
            threadpool=InlineThreadPool(),
            **options,
        )

    def http(self, method: str, target: str, headers: dict[str, str] | None = None) -> HTTPResponse:
        """
        Send one request to this server's real HTTP site (a L{Site} over a
        L{StringTransport}) and return the response it wrote.
        """
        channel = make_site(self.node).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        lines = [f"{method} {target} HTTP/1.1", "Host: memory", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.pump()
        channel.connectionLost(Failure(ConnectionDone()))
        return parse_response(transport.value(), aborted=transport.disconnected)

    def pump(self) -> None:
        """
        Move bytes both ways until every connection is quiet.
        """
        moved = True
        while moved:
            moved = any([pump.flush() for pump in self.pumps])

    def flush(self, d: defer.Deferred[Any] | Coroutine[Any, Any, Any]) -> Any:
        """
        Pump until C{d} fires; return its result or raise its failure.
        """
        results: list[Any] = []
        defer.ensureDeferred(d).addBoth(results.append)
        self.pump()
        if not results:
            raise AssertionError(f"{d!r} did not fire")
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result


class MemoryCluster:
    """
    L{MemoryServer}s sharing one reactor and one SQLite metadata file, each
    reaching the others through memory: a cluster for replication tests.

    @ivar servers: the servers by name, started.
    """

    def __init__(self, root: str, names: Sequence[str]) -> None:
        self.reactor = SyncReactor()
        db = f"sqlite:///{os.path.join(root, 'metadata.sqlite')}"
        by_address: dict[str, MemoryServer] = {}

        def peer(address: str) -> IStreamClientEndpoint:
            return _MemoryEndpoint(by_address[address])

        self.servers = {
            name: MemoryServer(os.path.join(root, name), name, self.reactor, db, peers=peer)
            for name in names
        }
        by_address.update((server.address, server) for server in self.servers.values())
        for server in self.servers.values():
            server.start()
        self.beat()

    def beat(self, *names: str) -> None:
        """
        Heartbeat the servers called C{names} (default: all) at the clock's
        time, and let every server learn who is up: a server left out goes
        down once the clock passes its C{down_after}.
        """

        async def beat() -> None:
            for name in names or self.servers:
                server = self.servers[name]
                await server.store.heartbeat(name, self.reactor.seconds(), 0, 0)
            for server in self.servers.values():
                await server.node.refresh_servers()

        self.flush(beat())

    def pump(self) -> None:
        """
        Move bytes both ways on every connection until all are quiet.
        """
        moved = True
        while moved:
            moved = any([pump.flush() for s in self.servers.values() for pump in s.pumps])

    def flush(self, d: defer.Deferred[Any] | Coroutine[Any, Any, Any]) -> Any:
        """
        Pump until C{d} fires; return its result or raise its failure.
        """
        results: list[Any] = []
        defer.ensureDeferred(d).addBoth(results.append)
        self.pump()
        if not results:
            raise AssertionError(f"{d!r} did not fire")
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result

    def stop(self) -> None:
        for server in self.servers.values():
            self.flush(server.node.peers.close())
            server.stop()
