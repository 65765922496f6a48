"""
Fakes for testing code that uses KoboldFS, and KoboldFS itself.

L{MemoryServer} is a real server (the real L{Node}, L{Storage} and
metadata store) whose clients connect through memory rather than sockets,
and whose "thread pool" runs work inline: a test drives a put or a get to
completion with L{MemoryServer.flush}, with no threads, sockets or sleeps.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Coroutine

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from koboldfs.client import ConnectionPool, DeferredClient
from koboldfs.interfaces import ServerInfo
from koboldfs.metadata.sqlstore import SQLAlchemyStore
from koboldfs.service import Node, ServerConfig, ServerProtocol
from koboldfs.storage import Storage


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


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, server: MemoryServer) -> None:
        self._server = server

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        client = factory.buildProtocol(None)
        server = ServerProtocol(self._server.node)
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
    """

    def __init__(self, root: str, name: str = "memory") -> None:
        os.makedirs(root, exist_ok=True)
        self.reactor = SyncReactor()
        self.pumps: list[iosim.IOPump] = []
        pool = InlineThreadPool()
        self.config = ServerConfig(name=name, host=name, data=root)
        self.storage = Storage(root, self.reactor, pool)
        self.store = SQLAlchemyStore(
            f"sqlite:///{os.path.join(root, 'metadata.sqlite')}", self.reactor, pool
        )
        self.node = Node(
            self.config, self.storage, self.store, self.reactor, ConnectionPool(self.reactor)
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
                "memory:0",
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
            ["memory:0"],
            self.reactor,
            endpoint_factory=lambda address: _MemoryEndpoint(self),
            threadpool=InlineThreadPool(),
            **options,
        )

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
