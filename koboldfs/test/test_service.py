"""
Tests of the server's service tree (L{koboldfs.service.KoboldService}) on
a memory reactor: its children, the order it starts them in, and a clean
stop.  Real servers in real processes are in test_end_to_end.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.config import ServerConfig
from koboldfs.interfaces import ServerInfo
from koboldfs.metadata.sqlstore import SQLAlchemyStore
from koboldfs.service import KoboldService, advertised_address, with_backlog
from koboldfs.testing import InlineThreadPool, SyncReactor

CHILDREN = {
    "threads",
    "data",
    "peers",
    "binary",
    "http",
    "s3",
    "heartbeat",
    "space",
    "replicator",
    "scrubber",
    "orphans",
    "status",
    "transactions",
    "uploads",
    "key check",
}


class KoboldServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = SyncReactor()
        self.reactor.advance(1000)
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.config = ServerConfig(
            name="s1",
            host="h1",
            data=os.path.join(root, "data"),
            listen="tcp:9876:interface=127.0.0.1",
            http="tcp:9877:interface=127.0.0.1",
        )
        self.store = SQLAlchemyStore(
            f"sqlite:///{os.path.join(root, 'metadata.sqlite')}", self.reactor, InlineThreadPool()
        )
        self.service = KoboldService(self.config, self.reactor, self.store, InlineThreadPool())

    def test_children(self) -> None:
        """
        Every part of a server is a child service, by name, none running
        before the server starts.
        """
        children = {s.name: s for s in self.service}
        self.assertEqual(set(children), CHILDREN)
        self.assertFalse(any(s.running for s in children.values()))
        self.assertIs(children["replicator"], self.service.replicator)

    def test_start_and_stop(self) -> None:
        """
        Started, the server listens on both endpoints, registers with the
        addresses it got, accepts connections only then, and runs every
        part; stopped, every part stops,
        the ports close and the store is stopped.
        """
        self.service.privilegedStartService()
        self.assertEqual(self.reactor.tcpServers, [])  # not before the data is ready
        registered = self.store.register_server
        accepting: list[bool] = []

        def register(info: ServerInfo) -> Deferred[ServerInfo]:
            accepting.extend(port in self.reactor.readers for port in ports)
            return registered(info)

        self.patch(self.store, "register_server", register)
        ports: list[Any] = []

        def listened(port: Any) -> Any:
            ports.append(port)
            return port

        for listener in (self.service.binary, self.service.http, self.service.s3):
            assert listener is not None
            listener.listening.addCallback(listened)
        self.service.startService()
        self.successResultOf(self.service.ready)
        self.assertEqual([port for port, *_ in self.reactor.tcpServers], [9876, 9877, 9878])
        # No connection is taken before the server is registered and knows
        # its peers; then every port takes them.
        self.assertEqual(accepting, [False, False, False])
        self.assertTrue(all(port in self.reactor.readers for port in ports))
        [me] = self.successResultOf(self.store.servers())
        self.assertEqual((me.name, me.host), ("s1", "h1"))
        self.assertEqual(me.address, advertised_address(ports[0]))
        self.assertEqual(me.public_url, f"http://{advertised_address(ports[1])}")
        closed = []
        for port in ports:
            port.stopListening = lambda port=port: closed.append(port)
        running = {s.name for s in self.service if s.running}
        self.assertEqual(running, CHILDREN)
        # The heartbeat beats on the clock.
        self.reactor.advance(self.config.heartbeat)
        [me] = self.successResultOf(self.store.servers())
        self.assertEqual(me.heartbeat, self.reactor.seconds())
        self.successResultOf(self.service.stopService())
        self.assertEqual({s.name for s in self.service if s.running}, set())
        self.assertEqual(closed, ports)
        # The store is closed: a call now fails.
        self.failureResultOf(self.store.servers())

    def test_start_fails(self) -> None:
        """
        A server whose data directory cannot be made fails to start: the
        failure is logged, L{ready} fails, nothing listens, and it still
        stops cleanly.
        """
        with open(self.config.data, "w") as f:
            f.write("a file, not a directory")
        self.service.startService()
        self.failureResultOf(self.service.ready)
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.assertEqual(self.reactor.tcpServers, [])
        self.successResultOf(self.service.stopService())
        self.assertEqual({s.name for s in self.service if s.running}, set())


class BacklogTests(SynchronousTestCase):
    def test_with_backlog(self) -> None:
        """
        Stream endpoints get the configured listen queue unless they set
        their own; other kinds are left alone.
        """
        self.assertEqual(
            with_backlog("tcp:9876:interface=127.0.0.1", 1024),
            "tcp:9876:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(with_backlog("unix:/run/k.sock", 64), "unix:/run/k.sock:backlog=64")
        self.assertEqual(with_backlog("tcp:9876:backlog=10", 1024), "tcp:9876:backlog=10")
        systemd = "systemd:domain=INET:index=0"
        self.assertEqual(with_backlog(systemd, 1024), systemd)
