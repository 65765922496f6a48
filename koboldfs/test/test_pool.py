"""
Tests of L{koboldfs.pool}: the Deferred pool and its connection limiter in
memory against a real server's request handling, and the blocking pool
shared by threads against a real server process.
"""

from __future__ import annotations

import io
import os
import threading

from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from koboldfs.blocking import ClientPool as BlockingClientPool
from koboldfs.client import ClientPool as ClientPoolByName
from koboldfs.connection import ClientProtocol, parse_address
from koboldfs.errors import ConnectionFailed
from koboldfs.pool import ClientPool
from koboldfs.test.cluster import ClusterMixin
from koboldfs.testing import InlineThreadPool, MemoryServer, _MemoryEndpoint
from koboldfs.test.support import free_port


class ConnectionLimiterTests(SynchronousTestCase):
    """
    The pool in memory: limits, reuse and the order of servers.
    """

    def setUp(self) -> None:
        self.server = MemoryServer(os.path.abspath(self.mktemp()))
        self.server.start()
        self.addCleanup(self.server.stop)
        self.refused: list[str] = []

    def pool(self, servers: list[str] | None = None, **options: object) -> ClientPool:
        def endpoint(address: str) -> object:
            if address != self.server.address:
                self.refused.append(address)
                return _Refusing()
            return _MemoryEndpoint(self.server)

        client = ClientPool(
            "test",
            servers or [self.server.address],
            self.server.reactor,
            endpoint_factory=endpoint,
            threadpool=InlineThreadPool(),
            **options,
        )
        self.addCleanup(lambda: self.server.flush(client.close()))
        return client

    def test_public_name(self) -> None:
        """
        The design names it C{koboldfs.client.ClientPool}.
        """
        self.assertIs(ClientPoolByName, ClientPool)

    def test_bounded(self) -> None:
        """
        Requests beyond C{max_connections} wait for a free connection
        instead of opening more, and all complete.
        """
        client = self.pool(max_connections=2)
        self.server.flush(client.put("k", b"x"))
        before = len(self.server.pumps)
        results: list[object] = []
        for _ in range(6):
            client.stat("k").addBoth(results.append)
        self.assertLessEqual(client.connections.in_use(self.server.address), 2)
        self.server.pump()
        self.assertEqual([r.size for r in results], [1] * 6)  # type: ignore[attr-defined]
        self.assertLessEqual(len(self.server.pumps) - before, 1)
        self.assertEqual(client.connections.in_use(self.server.address), 0)

    def test_slot_freed_by_failure(self) -> None:
        """
        A request that fails gives its slot back: the next one is not
        stuck behind it.
        """
        client = self.pool(max_connections=1)
        self.assertFalse(self.server.flush(client.get("missing", io.BytesIO())))
        self.assertFalse(self.server.flush(client.get("missing", io.BytesIO())))
        self.assertEqual(client.connections.in_use(self.server.address), 0)

    def test_unreachable_server_tried_last(self) -> None:
        """
        A server that refused a connection is put after the others for
        C{down_for} seconds, then tried in turn again.
        """
        client = self.pool(["nowhere:1", self.server.address], down_for=10, retries=0)
        for _ in range(4):
            self.assertTrue(self.server.flush(client.ping()))
        self.assertEqual(self.refused, ["nowhere:1"])
        self.assertFalse(client.connections.healthy("nowhere:1"))
        self.server.reactor.advance(11)
        self.assertTrue(client.connections.healthy("nowhere:1"))
        self.server.flush(client.ping())
        self.server.flush(client.ping())
        self.assertEqual(self.refused, ["nowhere:1", "nowhere:1"])

    def test_stale_connection_pinged(self) -> None:
        """
        A connection idle for longer than C{check_after} is pinged before
        reuse; one that is dead is replaced, and the request still works.
        """
        client = self.pool(check_after=5)
        self.server.flush(client.put("k", b"x"))
        self.assertEqual(len(self.server.pumps), 1)
        # The server's side stops answering, without a word to the client.
        self.server.pumps[0].server.dataReceived = lambda data: None
        self.server.reactor.advance(6)
        d = client.stat("k")
        self.server.pump()
        # The ping waits for an answer that never comes, until its timeout.
        self.server.reactor.advance(31)
        self.server.pump()
        self.assertEqual(self.successResultOf(d).size, 1)
        self.assertEqual(len(self.server.pumps), 2)

    def test_closed_pool(self) -> None:
        """
        A closed pool refuses requests with a clear error.
        """
        client = self.pool()
        self.server.flush(client.close())
        self.assertFalse(self.server.flush(client.ping()))
        self.assertRaises(ConnectionFailed, self.server.flush, client.connections.acquire("x:1"))


