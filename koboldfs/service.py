"""
The KoboldFS server as a twistd service: composes the core
(L{koboldfs.node.Node}), its front ends (the binary protocol,
L{koboldfs.binaryserver}; HTTP, L{koboldfs.web}) and its background parts
(replication, scrub, orphan sweep, status poll, transaction sweep,
heartbeat) into one L{KoboldService}.  Nothing here handles a request.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from koboldfs.auth import Credentials
from koboldfs.binaryserver import ServerFactory
from koboldfs.config import ServerConfig
from koboldfs.connection import ConnectionCache
from koboldfs.errors import KoboldError
from koboldfs.events import Listeners
from koboldfs.interfaces import FileInfo, ServerInfo
from koboldfs.metadata import store_from_url
from koboldfs.metrics import Metrics
from koboldfs.node import Node
from koboldfs.orphans import OrphanSweeper
from koboldfs.replicator import Replicator, Scrubber
from koboldfs.status import Status
from koboldfs.storage import Storage
from koboldfs.txnhandler import TransactionSweeper, sweep_interval
from koboldfs.web import guarded, make_site

log = Logger()


class _ThreadPoolService(Service):
    """
    Runs a thread pool for as long as the server runs.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def advertised_address(port: Any) -> str:
    """
    The C{host:port} peers should use to reach a listening port.
    """
    addr = port.getHost()
    host = addr.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"[{host}]:{addr.port}" if ":" in host else f"{host}:{addr.port}"


class KoboldService(MultiService):
    """
    A whole server: thread pool, storage, metadata, listeners, heartbeat.

    Starting needs the database, so it is asynchronous: L{ready} fires once
    the server listens and is registered.  If start fails, the failure is
    logged and C{reactor.stop} is called, since a server that cannot reach
    its metadata or data directory cannot serve.
    """

    def __init__(self, config: ServerConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        io_pool = ThreadPool(minthreads=2, maxthreads=8, name="koboldfs-io")
        _ThreadPoolService(io_pool).setServiceParent(self)
        self.storage = Storage(config.data, reactor, io_pool)
        db = config.db or f"sqlite:///{config.data}/metadata.sqlite"
        self.store = store_from_url(db, reactor)
        self.peers = ConnectionCache(
            reactor,
            timeout=config.peer_timeout,
            credentials=Credentials(cluster_secret=config.cluster_secrets[0], name=config.name)
            if config.cluster_secrets
            else None,
            tls=config.tls_ca is not None,
            ca=config.tls_ca,
        )
        self.replica_lost: Listeners[FileInfo] = Listeners()
        self.node = Node(config, self.storage, self.store, reactor, self.peers, self.replica_lost)
        self.replicator = Replicator(self.node, reactor, config.replicate_interval)
        self.scrubber = Scrubber(
            self.node, reactor, config.scrub_rate, rest=config.replicate_interval
        )
        self.orphans = OrphanSweeper(self.node, reactor)
        self.status = Status(self.node, self.replicator, self.scrubber, reactor)
        self.metrics = Metrics(config.name, reactor, self.status.snapshot)
        self.txn_sweeper = TransactionSweeper(
            self.node.txns, reactor, sweep_interval(config.pending_timeout)
        )
        self._ports: list[Any] = []
        self._beat = LoopingCall(lambda: defer.ensureDeferred(self._heartbeat()))
        self._beat.clock = reactor
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._startFailed)
        d.chainDeferred(self.ready)

    def _startFailed(self, failure: Any) -> Any:
        log.failure("KoboldFS server {name} could not start", failure, name=self.config.name)
        if self.reactor.running:
            self.reactor.stop()
        return failure

    async def _start(self) -> None:
        config = self.config
        await self.storage.start()
        await self.store.start()
        port = await serverFromString(self.reactor, config.listen).listen(
            ServerFactory(self.node, self.metrics)
        )
        self._ports.append(port)
        http = await serverFromString(self.reactor, config.http).listen(
            guarded(self.node, make_site(self.node, self.status, self.metrics))
        )
        self._ports.append(http)
        scheme = "https" if config.http.startswith("ssl:") else "http"
        public_url = config.public_url or f"{scheme}://{advertised_address(http)}"
        free, total = await self.storage.disk_usage()
        await self.store.register_server(
            ServerInfo(
                name=config.name,
                host=config.host,
                address=advertised_address(port),
                public_url=public_url,
                heartbeat=self.reactor.seconds(),
                disk_free=free,
                disk_total=total,
            )
        )
        await self.node.refresh_servers()
        self._beat.start(config.heartbeat, now=False)
        self.replicator.start()
        self.scrubber.start()
        self.orphans.start()
        self.status.start()
        self.txn_sweeper.start()
        if not self.node.open and not config.cluster_secrets:
            log.warn(
                "{name} requires keys but has no --secret-file: peers cannot copy from it",
                name=config.name,
            )
        log.info(
            "KoboldFS server {name} on {address} ({auth}), HTTP {url}, data {data}, metadata {db}",
            auth="open: no authentication" if self.node.open else "keys required",
            name=config.name,
            address=advertised_address(port),
            url=public_url,
            data=config.data,
            db=self.store.url,
        )

    async def _heartbeat(self) -> None:
        """
        Tell the cluster we are alive, and learn who else is.  Errors are
        logged, never raised: a raise would stop the LoopingCall for good.
        """
        try:
            free, total = await self.storage.disk_usage()
            await self.store.heartbeat(self.config.name, self.reactor.seconds(), free, total)
            await self.node.refresh_servers()
        except KoboldError as e:
            # The database is down: say so once a beat, without a traceback.
            log.warn("heartbeat of {name} failed: {error}", name=self.config.name, error=e)
        except Exception:
            log.failure("heartbeat of {name} failed", name=self.config.name)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._beat.running:
            self._beat.stop()
        self.status.stop()
        replicating = self.replicator.stop()
        scrubbing = self.scrubber.stop()
        yield self.txn_sweeper.stop()
        sweeping = self.orphans.stop()
        for port in self._ports:
            yield port.stopListening()
        self._ports = []
        # Closing the peer connections ends the replicator's copies.
        yield self.peers.close()
        yield replicating
        yield scrubbing
        yield sweeping
        yield self.store.stop()
        yield super().stopService()