class _Refusing:
    def connect(self, factory: object) -> defer.Deferred[object]:
        return defer.fail(ConnectionRefusedError("refused"))


class BlockingPoolTests(ClusterMixin, TestCase):
    """
    The blocking pool shared by worker threads, against a real server.
    """

    timeout = 120

    async def test_threads_share_one_pool(self) -> None:
        """
        Eight threads putting and getting through one pool of at most two
        connections per server all get their own bytes back; a dead
        server in the list costs nothing once found down.
        """
        server = await self.startServer("a")
        dead = f"127.0.0.1:{free_port()}"
        dials = _CountingDialer()

        def work() -> list[str]:
            errors: list[str] = []
            pool = BlockingClientPool(
                "demo",
                [dead, server.address],
                max_connections=2,
                retries=1,
                down_for=600,
                endpoint_factory=dials.endpoint,
            )

            def worker(n: int) -> None:
                try:
                    for i in range(5):
                        body = f"{n}-{i}".encode() * 100
                        pool.put(f"t{n}/{i}", body)
                        out = io.BytesIO()
                        if not pool.get(f"t{n}/{i}", out) or out.getvalue() != body:
                            errors.append(f"t{n}/{i} came back wrong")
                except Exception as e:  # reported below
                    errors.append(repr(e))

            threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            self.assertEqual(pool._client.connections.in_use(server.address), 0)
            self.assertEqual(len(pool.list("t")), 40)
            pool.close()
            return errors

        self.assertEqual(await deferToThread(work), [])
        # Never more than two connections open to the server at once...
        self.assertIn(dials.most_open.get(server.address), (1, 2))
        # ...and the dead server tried at most once by each thread, before
        # its first refusal came back: not by each of the 81 requests.
        self.assertGreaterEqual(dials.attempts[dead], 1)
        self.assertLessEqual(dials.attempts[dead], 8)


class _CountingDialer:
    """
    Real TCP connections, counted: how many times each address was dialled
    and the most connections open to it at any one time.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.most_open: dict[str, int] = {}
        self._open: dict[str, int] = {}

    def endpoint(self, address: str) -> _CountedEndpoint:
        host, port = parse_address(address)
        return _CountedEndpoint(self, address, HostnameEndpoint(reactor, host, port, timeout=5))

    def dialled(self, address: str) -> None:
        self.attempts[address] = self.attempts.get(address, 0) + 1

    def opened(self, address: str, conn: ClientProtocol) -> None:
        self._open[address] = self._open.get(address, 0) + 1
        self.most_open[address] = max(self.most_open.get(address, 0), self._open[address])
        conn.lost.addCallback(lambda _: self._closed(address))

    def _closed(self, address: str) -> None:
        self._open[address] -= 1


@implementer(IStreamClientEndpoint)
class _CountedEndpoint:
    def __init__(self, dialer: _CountingDialer, address: str, inner: HostnameEndpoint) -> None:
        self._dialer = dialer
        self._address = address
        self._inner = inner

    def connect(self, factory: object) -> defer.Deferred[ClientProtocol]:
        self._dialer.dialled(self._address)
        d = self._inner.connect(factory)

        def opened(conn: ClientProtocol) -> ClientProtocol:
            self._dialer.opened(self._address, conn)
            return conn

        return d.addCallback(opened)
